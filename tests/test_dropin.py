"""Drop-in parity with the official ``KaLMReranker`` wherever it defines behaviour (empty inputs, argument checks,
return types, chunk sizes, from_pretrained keyword arguments, devices)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from kalm_batch import KaLMReranker, Memory
from tests.official_reference import OfficialStyleReranker

DOCS = ["Serialize obj to a JSON formatted str.", "json.loads parses a JSON document.", "x", "lorem ipsum " * 9]
QUERY = "how do I serialize an object to JSON?"


@pytest.fixture(scope="module")
def ours(tiny_model_dir):
    return KaLMReranker(str(tiny_model_dir), dtype="float32", max_length=64)


def test_empty_inputs_give_empty_results(ours):
    assert ours.predict([]) == []
    assert ours.rank(QUERY, []) == []
    empty = ours.predict([], convert_to_numpy=True)
    assert isinstance(empty, np.ndarray) and empty.shape == (0,) and empty.dtype == np.float32
    scores = ours.predict_scores([])
    assert scores.p_yes.shape == scores.margin.shape == (0,)


def test_predict_returns_a_list_of_floats_or_a_float32_array(ours):
    pairs = [(QUERY, d) for d in DOCS]
    listed = ours.predict(pairs)
    assert isinstance(listed, list) and len(listed) == len(DOCS) and all(type(x) is float for x in listed)
    arr = ours.predict(pairs, convert_to_numpy=True)
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.shape == (len(DOCS),)
    assert arr.tolist() == listed
    both = ours.predict_scores(pairs)
    assert both.p_yes.tolist() == listed
    assert np.allclose(1 / (1 + np.exp(-both.margin)), both.p_yes, atol=1e-6)  # P(yes) = sigmoid(margin)


def test_rank_checks_its_arguments_like_the_official(ours):
    with pytest.raises(TypeError, match="documents must be a list of strings, got str"):
        ours.rank(QUERY, "abc")
    with pytest.raises(TypeError, match=r"documents\[1\] must be a string"):
        ours.rank(QUERY, ["a", 3])
    with pytest.raises(TypeError, match="query must be a string"):
        ours.rank(None, DOCS)
    with pytest.raises(ValueError, match="top_k must be a non-negative integer"):
        ours.rank(QUERY, DOCS, top_k=-1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ours.rank(QUERY, DOCS, batch_size=0)
    assert ours.rank(QUERY, DOCS, top_k=0) == []


def test_rank_accepts_batch_size_and_orders_by_score(ours):
    full = ours.rank(QUERY, DOCS)
    small = ours.rank(QUERY, DOCS, batch_size=1, top_k=2)
    assert [x["corpus_id"] for x in small] == [x["corpus_id"] for x in full][:2]
    scores = ours.predict([(QUERY, d) for d in DOCS])
    assert [x["corpus_id"] for x in full] == sorted(range(len(DOCS)), key=lambda i: -scores[i])
    assert [x["score"] for x in full] == sorted(scores, reverse=True)


@pytest.mark.parametrize("chunk", [3, 5, 64])
def test_any_positive_chunk_size_works_and_untrained_ones_warn(tiny_model_dir, caplog, chunk):
    with caplog.at_level(logging.WARNING, logger="kalm_batch.pooling"):
        r = KaLMReranker(str(tiny_model_dir), dtype="float32", chunk_size=chunk, max_length=64)
    assert f"chunk_size/ratio {chunk} is not one KaLM-Reranker-V1 was trained with" in caplog.text
    ref = OfficialStyleReranker(tiny_model_dir, dtype=torch.float32, chunk_size=chunk, max_length=64)
    pairs = [(QUERY, d) for d in DOCS]
    assert np.max(np.abs(np.asarray(r.predict(pairs)) - ref.predict(pairs))) <= 1e-5
    mem = r.encode([DOCS[3]])[0]
    assert mem.vectors.shape[0] == -(-mem.n_tokens // chunk)


def test_trained_chunk_sizes_do_not_warn(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="kalm_batch.pooling"):
        for chunk in (None, 1, 2, 4, 8, 16, 32):
            KaLMReranker(str(tiny_model_dir), chunk_size=chunk)
    assert "not one KaLM-Reranker-V1 was trained with" not in caplog.text


@pytest.mark.parametrize("r0,k", [(4, 16), (2, 24), (1, 48), (3, 5)])
def test_memory_at_r0_reads_at_any_multiple(ours, r0, k):
    base = ours.encode(DOCS, ratio=r0)
    direct = ours.encode(DOCS, ratio=k * r0)
    for b, d in zip(base, direct):
        c = b.at_ratio(k * r0)
        assert c.ratio == k * r0 and c.vectors.shape == d.vectors.shape
        assert torch.max(torch.abs(c.vectors - d.vectors)) <= 1e-6
    if r0 > 1:
        with pytest.raises(ValueError, match=f"r must be a multiple of {r0}"):
            base[0].at_ratio(k * r0 + 1)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementation_reaches_both_halves(tiny_model_dir, impl):
    r = KaLMReranker(str(tiny_model_dir), dtype="float32", attn_implementation=impl, max_length=64)
    r.encode(["a passage"])
    r.score(QUERY, [Memory(torch.zeros(2, r.hidden_size), 5, 4)])
    assert r.encoder.config._attn_implementation == impl
    assert r.decoder_half.decoder.config._attn_implementation == impl


def test_attention_implementations_give_the_same_scores(tiny_model_dir):
    pairs = [(QUERY, d) for d in DOCS]
    eager = KaLMReranker(str(tiny_model_dir), dtype="float32", attn_implementation="eager").predict(pairs)
    sdpa = KaLMReranker(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa").predict(pairs)
    assert np.max(np.abs(np.asarray(eager) - np.asarray(sdpa))) <= 1e-5


def test_unknown_keyword_arguments_are_named(tiny_model_dir):
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['load_in_8bit', 'quantization'\]"):
        KaLMReranker(str(tiny_model_dir), load_in_8bit=True, quantization="x")
    with pytest.raises(TypeError, match="attn_implementation must be a string"):
        KaLMReranker(str(tiny_model_dir), attn_implementation=3)


def test_torch_dtype_is_the_old_name_of_dtype(tiny_model_dir):
    assert KaLMReranker(str(tiny_model_dir), torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert KaLMReranker(str(tiny_model_dir), torch_dtype="float16").dtype == torch.float16
    with pytest.raises(TypeError, match="disagree"):
        KaLMReranker(str(tiny_model_dir), dtype="float32", torch_dtype="bfloat16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_without_cuda_fails_in_the_constructor(tiny_model_dir, device):
    with pytest.raises(RuntimeError, match="CUDA is not available on this machine"):
        KaLMReranker(str(tiny_model_dir), device=device)
