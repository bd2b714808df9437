"""Checkpoint loading for KaLM-Reranker-V1 (T5Gemma2): tokenizer, strict half-model loads, model fingerprint.

Each stage loads only what it needs from the checkpoint's safetensors: encoding workers build the text encoder,
scorers build the decoder plus the two lm_head rows for "yes" and "no". The vision tower is never built. Loading is
strict: a text-model weight that is missing from the checkpoint, or a checkpoint weight that belongs to no text
module, is an error naming the keys (vision-tower weights are skipped on purpose).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer
from transformers.models.t5gemma2.modeling_t5gemma2 import T5Gemma2Decoder, T5Gemma2TextEncoder

from kalm_batch.prompts import NO_TOKEN, YES_TOKEN

DEFAULT_MODEL = "KaLM-Embedding/KaLM-Reranker-V1-Nano"
_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_SKIPPED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.multi_modal_projector.")
_ENCODER_PREFIX = "model.encoder."
_DECODER_PREFIX = "model.decoder."
_LM_HEAD_KEY = "lm_head.out_proj.weight"


class CheckpointError(ValueError):
    """The checkpoint does not hold what KaLM-Reranker-V1 needs."""


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies the weights and tokenizer that made a memory (stored in every store's table metadata)."""

    model_id: str
    revision: str | None
    config_sha256: str
    tokenizer_sha256: str
    weights_sha256: str

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, other: ModelFingerprint | dict) -> list[str]:
        """Identity fields that differ. The id and revision are names: the same files under another path or id
        are the same model, so only the config, tokenizer and weights hashes decide."""
        a = self.to_dict()
        b = other if isinstance(other, dict) else other.to_dict()
        return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in IDENTITY_FIELDS if a.get(k) != b.get(k)]


IDENTITY_FIELDS = ("config_sha256", "tokenizer_sha256", "weights_sha256")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA and float32 on CPU by default; accepts names like 'bf16' or torch dtypes."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use bfloat16, float16 or float32")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bfloat16, float16, float32") from None


def resolve_device(device: str | torch.device | None, check_available: bool = False) -> torch.device:
    """CUDA when there is one, else CPU; with ``check_available``, a CUDA device this machine lacks is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if check_available and resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={str(device)!r} was requested but CUDA is not available on this machine; "
                               "use device='cpu' (or leave device unset)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise RuntimeError(f"device={str(device)!r} was requested but this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s)")
    return resolved


def resolve_model_dir(model_name_or_path: str, revision: str | None = None) -> tuple[Path, str | None]:
    """A local checkpoint directory, or a hub id downloaded (safetensors, configs, tokenizer files only)."""
    path = Path(model_name_or_path).expanduser()
    if path.is_dir():
        return path.resolve(), revision
    if path.exists() or model_name_or_path.startswith((".", "/")):
        raise FileNotFoundError(f"model path {model_name_or_path!r} is not a checkpoint directory")
    from huggingface_hub import snapshot_download

    local = snapshot_download(
        model_name_or_path, revision=revision,
        allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
    )
    return Path(local), Path(local).name  # the snapshot folder is named by the commit hash


_DIGEST_CACHE = Path(os.environ.get("KALM_CACHE_DIR", Path.home() / ".cache" / "kalm_batch")) / "file-digests.json"


def _file_digest(p: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so actors do not re-hash a multi-GB checkpoint."""
    st = p.stat()
    key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(_DIGEST_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    with open(p, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    cache[key] = digest
    try:
        _DIGEST_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = _DIGEST_CACHE.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, _DIGEST_CACHE)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return digest


def _sha256_of(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(bytes.fromhex(_file_digest(p)))
    return h.hexdigest()


def fingerprint(model_dir: Path, model_id: str, revision: str | None) -> ModelFingerprint:
    tok_files = [p for p in model_dir.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))
                 or p.suffix == ".model"]
    weights = sorted(model_dir.glob("*.safetensors"))
    return ModelFingerprint(
        model_id=model_id, revision=revision,
        config_sha256=_sha256_of([model_dir / "config.json"]),
        tokenizer_sha256=_sha256_of(tok_files) if tok_files else "none",
        weights_sha256=_sha256_of(weights) if weights else "none",
    )


def load_tokenizer(model_dir: Path | str):
    """The reference tokenizer set-up: right padding; pad falls back to eos; neither is an error."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "right"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise CheckpointError(f"tokenizer in {model_dir} has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token
    return tok


def yes_no_ids(tokenizer) -> tuple[int, int]:
    """Ids of "yes" and "no"; each must be exactly one token."""
    ids = []
    for word in (YES_TOKEN, NO_TOKEN):
        toks = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise CheckpointError(
                f"{word!r} tokenizes to {len(toks)} tokens {toks}; KaLM-Reranker needs it to be exactly one token "
                "(is this the right tokenizer?)")
        ids.append(toks[0])
    return ids[0], ids[1]


def load_config(model_dir: Path):
    config = AutoConfig.from_pretrained(str(model_dir))
    if config.model_type != "t5gemma2":
        raise CheckpointError(f"{model_dir} is a {config.model_type!r} model; KaLM-Reranker-V1 needs 't5gemma2'")
    return config


class Checkpoint:
    """Lazy access to a checkpoint's safetensors (single file or sharded index). Never unpickles."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: model_dir / f for k, f in weight_map.items()}
            absent = sorted({p.name for p in self.files.values() if not p.is_file()})
            if absent:
                raise CheckpointError(f"{index.name} in {model_dir} names shard(s) that are not there: {absent}; "
                                      "download the whole checkpoint")
        elif single.exists():
            with safe_open(str(single), "pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise CheckpointError(f"no model.safetensors(.index.json) in {model_dir}; only safetensors are loaded")

    def keys(self) -> set[str]:
        return set(self.files)

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        for file, ks in by_file.items():
            with safe_open(str(file), "pt") as f:
                for k in ks:
                    out[k] = f.get_tensor(k)
        return out


def _encoder_key(key: str) -> str | None:
    """Map an on-disk encoder key to the text encoder's state-dict key (both save formats are accepted)."""
    if not key.startswith(_ENCODER_PREFIX) or key.startswith(_SKIPPED_PREFIXES):
        return None
    rest = key[len(_ENCODER_PREFIX):]
    return rest.removeprefix("text_model.")


def check_unexpected(ckpt: Checkpoint) -> None:
    """Every checkpoint key must belong to a known part of the model."""
    known = (*_SKIPPED_PREFIXES, _ENCODER_PREFIX, _DECODER_PREFIX)
    odd = sorted(k for k in ckpt.files if not (k.startswith(known) or k == _LM_HEAD_KEY))
    if odd:
        raise CheckpointError(f"checkpoint has unexpected weights (not part of T5Gemma2's text model): {odd[:20]}")


def _fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str, model_dir: Path) -> None:
    expected = set(module.state_dict())
    missing = sorted(expected - tensors.keys())
    unexpected = sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{what} weights in {model_dir} do not match the model: missing {missing[:20]}, unexpected "
            f"{unexpected[:20]} (a random init is never used; is the checkpoint complete?)")
    module.load_state_dict(tensors, strict=True)


def _build(cls, config, eoi: int, dtype: torch.dtype, attn_implementation: str | None = None):
    """An empty half built as ``from_pretrained(dtype=...)`` builds it: parameters in ``dtype``, buffers as the
    module makes them under that default dtype (RoPE ``inv_freq`` tables stay float32, ``embed_scale`` follows)."""
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(config)  # _from_config writes dtype / attention choice into the config it is given
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with no_init_weights():
        module = cls._from_config(config, eoi_token_index=eoi, dtype=dtype, **extra)
    return module


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Floating-point parameters to ``dtype``, buffers untouched (``module.to(dtype)`` would also round the float32
    RoPE tables to bfloat16/float16 and move every score away from the official model's)."""
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype=dtype)
    return module


def _place(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Cast parameters only, then move (``.to(device)`` keeps every tensor's dtype)."""
    return cast_parameters(module, dtype).to(device=device).eval()


def load_encoder(model_dir: Path, dtype: torch.dtype, device: torch.device, config=None,
                 attn_implementation: str | None = None) -> T5Gemma2TextEncoder:
    """The text encoder alone (no vision tower, no decoder): parameters in ``dtype``, buffers as from_pretrained."""
    config = config or load_config(model_dir)
    ckpt = Checkpoint(model_dir)
    check_unexpected(ckpt)
    wanted = {k: mk for k in ckpt.files if (mk := _encoder_key(k)) is not None}
    loaded = ckpt.load(list(wanted))
    tensors = {wanted[k]: v for k, v in loaded.items()}
    encoder = _build(T5Gemma2TextEncoder, config.encoder.text_config, config.eoi_token_index, dtype,
                     attn_implementation)
    _fill(encoder, tensors, "encoder", model_dir)
    return _place(encoder, dtype, device)


@dataclass
class DecoderHalf:
    decoder: T5Gemma2Decoder
    yes_no_weight: torch.Tensor  # [2, hidden]: the lm_head rows of "yes" and "no"
    softcap: float | None


def load_decoder(model_dir: Path, yes_no: tuple[int, int], dtype: torch.dtype, device: torch.device,
                 config=None, attn_implementation: str | None = None) -> DecoderHalf:
    """The decoder plus the two lm_head rows the score needs (tied embeddings resolved like transformers does).

    Parameters and the two rows are in ``dtype`` (the rows rounded from the checkpoint exactly as the full lm_head
    would be); buffers stay as from_pretrained leaves them."""
    config = config or load_config(model_dir)
    ckpt = Checkpoint(model_dir)
    check_unexpected(ckpt)
    keys = ckpt.keys()
    dec_keys = [k for k in keys if k.startswith(_DECODER_PREFIX)]
    tensors = {k[len(_DECODER_PREFIX):]: v for k, v in ckpt.load(dec_keys).items()}
    tied = bool(config.tie_word_embeddings)
    enc_embed = {"embed_tokens.weight": "model.encoder.embed_tokens.weight",
                 "embed_tokens.eoi_embedding": "model.encoder.embed_tokens.eoi_embedding"}
    for name, enc_key in enc_embed.items():
        alt = enc_key.replace("model.encoder.", "model.encoder.text_model.")
        src = enc_key if enc_key in keys else alt if alt in keys else None
        if name not in tensors and tied and src is not None:
            tensors[name] = ckpt.load([src])[src]
    decoder = _build(T5Gemma2Decoder, config.decoder, config.eoi_token_index, dtype, attn_implementation)
    _fill(decoder, tensors, "decoder", model_dir)
    if _LM_HEAD_KEY in keys:
        head = ckpt.load([_LM_HEAD_KEY])[_LM_HEAD_KEY]
    elif tied:
        head = tensors["embed_tokens.weight"]
    else:
        raise CheckpointError(f"checkpoint in {model_dir} has no {_LM_HEAD_KEY} and does not tie embeddings")
    rows = head[list(yes_no)].to(device=device, dtype=dtype)
    softcap = getattr(config.decoder, "final_logit_softcapping", None)
    return DecoderHalf(_place(decoder, dtype, device), rows, softcap)


def model_summary(model_dir: Path) -> dict:
    """Sizes from the config (for `kalm-batch info`), without loading weights."""
    config = load_config(model_dir)
    text, dec = config.encoder.text_config, config.decoder
    return {
        "model_type": config.model_type,
        "vocab_size": dec.vocab_size,
        "hidden_size": dec.hidden_size,
        "encoder_layers": text.num_hidden_layers,
        "decoder_layers": dec.num_hidden_layers,
        "attention_heads": dec.num_attention_heads,
        "kv_heads": dec.num_key_value_heads,
        "head_dim": dec.head_dim,
        "sliding_window": dec.sliding_window,
        "final_logit_softcapping": getattr(dec, "final_logit_softcapping", None),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "safetensors_files": sorted({p.name for p in Checkpoint(model_dir).files.values()}),
    }

