"""bfloat16 / float16 fidelity: kalm-batch scores bit-equal to an official-style model loaded with
``from_pretrained(dtype=...)`` (parameters cast, buffers as loaded), one pair per batch on both sides."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from kalm_batch import KaLMReranker
from kalm_batch.model import load_config, load_decoder, load_encoder, load_tokenizer, yes_no_ids
from tests.official_reference import OfficialStyleReranker

MAX_LENGTH = 64
QUERIES = ["how do I serialize an object to JSON?", "x", "strip newline characters from every line of a file " * 3]
DOCS = [
    "Serialize obj to a JSON formatted str.",
    "y",  # with the prefix, two-ish tokens
    "Return the canonical string representation of the object. ",
    "A very long passage about the os module and environment variables. " * 6,  # truncated at MAX_LENGTH
    "Décodage UTF‑8 — ünïcödé 文档 🤖 passages are bytes too.",  # byte-level: truncated too
    "json.loads parses a JSON document into Python objects.",
]
PAIRS = [(q, d) for q in QUERIES for d in DOCS]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def official(tiny_model_dir):
    cache = {}

    def get(dtype, r):
        if (dtype, r) not in cache:
            cache[dtype, r] = OfficialStyleReranker(tiny_model_dir, dtype=DTYPES[dtype], chunk_size=r,
                                                    max_length=MAX_LENGTH)
        return cache[dtype, r]
    return get


def test_the_pairs_cover_truncated_and_short_passages(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    lengths = [len(tok("<Document>: " + d, add_special_tokens=False)["input_ids"]) for d in DOCS]
    assert sum(n > MAX_LENGTH for n in lengths) >= 2 and sum(n < MAX_LENGTH for n in lengths) >= 2
    assert min(lengths) < 16  # the prefix is 12 byte-level tokens


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("r", [None, 1, 4, 32])
def test_scores_are_bit_equal_to_the_official_model_one_pair_per_batch(tiny_model_dir, official, dtype, r):
    ours = KaLMReranker(str(tiny_model_dir), dtype=dtype, chunk_size=r, max_length=MAX_LENGTH, batch_size=1)
    got = np.asarray(ours.predict(PAIRS), dtype=np.float32)
    want = official(dtype, r).predict(PAIRS, batch_size=1)
    unequal = [(PAIRS[i][0][:20], PAIRS[i][1][:20], float(got[i]), float(want[i]))
               for i in np.flatnonzero(got != want)]
    assert not unequal, f"{len(unequal)}/{len(PAIRS)} scores differ in {dtype} at r={r}: {unequal[:5]}"
    assert len(set(got.tolist())) > len(PAIRS) // 2  # the scores are not one constant


def _buffer_dtypes(module, prefix=""):
    return {prefix + name: b.dtype for name, b in module.named_buffers()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_buffer_keeps_the_dtype_from_pretrained_gives_it(tiny_model_dir, dtype):
    ref = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_model_dir), dtype=dtype)
    want = _buffer_dtypes(ref)
    config = load_config(tiny_model_dir)
    enc = load_encoder(tiny_model_dir, dtype, torch.device("cpu"), config)
    half = load_decoder(tiny_model_dir, yes_no_ids(load_tokenizer(tiny_model_dir)), dtype, torch.device("cpu"),
                        config)
    got = {**_buffer_dtypes(enc, "model.encoder.text_model."), **_buffer_dtypes(half.decoder, "model.decoder.")}
    text_buffers = {k: v for k, v in want.items() if not k.startswith("model.encoder.vision_tower.")}
    assert got == text_buffers
    inv_freq = [k for k in got if k.endswith("inv_freq")]
    assert len(inv_freq) == 8 and all(got[k] == torch.float32 for k in inv_freq)
    assert {p.dtype for p in enc.parameters()} == {p.dtype for p in half.decoder.parameters()} == {dtype}
    assert half.yes_no_weight.dtype == dtype
    for name, b in enc.named_buffers():
        assert torch.equal(b, ref.get_buffer("model.encoder.text_model." + name)), name
    for name, b in half.decoder.named_buffers():
        assert torch.equal(b, ref.get_buffer("model.decoder." + name)), name
