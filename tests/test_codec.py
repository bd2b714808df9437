"""Tests for kalm_batch.codec: passage-memory byte codec (round trips, torch bf16 parity, corruption)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kalm_batch.codec import (
    CODEC_DTYPES,
    DEFAULT_DTYPE,
    CorruptRecordError,
    EncodedMemory,
    decode_many,
    decode_memory,
    encode_many,
    encode_memory,
    encoded_nbytes,
    from_bfloat16_bits,
    quantize,
    to_bfloat16_bits,
)

LOSSLESS = ("bfloat16", "float16", "float32")
SETTINGS = settings(max_examples=40, deadline=None, database=None)  # database=None: no writes to cwd

shapes = st.tuples(st.integers(1, 40), st.integers(1, 64))
# |x| <= 6e4 stays inside the float16 range for every dtype.
moderate = arrays(np.float32, shapes, elements=st.floats(-6e4, 6e4, width=32))
# Any finite float32 (including subnormals and -0.0), bounded below the bfloat16 overflow point.
_BIG = float(np.float32(3e38))
wide = arrays(np.float32, shapes, elements=st.floats(-_BIG, _BIG, width=32))


def _decode(enc: EncodedMemory, dtype: str, record: str = "<memory>") -> np.ndarray:
    return decode_memory(enc.payload, enc.scales, enc.checksum, enc.n_vectors, enc.dim, dtype, record=record)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _gaussian() -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(128, 640)).astype(np.float32) * 0.5
    return quantize(x, "bfloat16")


# ----------------------------------------------------------------------------- round trips
@SETTINGS
@given(x=moderate, dtype=st.sampled_from(LOSSLESS))
def test_lossless_round_trip_is_bit_exact_on_representable_values(x: np.ndarray, dtype: str) -> None:
    q = quantize(x, dtype)
    enc = encode_memory(q, dtype)
    out = _decode(enc, dtype)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_array_equal(_bits(out), _bits(q))
    # quantize is idempotent and is exactly what the codec returns for raw input too.
    np.testing.assert_array_equal(_bits(quantize(q, dtype)), _bits(q))
    np.testing.assert_array_equal(_bits(_decode(encode_memory(x, dtype), dtype)), _bits(q))


@SETTINGS
@given(x=wide)
def test_float32_round_trip_is_bit_exact(x: np.ndarray) -> None:
    out = _decode(encode_memory(x, "float32", level=1), "float32")
    np.testing.assert_array_equal(_bits(out), _bits(x))


@SETTINGS
@given(x=wide)
def test_bfloat16_rounding_matches_torch(x: np.ndarray) -> None:
    expected = torch.tensor(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(_bits(quantize(x, "bfloat16")), _bits(expected))
    torch_bits = torch.tensor(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(to_bfloat16_bits(x), torch_bits)


def test_bfloat16_ties_round_to_even_and_bits_round_trip() -> None:
    # 1 + 2^-8 is exactly halfway between bf16 1.0 and 1 + 2^-7: ties go to the even mantissa (1.0).
    # 1 + 3*2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): goes up.
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20], dtype=np.float32)
    out = from_bfloat16_bits(to_bfloat16_bits(x))
    np.testing.assert_array_equal(out, np.array([1.0, 1 + 2**-6, -1.0, 1 + 2**-7], dtype=np.float32))
    all_bits = np.arange(0, 2**16, dtype=np.uint16)
    finite = np.isfinite(from_bfloat16_bits(all_bits))
    np.testing.assert_array_equal(to_bfloat16_bits(from_bfloat16_bits(all_bits))[finite], all_bits[finite])


def test_float16_matches_numpy_astype() -> None:
    x = np.random.default_rng(3).normal(size=(7, 33)).astype(np.float32) * 100
    np.testing.assert_array_equal(quantize(x, "float16"), x.astype(np.float16).astype(np.float32))


@SETTINGS
@given(x=moderate)
def test_int8_error_is_at_most_half_a_step_per_element(x: np.ndarray) -> None:
    enc = encode_memory(x, "int8")
    out = _decode(enc, "int8")
    assert enc.scales is not None and len(enc.scales) == 4 * x.shape[0]
    scales = np.frombuffer(enc.scales, dtype="<f4")
    absmax = np.abs(x).max(axis=1)
    expected = (absmax / np.float32(127)).astype(np.float32)
    normal = expected > 0  # a subnormal absmax whose /127 underflows gets the smallest positive scale
    np.testing.assert_array_equal(scales[normal], expected[normal])
    assert ((scales > 0) == (absmax > 0)).all()
    err = np.abs(x.astype(np.float64) - out.astype(np.float64))
    bound = scales.astype(np.float64)[:, None] * (0.5 + 1e-5)  # + float32 rounding of q * scale
    assert (err <= bound).all()
    np.testing.assert_array_equal(quantize(x, "int8"), out)


@pytest.mark.parametrize("dtype", CODEC_DTYPES)
def test_all_zero_vector_decodes_to_zeros(dtype: str) -> None:
    x = np.zeros((3, 16), dtype=np.float32)
    x[1] = np.linspace(-2, 2, 16)
    out = _decode(encode_memory(x, dtype), dtype)
    assert (out[0] == 0).all() and (out[2] == 0).all()
    assert np.abs(out[1] - x[1]).max() <= 2 / 127
    if dtype == "int8":
        assert np.frombuffer(encode_memory(x, dtype).scales, dtype="<f4")[0] == 0.0


def test_non_float_input_is_converted_and_output_is_writable_float32() -> None:
    x = np.arange(12, dtype=np.int64).reshape(3, 4)
    out = _decode(encode_memory(x, DEFAULT_DTYPE), DEFAULT_DTYPE)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, x.astype(np.float32))
    out[0, 0] = 5.0  # callers may normalise in place


def test_encode_many_and_decode_many_round_trip() -> None:
    rng = np.random.default_rng(5)
    mems = [quantize(rng.normal(size=(m, 8)).astype(np.float32), "bfloat16") for m in (1, 4, 9)]
    encs = encode_many(mems, "bfloat16", 5)
    assert [e.n_vectors for e in encs] == [1, 4, 9] and all(e.dim == 8 for e in encs)
    for got, want in zip(decode_many(encs, "bfloat16", records=["a", "b", "c"]), mems):
        np.testing.assert_array_equal(got, want)
    broken = [encs[0], EncodedMemory(encs[1].payload, None, encs[1].checksum ^ 1, 4, 8)]
    with pytest.raises(CorruptRecordError, match="doc-7"):
        decode_many(broken, "bfloat16", records=["doc-1", "doc-7"])


def test_threads_share_nothing_unsafe() -> None:
    rng = np.random.default_rng(9)
    mems = [rng.normal(size=(16, 64)).astype(np.float32) for _ in range(32)]

    def work(i: int) -> np.ndarray:
        return _decode(encode_memory(mems[i], "float32", level=(i % 5) + 1), "float32")

    with ThreadPoolExecutor(max_workers=4) as pool:
        outs = list(pool.map(work, range(len(mems))))
    for got, want in zip(outs, mems):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- corruption
@SETTINGS
@given(
    x=arrays(np.float32, shapes, elements=st.floats(-10, 10, width=32)),
    dtype=st.sampled_from(CODEC_DTYPES),
    pos=st.floats(0, 1, exclude_max=True),
)
def test_flipped_payload_byte_is_detected(x: np.ndarray, dtype: str, pos: float) -> None:
    enc = encode_memory(x, dtype)
    payload = bytearray(enc.payload)
    payload[int(pos * len(payload))] ^= 0xFF
    with pytest.raises(CorruptRecordError, match="passage-42"):
        decode_memory(bytes(payload), enc.scales, enc.checksum, enc.n_vectors, enc.dim, dtype,
                      record="passage-42")


@pytest.mark.parametrize("dtype", CODEC_DTYPES)
def test_truncated_payload_is_corrupt_and_keeps_cause(dtype: str) -> None:
    enc = encode_memory(np.random.default_rng(1).normal(size=(6, 24)), dtype)
    with pytest.raises(CorruptRecordError, match="shard-3/row-9") as info:
        decode_memory(enc.payload[:-4], enc.scales, enc.checksum, 6, 24, dtype, record="shard-3/row-9")
    assert info.value.__cause__ is not None
    with pytest.raises(CorruptRecordError, match="row-0"):
        decode_memory(b"", enc.scales, enc.checksum, 6, 24, dtype, record="row-0")


def test_wrong_checksum_shape_and_scales_are_detected() -> None:
    enc = encode_memory(np.random.default_rng(2).normal(size=(4, 8)), "int8")
    args = (enc.payload, enc.scales, enc.checksum, 4, 8, "int8")
    with pytest.raises(CorruptRecordError, match="r1.*checksum"):
        decode_memory(*args[:2], enc.checksum ^ 0x10, *args[3:], record="r1")
    with pytest.raises(CorruptRecordError, match="r2.*expected 40"):
        decode_memory(*args[:3], 4, 8 + 2, "int8", record="r2")
    bad_scales = bytearray(enc.scales)
    bad_scales[0] ^= 0x01
    with pytest.raises(CorruptRecordError, match="r3.*checksum"):
        decode_memory(enc.payload, bytes(bad_scales), *args[2:], record="r3")
    with pytest.raises(CorruptRecordError, match="r4.*scales"):
        decode_memory(enc.payload, None, *args[2:], record="r4")


def test_checksum_stored_as_signed_int32_is_accepted() -> None:
    x = np.random.default_rng(11).normal(size=(5, 5)).astype(np.float32)
    enc = encode_memory(x, "float32")
    assert 0 <= enc.checksum < 2**32
    signed = int(np.array([enc.checksum], dtype=np.uint32).view(np.int32)[0])
    out = decode_memory(enc.payload, None, signed, 5, 5, "float32")
    np.testing.assert_array_equal(out, x)


# ----------------------------------------------------------------------------- input validation
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", CODEC_DTYPES)
def test_non_finite_input_is_rejected(bad: float, dtype: str) -> None:
    x = np.ones((2, 3), dtype=np.float32)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite.*fp16 overflow.*bfloat16") as info:
        encode_memory(x, dtype)
    assert not isinstance(info.value, CorruptRecordError)


def test_values_overflowing_the_dtype_are_rejected() -> None:
    x = np.full((1, 2), 1e5, dtype=np.float32)
    with pytest.raises(ValueError, match="overflow float16"):
        encode_memory(x, "float16")
    np.testing.assert_array_equal(_decode(encode_memory(x, "bfloat16"), "bfloat16"), quantize(x, "bfloat16"))
    with pytest.raises(ValueError, match="overflow bfloat16"):
        encode_memory(np.full((1, 1), 3.4e38, dtype=np.float32), "bfloat16")


@pytest.mark.parametrize("shape", [(5,), (0, 4), (3, 0), (2, 2, 2)])
def test_bad_shapes_are_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2-D array"):
        encode_memory(np.ones(shape, dtype=np.float32))


def test_unknown_dtype_is_rejected_everywhere() -> None:
    x = np.ones((2, 2), dtype=np.float32)
    enc = encode_memory(x)
    for call in (
        lambda: encode_memory(x, "fp8"),
        lambda: quantize(x, "float64"),
        lambda: decode_memory(enc.payload, None, enc.checksum, 2, 2, "bf16"),
    ):
        with pytest.raises(ValueError, match="bfloat16, float16, float32, int8"):
            call()


# ----------------------------------------------------------------------------- compression
def test_compression_level_is_honoured() -> None:
    x = np.tile(quantize(np.linspace(-1, 1, 64, dtype=np.float32)[None, :], "bfloat16"), (64, 1))
    fast, best = encode_memory(x, "bfloat16", level=1), encode_memory(x, "bfloat16", level=19)
    assert encoded_nbytes(best) <= encoded_nbytes(fast) < 2 * x.size
    np.testing.assert_array_equal(_decode(best, "bfloat16"), x)
    for bad in (0, 23, 2.5, True):
        with pytest.raises(ValueError, match="level"):
            encode_memory(x, "bfloat16", level=bad)


@pytest.mark.parametrize("dtype", CODEC_DTYPES)
def test_gaussian_memory_compresses_below_raw_bfloat16(dtype: str) -> None:
    x = _gaussian()
    enc = encode_memory(x, dtype)
    assert encoded_nbytes(enc) < 2 * x.size  # raw bfloat16 bytes (data is bf16-representable)
    np.testing.assert_array_equal(_decode(enc, dtype), quantize(x, dtype))
