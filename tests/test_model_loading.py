"""Strict checkpoint loading, tokenizer set-up and the yes/no contract."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kalm_batch import CheckpointError, KaLMReranker
from kalm_batch.codec import decode_memory, encode_memory
from kalm_batch.model import load_config, load_decoder, load_encoder, load_tokenizer, yes_no_ids
from kalm_batch.reranker import Memory


def _copy(tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    return out


def _edit_weights(model_dir, fn):
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("key,stage", [
    ("model.decoder.layers.0.mlp.up_proj.weight", "decoder"),
    ("model.encoder.layers.1.self_attn.q_proj.weight", "encoder"),
    ("model.encoder.norm.weight", "encoder"),
])
def test_missing_weight_is_an_error_naming_it(tiny_model_dir, tmp_path, key, stage):
    model_dir = _copy(tiny_model_dir, tmp_path)
    _edit_weights(model_dir, lambda t: t.pop(key))
    r = KaLMReranker(str(model_dir))
    short = key.split(".", 2)[2]  # the key inside the half that needs it
    with pytest.raises(CheckpointError, match="missing") as e:
        r.encode(["a"]) if stage == "encoder" else r.score("q", [Memory(torch.zeros(1, r.hidden_size), 1, 4)])
    assert short in str(e.value)


def test_unexpected_text_weight_is_an_error(tiny_model_dir, tmp_path):
    model_dir = _copy(tiny_model_dir, tmp_path)
    _edit_weights(model_dir, lambda t: t.__setitem__("model.decoder.layers.9.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="layers.9.extra.weight"):
        load_decoder(model_dir, (1, 2), torch.float32, torch.device("cpu"))
    _edit_weights(model_dir, lambda t: t.pop("model.decoder.layers.9.extra.weight"))
    _edit_weights(model_dir, lambda t: t.__setitem__("classifier.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="classifier.weight"):
        load_encoder(model_dir, torch.float32, torch.device("cpu"))


def test_vision_weights_are_skipped_and_not_required(tiny_model_dir, tmp_path):
    model_dir = _copy(tiny_model_dir, tmp_path)
    _edit_weights(model_dir, lambda t: [t.pop(k) for k in list(t) if "vision_tower" in k or "multi_modal" in k])
    enc = load_encoder(model_dir, torch.float32, torch.device("cpu"))
    assert not any("vision" in n for n, _ in enc.named_parameters())
    ours = KaLMReranker(str(model_dir), dtype="float32")
    full = KaLMReranker(str(tiny_model_dir), dtype="float32")
    pairs = [("q", "a passage"), ("q", "another one")]
    assert np.array_equal(ours.predict(pairs), full.predict(pairs))


def test_text_model_key_format_is_accepted(tiny_model_dir, tmp_path):
    """Checkpoints saved with the module names (model.encoder.text_model.*) load the same weights."""
    model_dir = _copy(tiny_model_dir, tmp_path)

    def rename(t):
        for k in list(t):
            if k.startswith("model.encoder.") and not k.startswith(("model.encoder.vision", "model.encoder.multi")):
                t["model.encoder.text_model." + k[len("model.encoder."):]] = t.pop(k)
    _edit_weights(model_dir, rename)
    pairs = [("q", "a passage")]
    a = KaLMReranker(str(model_dir), dtype="float32").predict(pairs)
    b = KaLMReranker(str(tiny_model_dir), dtype="float32").predict(pairs)
    assert np.array_equal(a, b)


def test_not_a_t5gemma2_checkpoint(tiny_model_dir, tmp_path):
    model_dir = _copy(tiny_model_dir, tmp_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"] = "t5"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="is a 't5' model; KaLM-Reranker-V1 needs 't5gemma2'"):
        load_config(model_dir)


def test_pickle_checkpoints_are_refused(tiny_model_dir, tmp_path):
    model_dir = _copy(tiny_model_dir, tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_encoder(model_dir, torch.float32, torch.device("cpu"))


def test_yes_that_is_not_one_token_is_an_error(tiny_model_dir, tmp_path):
    model_dir = _copy(tiny_model_dir, tmp_path)
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    merges = tj["model"]["merges"]
    tj["model"]["merges"] = [m for m in merges if (m if isinstance(m, str) else " ".join(m)) != "ye s"]
    (model_dir / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(CheckpointError, match="'yes' tokenizes to 2 tokens"):
        KaLMReranker(str(model_dir))


def test_tokenizer_setup(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.padding_side == "right" and tok.pad_token == "<pad>"
    assert yes_no_ids(tok) == (tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no"))
    model_dir = _copy(tiny_model_dir, tmp_path)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pad_token"] = None
    cfg_path.write_text(json.dumps(cfg))
    tok = load_tokenizer(model_dir)
    assert tok.pad_token == tok.eos_token == "<eos>"


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        KaLMReranker(str(tmp_path / "nope"))


def _kendall_tau(a, b):
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
    return s / (n * (n - 1) / 2)


def test_int8_memories_agree_with_float32(tiny_model_dir):
    """Lossy int8 memories keep the ranking close to float32 (Kendall tau reported in the assertion message)."""
    ours = KaLMReranker(str(tiny_model_dir), dtype="float32", max_length=128)
    docs = [f"passage {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 7) + str(i * 7919) for i in range(40)]
    mems = ours.encode(docs)

    def via(dtype):
        out = []
        for m in mems:
            e = encode_memory(m.to_numpy(), dtype=dtype)
            out.append(Memory(torch.from_numpy(decode_memory(e.payload, e.scales, e.checksum, e.n_vectors, e.dim,
                                                             dtype)), m.n_tokens, m.ratio))
        return ours.score("lorem ipsum 42", out).p_yes

    fp32, bf16, int8 = via("float32"), via("bfloat16"), via("int8")
    tau_int8, tau_bf16 = _kendall_tau(fp32, int8), _kendall_tau(fp32, bf16)
    assert tau_int8 >= 0.9, f"Kendall tau int8 vs fp32 = {tau_int8:.3f}"
    assert tau_bf16 >= 0.95, f"Kendall tau bf16 vs fp32 = {tau_bf16:.3f}"
    assert np.max(np.abs(int8 - fp32)) < 0.02
