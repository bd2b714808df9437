"""Random T5Gemma2 checkpoints for offline use: a tiny one for tests and demos, one of the real Nano shape for benchmarks.

Both are written with transformers' own classes and `save_pretrained`, so every command loads them exactly as it
loads a real checkpoint. The tokenizer is byte-level BPE (exact round trip of any text) with Gemma's special tokens
as single tokens and "yes"/"no" as single ordinary tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, T5Gemma2Config, T5Gemma2ForConditionalGeneration

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
_MERGES = [("y", "e"), ("ye", "s"), ("n", "o"), ("Ġ", "t"), ("Ġ", "a"), ("e", "r"), ("i", "n"), ("o", "n")]

NANO_TEXT_SHAPE = {  # google/t5gemma-2-270m-270m text config (see shared/NANO_SHAPE.md)
    "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "max_position_embeddings": 32768,
    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
}


def build_tokenizer(words=()) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Gemma's special tokens. With ``words`` (ASCII), a byte-level Unigram model instead whose
    vocabulary also holds each word (bare and space-prefixed) as one token, for realistic sequence lengths."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    if words:
        pieces = [(t, -10.0) for t in vocab] + [(w, -1.0) for word in words for w in (word, "Ġ" + word)]
        tok = Tokenizer(models.Unigram(list(dict(pieces).items()), unk_id=vocab["<unk>"]))
    else:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"], padding_side="right",
    )


def _nano_words() -> list[str]:
    """Words of the prompt template and of common English/docstring text: with them the Nano-shape benchmark model
    sees prompts of about the length Gemma's tokenizer gives (~1 token per word), not one token per byte."""
    from kalm_batch.prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_INSTRUCTION

    text = DEFAULT_SYSTEM_INSTRUCTION + " " + DEFAULT_INSTRUCTION + " Document Instruct Query user model " + (
        "the of and to in is a that for it as with be on by this are or an not from at which return returns "
        "if file line read how do I strip newline characters value object function class module list string "
        "default none true false name data type new set get all one when can may will use used path error")
    return sorted({w.strip('.,:"<>()') for w in text.split() if w.strip('.,:"<>()').isascii()} - {""})


def _tiny_text(vocab_size: int) -> dict:
    return {
        "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16,
        "sliding_window": 8, "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "max_position_embeddings": 4096,
        "final_logit_softcapping": 5.0,  # exercised on purpose: the score must apply the config's soft-capping
    }


def build_config(shape: str, vocab_size: int) -> T5Gemma2Config:
    """A T5Gemma2 config of the 'tiny' or 'nano' shape with a one-layer, width-8 vision tower."""
    if shape == "tiny":
        text = _tiny_text(vocab_size)
    elif shape == "nano":
        text = dict(NANO_TEXT_SHAPE)
    else:
        raise ValueError(f"unknown shape {shape!r}; use 'tiny' or 'nano'")
    text.update(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vocab = text["vocab_size"]
    vision = {"model_type": "siglip_vision_model", "hidden_size": 8, "intermediate_size": 16,
              "num_hidden_layers": 1, "num_attention_heads": 1, "image_size": 16, "patch_size": 8}
    special = {"boi_token_index": vocab - 3, "eoi_token_index": vocab - 2, "image_token_index": vocab - 1}
    return T5Gemma2Config(
        encoder=dict(text_config=text, vision_config=vision, mm_tokens_per_image=4, **special),
        decoder=dict(text), image_token_index=special["image_token_index"],
    )


def write_random_model(out_dir: str | Path, shape: str = "tiny", seed: int = 0,
                       dtype: torch.dtype = torch.float32, tie_word_embeddings: bool = True,
                       max_shard_size: str | None = None) -> Path:
    """Write a random-weight T5Gemma2 checkpoint and the byte-level tokenizer to ``out_dir``.

    ``tie_word_embeddings=False`` writes separate decoder embeddings and an ``lm_head``; ``max_shard_size`` (e.g.
    "50KB") writes a sharded checkpoint with ``model.safetensors.index.json`` — the layouts a real checkpoint may have.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(_nano_words() if shape == "nano" else ())
    vocab = len(tokenizer) + 16 if shape == "tiny" else NANO_TEXT_SHAPE["vocab_size"]
    torch.manual_seed(seed)
    config = build_config(shape, vocab)
    config.tie_word_embeddings = tie_word_embeddings
    model = T5Gemma2ForConditionalGeneration(config).to(dtype)
    _make_interesting(model, seed)
    model.save_pretrained(str(out), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(str(out))
    return out


def _make_interesting(model: T5Gemma2ForConditionalGeneration, seed: int) -> None:
    """Random init gives RMSNorm weights of 0 and near-identical logits; spread them so scores differ visibly."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
