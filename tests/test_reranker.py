"""The core contract: the split path (encode -> memory -> codec -> score) gives the reference scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kalm_batch import KaLMReranker, Memory
from kalm_batch.codec import decode_memory, encode_memory
from kalm_batch.prompts import DEFAULT_SYSTEM_INSTRUCTION
from tests.reference_impl import ReferenceReranker

QUERY = "how do I serialize an object to JSON?"
DOCS = [
    "Serialize obj to a JSON formatted str.",
    "x",  # with the prefix, the shortest passage here
    "Return the canonical string representation of the object. " * 3,
    "A very long passage about the os module and environment variables. " * 40,  # longer than max_length
    "Décodage UTF‑8 — ünïcödé 文档 🤖 passages are bytes too.",
    "json.loads parses a JSON document into Python objects.",
]
MAX_LENGTH = 96


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return {r: ReferenceReranker(str(tiny_model_dir), max_length=MAX_LENGTH, chunk_size=r)
            for r in (None, 1, 2, 4, 8, 16, 32)}


def _roundtrip(mem: Memory) -> Memory:
    enc = encode_memory(mem.to_numpy(), dtype="float32")
    arr = decode_memory(enc.payload, enc.scales, enc.checksum, enc.n_vectors, enc.dim, "float32")
    return Memory(torch.from_numpy(arr), mem.n_tokens, mem.ratio)


@pytest.mark.parametrize("r", [None, 1, 2, 4, 8, 16, 32])
def test_split_path_matches_reference(tiny_model_dir, reference, r):
    ours = KaLMReranker(str(tiny_model_dir), max_length=MAX_LENGTH, chunk_size=r, dtype="float32", batch_size=4,
                        max_tokens_per_batch=200)
    memories = [_roundtrip(m) for m in ours.encode(DOCS)]
    got = ours.score(QUERY, memories)
    want_p, want_margin = reference[r].predict([(QUERY, d) for d in DOCS], return_margin=True)
    assert np.max(np.abs(got.p_yes - want_p.numpy())) <= 1e-5
    assert np.max(np.abs(got.margin - want_margin.numpy())) <= 1e-4
    assert list(np.argsort(-got.p_yes, kind="stable")) == list(np.argsort(-want_p.numpy(), kind="stable"))
    # the long passage was truncated to max_length, the short one is 1 document-prefix + 1 token long
    assert max(m.n_tokens for m in memories) == MAX_LENGTH
    assert {m.vectors.shape[0] for m in memories} >= {(-(-MAX_LENGTH // r)) if r else MAX_LENGTH}


def test_predict_and_rank_run_through_the_split_path(tiny_model_dir, reference):
    ours = KaLMReranker(str(tiny_model_dir), max_length=MAX_LENGTH, dtype="float32")
    pairs = [(QUERY, d) for d in DOCS] + [("another query", DOCS[0])]
    want = reference[4].predict(pairs).numpy()
    got = ours.predict(pairs, convert_to_numpy=True)
    assert got.dtype == np.float32 and got.shape == (len(pairs),)
    assert np.max(np.abs(got - want)) <= 1e-5
    ranked = ours.rank(QUERY, DOCS, top_k=3, return_documents=True)
    assert [x["corpus_id"] for x in ranked] == list(np.argsort(-want[: len(DOCS)], kind="stable")[:3])
    assert ranked[0]["text"] == DOCS[ranked[0]["corpus_id"]]
    assert ranked[0]["score"] >= ranked[1]["score"] >= ranked[2]["score"]


def test_instruction_changes_scores_like_the_reference(tiny_model_dir, reference):
    ours = KaLMReranker(str(tiny_model_dir), max_length=MAX_LENGTH, dtype="float32")
    ins = "Given a code question, find the docstring that answers it."
    got = ours.predict([(QUERY, d) for d in DOCS], instruction=ins, convert_to_numpy=True)
    want = reference[4].predict([(QUERY, d) for d in DOCS], instruction=ins).numpy()
    assert np.max(np.abs(got - want)) <= 1e-5
    assert np.max(np.abs(got - ours.predict([(QUERY, d) for d in DOCS], convert_to_numpy=True))) > 1e-6


def test_memory_is_batch_independent(tiny_model_dir):
    ours = KaLMReranker(str(tiny_model_dir), max_length=MAX_LENGTH, dtype="float32")
    alone = ours.encode([DOCS[2]])[0]
    mixed = ours.encode(DOCS)[2]
    assert alone.n_tokens == mixed.n_tokens
    assert torch.allclose(alone.vectors, mixed.vectors, atol=1e-6, rtol=0)
    s_alone = ours.score(QUERY, [alone]).p_yes[0]
    s_mixed = ours.score(QUERY, ours.encode(DOCS)).p_yes[2]
    assert abs(s_alone - s_mixed) <= 1e-6


@pytest.mark.parametrize("r0,r", [(1, 2), (1, 32), (2, 8), (4, 4), (4, 16), (4, 32), (8, 32)])
def test_coarsening_equals_pooling_at_the_target_ratio(tiny_model_dir, r0, r):
    ours = KaLMReranker(str(tiny_model_dir), max_length=MAX_LENGTH, dtype="float32")
    base = ours.encode(DOCS, ratio=r0)
    direct = ours.encode(DOCS, ratio=r)
    for b, d in zip(base, direct):
        c = b.at_ratio(r)
        assert c.vectors.shape == d.vectors.shape
        assert torch.max(torch.abs(c.vectors - d.vectors)) <= 1e-6


def test_template_is_byte_for_byte(tiny_model_dir):
    ours = KaLMReranker(str(tiny_model_dir))
    expected = (
        "<bos><start_of_turn>user\n"
        'Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
        'Note that the answer can only be "yes" or "no".'
        "\n\n<Instruct>: Given a query, retrieve documents that answer the query.\n<Query>: what is MEP?"
        "<end_of_turn>\n<start_of_turn>model\n\n\n\n"
    )
    assert ours.prompt("what is MEP?") == expected
    assert DEFAULT_SYSTEM_INSTRUCTION in expected
    ids = ours.prompt_ids("what is MEP?")
    tok = ours.tokenizer
    assert ids[:2] == [tok.convert_tokens_to_ids("<bos>"), tok.convert_tokens_to_ids("<start_of_turn>")]
    assert tok.convert_tokens_to_ids("<end_of_turn>") in ids


def test_query_truncation(tiny_model_dir, reference):
    ours = KaLMReranker(str(tiny_model_dir), query_max_length=5, max_length=MAX_LENGTH, dtype="float32")
    long_q = "abcdefghij klmnop"
    assert ours.truncate_query(long_q) == ours.tokenizer.decode(
        ours.tokenizer(long_q, add_special_tokens=False).input_ids[:5])
    assert len(ours.tokenizer(ours.truncate_query(long_q), add_special_tokens=False).input_ids) == 5
    ref = ReferenceReranker(str(tiny_model_dir), max_length=MAX_LENGTH, query_max_length=5)
    assert ours.prompt(long_q) == ref.template(long_q)
    got = ours.predict([(long_q, DOCS[0])])
    assert abs(got[0] - ref.predict([(long_q, DOCS[0])])[0].item()) <= 1e-5


def test_empty_query_keeps_the_template(tiny_model_dir, reference):
    ours = KaLMReranker(str(tiny_model_dir), max_length=MAX_LENGTH, dtype="float32")
    assert "<Query>: <end_of_turn>" in ours.prompt("")
    assert abs(ours.predict([("", DOCS[0])])[0] - reference[4].predict([("", DOCS[0])])[0].item()) <= 1e-5


@pytest.mark.parametrize("bad,err", [
    ("not pairs", TypeError), ([("q", None)], TypeError), ([(None, "d")], TypeError),
    ([("q", 3)], TypeError), ([("only one",)], TypeError), ([("q", "d", "x")], TypeError),
])
def test_bad_pairs_are_clear_errors(tiny_model_dir, bad, err):
    ours = KaLMReranker(str(tiny_model_dir))
    with pytest.raises(err) as e:
        ours.predict(bad)
    assert "pair" in str(e.value)


@pytest.mark.parametrize("chunk", [0, -4, "4", True, 2.0])
def test_bad_chunk_size(tiny_model_dir, chunk):
    with pytest.raises(ValueError, match="chunk_size/ratio must be a positive integer or None"):
        KaLMReranker(str(tiny_model_dir), chunk_size=chunk)


def test_bad_dtype_and_sizes(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown dtype"):
        KaLMReranker(str(tiny_model_dir), dtype="float8")
    with pytest.raises(ValueError, match="max_length"):
        KaLMReranker(str(tiny_model_dir), max_length=0)


def test_default_dtype_is_fp32_on_cpu(tiny_model_dir):
    assert KaLMReranker(str(tiny_model_dir), device="cpu").dtype == torch.float32


def test_fp16_non_finite_logits_raise(tiny_model_dir):
    ours = KaLMReranker(str(tiny_model_dir), dtype="float16", max_length=MAX_LENGTH)
    mem = ours.encode([DOCS[0]])[0]
    # what an fp16 encoder overflow leaves behind: infinite states
    huge = Memory(torch.full_like(mem.vectors, float("inf")), mem.n_tokens, mem.ratio)
    with pytest.raises(FloatingPointError, match="bfloat16 or float32"):
        ours.score(QUERY, [huge])


# Batched low precision: the official model differs from itself between batch 1 and batch 32 by up to 9.2e-4 (bf16)
# and 9.4e-5 (fp16) on these pairs, and from float32 by 8.2e-4 / 1.1e-4 (measured; BENCHMARKS.md has the larger
# table). The tolerances are about twice that; the float32 scores spread over 0.043, so a constant output fails.
BATCHED_TOL = {"bfloat16": 2e-3, "float16": 3e-4}


@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_batched_fp16_and_bf16_stay_within_the_measured_floor(tiny_model_dir, dt):
    pairs = [(q, d) for q in (QUERY, "another query about files", "x") for d in DOCS]
    fp32 = KaLMReranker(str(tiny_model_dir), dtype="float32", max_length=MAX_LENGTH).predict(pairs)
    low = KaLMReranker(str(tiny_model_dir), dtype=dt, max_length=MAX_LENGTH).predict(pairs, convert_to_numpy=True)
    assert np.ptp(fp32) > 10 * BATCHED_TOL[dt]
    assert np.max(np.abs(low - np.asarray(fp32))) <= BATCHED_TOL[dt]


def test_halves_load_only_when_used(tiny_model_dir):
    ours = KaLMReranker(str(tiny_model_dir))
    ours.encode(["a passage"])
    assert ours._encoder is not None and ours._decoder is None
    scorer = KaLMReranker(str(tiny_model_dir))
    scorer.score(QUERY, [Memory(torch.zeros(2, scorer.hidden_size), 5, 4)])
    assert scorer._encoder is None and scorer._decoder is not None
