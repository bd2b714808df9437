"""Byte codec for one passage memory (float32 ``[m, d]`` pooled encoder states).

A memory is stored in a Parquet row as a zstd-compressed payload plus a few small columns
(scales, checksum, shape). Lossless float codecs (``bfloat16``, ``float16``, ``float32``) convert
to the target dtype, split the little-endian element bytes into byte planes (all byte 0s, then
all byte 1s, ...) and zstd-compress; decoding reverses this bit-exactly. ``int8`` is lossy:
per-vector absmax scaling to ``[-127, 127]``, with the float32 scales stored beside the payload.

The checksum is ``zlib.crc32`` over the quantized element bytes in natural (row-major,
little-endian, *unsplit*) order, continued over the raw scale bytes for ``int8``. It is verified
on every decode, so a flipped byte anywhere in the payload is caught even when zstd accepts it.

Only numpy, zstandard and the standard library are used (no torch), so the codec is cheap to
import in Ray workers and the serving path.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zstandard

CODEC_DTYPES = ("bfloat16", "float16", "float32", "int8")
DEFAULT_DTYPE = "bfloat16"
DEFAULT_LEVEL = 3
MIN_LEVEL, MAX_LEVEL = 1, 22

# Little-endian storage dtype of each codec's quantized values.
_STORAGE = {
    "bfloat16": np.dtype("<u2"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "int8": np.dtype("i1"),
}
_INT8_MAX = 127.0
_TINY_SCALE = np.float32(np.finfo(np.float32).smallest_subnormal)


class CorruptRecordError(ValueError):
    """A stored memory could not be decoded; the message names the record and the defect."""


@dataclass(frozen=True)
class EncodedMemory:
    """One encoded memory, ready to be written as Parquet columns."""

    payload: bytes
    scales: bytes | None
    checksum: int
    n_vectors: int
    dim: int


# --------------------------------------------------------------------------- zstd contexts
_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


# --------------------------------------------------------------------------- validation
def _check_dtype(dtype: str) -> str:
    if dtype not in CODEC_DTYPES:
        raise ValueError(f"unknown memory codec dtype {dtype!r}; valid dtypes are {', '.join(CODEC_DTYPES)}")
    return dtype


def _check_level(level: int) -> int:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"zstd compression level must be an int in {MIN_LEVEL}..{MAX_LEVEL}, got {level!r}")
    return int(level)


def _as_memory(values: np.ndarray, record: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"{record}: a memory must be a 2-D array [m, d] with m >= 1 and d >= 1, got shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise ValueError(
            f"{record}: memory has non-finite values (NaN/inf); fp16 overflow in the encoder is the usual "
            "cause - run the encoder in bfloat16 or float32"
        )
    return arr


# --------------------------------------------------------------------------- bfloat16 bit math
def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, round-to-nearest-even (matches torch)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = ((bits + rounding) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(bits.view(np.float32))
    if nan.any():  # keep NaNs NaN (quiet), as torch does, instead of letting rounding carry into inf
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def from_bfloat16_bits(b: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# --------------------------------------------------------------------------- quantization
def _int8_quantize(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-vector absmax int8 quantization -> (q int8 [m, d], scales float32 [m])."""
    absmax = np.abs(arr).max(axis=1)
    scales = (absmax / np.float32(_INT8_MAX)).astype(np.float32)
    scales[(scales == 0) & (absmax > 0)] = _TINY_SCALE  # subnormal absmax whose /127 underflows
    safe = np.where(scales == 0, 1.0, scales.astype(np.float64))
    q = np.clip(np.rint(arr.astype(np.float64) / safe[:, None]), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return q, scales


def _to_storage(arr: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 [m, d] -> (stored element array in little-endian storage dtype, int8 scales or None)."""
    if dtype == "bfloat16":
        return to_bfloat16_bits(arr), None
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return arr.astype(_STORAGE["float16"]), None
    if dtype == "float32":
        return arr.astype(_STORAGE["float32"], copy=False), None
    return _int8_quantize(arr)


def _from_storage(stored: np.ndarray, scales: np.ndarray | None, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return from_bfloat16_bits(stored)
    if dtype == "int8":
        assert scales is not None
        return stored.astype(np.float32) * scales[:, None]
    return stored.astype(np.float32)


def _check_range(stored: np.ndarray, dtype: str, record: str) -> None:
    if dtype == "bfloat16":
        overflow = bool(((stored & np.uint16(0x7F80)) == np.uint16(0x7F80)).any())  # exponent all ones
    else:
        overflow = dtype == "float16" and not bool(np.isfinite(stored).all())
    if overflow:
        raise ValueError(
            f"{record}: memory values overflow {dtype} (|x| too large for the dtype); "
            "use float32, or bfloat16 if the values exceed the float16 range"
        )


def quantize(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values exactly representable in ``dtype``: what ``decode(encode(values))`` returns."""
    _check_dtype(dtype)
    arr = _as_memory(values, "<memory>")
    stored, scales = _to_storage(arr, dtype)
    _check_range(stored, dtype, "<memory>")
    return _from_storage(stored, scales, dtype)


# --------------------------------------------------------------------------- encode / decode
def _checksum(values_le: bytes | memoryview, scales: bytes | None) -> int:
    crc = zlib.crc32(values_le)
    if scales is not None:
        crc = zlib.crc32(scales, crc)
    return crc & 0xFFFFFFFF


def encode_memory(
    values: np.ndarray, dtype: str = DEFAULT_DTYPE, level: int = DEFAULT_LEVEL, *, record: str = "<memory>"
) -> EncodedMemory:
    """Encode a float32 ``[m, d]`` memory; ``record`` only labels error messages."""
    _check_dtype(dtype)
    level = _check_level(level)
    arr = _as_memory(values, record)
    stored, scales_arr = _to_storage(arr, dtype)
    _check_range(stored, dtype, record)
    stored = np.ascontiguousarray(stored, dtype=_STORAGE[dtype])
    itemsize = stored.dtype.itemsize
    planes = stored.view(np.uint8).reshape(-1, itemsize).T.tobytes()  # byte-plane split
    scales = None if scales_arr is None else scales_arr.astype("<f4").tobytes()
    return EncodedMemory(
        payload=_compressor(level).compress(planes),
        scales=scales,
        checksum=_checksum(stored.data, scales),
        n_vectors=int(arr.shape[0]),
        dim=int(arr.shape[1]),
    )


def _decompress(payload: bytes, expected: int, record: str) -> bytes:
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise CorruptRecordError(f"{record}: memory payload is not a valid zstd frame ({exc})") from exc
    if declared not in (-1, expected):
        raise CorruptRecordError(
            f"{record}: memory payload declares {declared} decompressed bytes, expected {expected}"
        )
    try:
        raw = _decompressor().decompress(payload, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise CorruptRecordError(f"{record}: memory payload failed to decompress ({exc})") from exc
    if len(raw) != expected:
        raise CorruptRecordError(
            f"{record}: memory payload decompressed to {len(raw)} bytes, expected {expected}"
        )
    return raw


def _decode_scales(scales: bytes | None, n_vectors: int, dtype: str, record: str) -> np.ndarray | None:
    if dtype != "int8":
        if scales is not None:
            raise CorruptRecordError(f"{record}: {dtype} memory has int8 scales attached; dtype column is wrong")
        return None
    if scales is None or len(scales) != 4 * n_vectors:
        got = "none" if scales is None else f"{len(scales)} bytes"
        raise CorruptRecordError(f"{record}: int8 memory needs {4 * n_vectors} bytes of scales, got {got}")
    return np.frombuffer(scales, dtype="<f4").astype(np.float32)


def decode_memory(
    payload: bytes,
    scales: bytes | None,
    checksum: int,
    n_vectors: int,
    dim: int,
    dtype: str,
    *,
    record: str = "<memory>",
) -> np.ndarray:
    """Decode one stored memory to float32 ``[n_vectors, dim]``, verifying its checksum.

    ``checksum`` may be stored as a signed 32-bit integer; only its low 32 bits are compared.
    """
    _check_dtype(dtype)
    n_vectors, dim = int(n_vectors), int(dim)
    if n_vectors < 1 or dim < 1:
        raise CorruptRecordError(f"{record}: memory shape [{n_vectors}, {dim}] is invalid (need m, d >= 1)")
    scales = None if scales is None else bytes(scales)
    scale_arr = _decode_scales(scales, n_vectors, dtype, record)
    storage = _STORAGE[dtype]
    raw = _decompress(payload, n_vectors * dim * storage.itemsize, record)
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(storage.itemsize, n_vectors * dim)
    natural = np.ascontiguousarray(planes.T)  # undo byte-plane split
    actual = _checksum(natural.data, scales)
    if actual != (int(checksum) & 0xFFFFFFFF):
        raise CorruptRecordError(
            f"{record}: memory checksum mismatch (stored {int(checksum) & 0xFFFFFFFF:#010x}, "
            f"computed {actual:#010x}); the row is corrupt - re-encode this passage"
        )
    stored = natural.view(storage).reshape(n_vectors, dim)
    return np.ascontiguousarray(_from_storage(stored, scale_arr, dtype), dtype=np.float32)


def encoded_nbytes(enc: EncodedMemory) -> int:
    """Stored size of a memory: payload plus scale bytes."""
    return len(enc.payload) + (len(enc.scales) if enc.scales is not None else 0)


def encode_many(
    arrays: Sequence[np.ndarray], dtype: str = DEFAULT_DTYPE, level: int = DEFAULT_LEVEL
) -> list[EncodedMemory]:
    """Encode a batch of memories (one per passage), labelling errors by batch index."""
    return [encode_memory(a, dtype, level, record=f"memory #{i}") for i, a in enumerate(arrays)]


def decode_many(
    encoded: Sequence[EncodedMemory], dtype: str, records: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Decode a batch of ``EncodedMemory``; ``records`` (e.g. passage ids) label errors."""
    if records is not None and len(records) != len(encoded):
        raise ValueError(f"decode_many got {len(encoded)} memories but {len(records)} record names")
    names = records if records is not None else [f"memory #{i}" for i in range(len(encoded))]
    return [
        decode_memory(e.payload, e.scales, e.checksum, e.n_vectors, e.dim, dtype, record=name)
        for e, name in zip(encoded, names)
    ]
