"""Every checkpoint layout a real KaLM-Reranker-V1 checkpoint may have loads into kalm-batch's halves with exactly the
tensors ``AutoModelForSeq2SeqLM.from_pretrained`` gives on the same folder; keys that fit no layout are an error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSeq2SeqLM

from kalm_batch import CheckpointError
from kalm_batch.model import load_config, load_decoder, load_encoder, load_tokenizer, yes_no_ids
from kalm_batch.tiny import write_random_model

CPU = torch.device("cpu")


def _to_text_model_keys(model_dir):
    """The alternative layout: encoder keys named after the module tree (model.encoder.text_model.*)."""
    path = model_dir / "model.safetensors"
    t = load_file(str(path))
    for k in list(t):
        if k.startswith("model.encoder.") and not k.startswith(("model.encoder.vision", "model.encoder.multi")):
            t["model.encoder.text_model." + k[len("model.encoder."):]] = t.pop(k)
    save_file(t, str(path), metadata={"format": "pt"})


LAYOUTS = {
    "tied": {},
    "untied-lm-head": {"tie_word_embeddings": False},
    "sharded": {"max_shard_size": "40KB"},
    "sharded-untied": {"max_shard_size": "40KB", "tie_word_embeddings": False},
    "saved-in-bf16": {"dtype": torch.bfloat16},
    "text-model-keys": {},
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tmp_path_factory):
    out = write_random_model(tmp_path_factory.mktemp(request.param) / "model", seed=3, **LAYOUTS[request.param])
    if request.param == "text-model-keys":
        _to_text_model_keys(out)
    return request.param, out


def test_the_layouts_are_what_they_claim(layout):
    name, model_dir = layout
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    keys = set()
    for f in files:
        keys |= set(load_file(str(model_dir / f)))
    assert (len(files) > 1) == name.startswith("sharded")
    assert (model_dir / "model.safetensors.index.json").exists() == name.startswith("sharded")
    untied = "untied" in name
    assert ("lm_head.out_proj.weight" in keys) == untied
    assert ("model.decoder.embed_tokens.weight" in keys) == untied
    assert any(k.startswith("model.encoder.text_model.") for k in keys) == (name == "text-model-keys")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_tensor_equals_from_pretrained(layout, dtype):
    _, model_dir = layout
    ref = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir), dtype=dtype)
    config = load_config(model_dir)
    yes_no = yes_no_ids(load_tokenizer(model_dir))
    enc = load_encoder(model_dir, dtype, CPU, config)
    half = load_decoder(model_dir, yes_no, dtype, CPU, config)
    for ours, theirs in ((enc, ref.model.encoder.text_model), (half.decoder, ref.model.decoder)):
        want = theirs.state_dict()
        got = ours.state_dict()
        assert got.keys() == want.keys()
        differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
        assert not differ, differ[:10]
    rows = ref.lm_head.out_proj.weight[list(yes_no)]
    assert half.yes_no_weight.dtype == rows.dtype and torch.equal(half.yes_no_weight, rows)


def test_keys_that_fit_no_layout_are_named(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    path = model_dir / "model.safetensors"
    t = load_file(str(path))
    for k in list(t):
        if k.startswith("model."):
            t[k[len("model."):]] = t.pop(k)  # "encoder.layers.0...", as a bare T5Gemma2Model would save
    save_file(t, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected weights .*'decoder\.embed_tokens|unexpected weights .*"
                                              r"'decoder\.layers\.0"):
        load_encoder(model_dir, torch.float32, CPU)
    with pytest.raises(CheckpointError, match="unexpected weights"):
        load_decoder(model_dir, (1, 2), torch.float32, CPU)


def test_a_sharded_index_pointing_at_a_missing_file_is_an_error(tmp_path):
    model_dir = write_random_model(tmp_path / "model", max_shard_size="40KB")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    victim = min(set(index["weight_map"].values()))
    (model_dir / victim).unlink()
    with pytest.raises(CheckpointError, match=f"names shard.s. that are not there: \\['{victim}'\\]"):
        load_encoder(model_dir, torch.float32, CPU)
    with pytest.raises(CheckpointError, match=victim):
        load_decoder(model_dir, (1, 2), torch.float32, CPU)
