"""The character cut before tokenizing: the kept token ids equal whole-text tokenization, and long texts stay cheap."""

from __future__ import annotations

import random

import pytest

from kalm_batch.model import load_tokenizer
from kalm_batch.prompts import document_text
from kalm_batch.textlimits import cut_text, max_token_chars, tokenize_prefix
from kalm_batch.tiny import _nano_words, build_tokenizer

WORDS = ("the json module handles data and related things; " * 3).split()
ALPHABET = list("abcdefghij   \n\t.,;") + ["é", "ß", "漢", "字", "テ", "ス", "ト", "한", "글", "😀", "👍🏽", "e\u0301",
                                              "\u200b", "\x00", "  ", "\r\n", "ش", "ق"]


def _texts() -> list[str]:
    rng = random.Random(0)
    fixed = [
        " ".join(rng.choice(WORDS) for _ in range(3000)),                  # English, ~1 token per word (nano)
        "漢字テスト" * 2000,                                                  # CJK: no word boundary at all
        "😀👍🏽 " * 1500,                                                     # 4-byte characters and modifiers
        "a" * 20000,                                                        # one giant word
        "word " + " " * 5000 + "tail " * 1000,                              # a long whitespace run
        "café naïve coöperate résumé " * 800,                               # precomposed accents
        "cafe\u0301 " * 2000,                                               # combining marks
        "line one\nline two\r\n\tindented\n" * 600,
        "short text",
        "",
    ]
    fuzz = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 4000))) for _ in range(40)]
    return [document_text(t) for t in fixed + fuzz]


@pytest.fixture(scope="module", params=["tiny-bpe", "nano-unigram"])
def tokenizer(request, tiny_model_dir):
    if request.param == "tiny-bpe":
        return load_tokenizer(tiny_model_dir)  # through the public loading path, as the model loads it
    return build_tokenizer(_nano_words())


@pytest.mark.parametrize("keep", [1, 7, 64, 513])
def test_prefix_ids_equal_whole_text_ids(tokenizer, keep):
    texts = _texts()
    whole = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=keep)["input_ids"]
    got = tokenize_prefix(tokenizer, texts, keep)
    for i, (a, b) in enumerate(zip(got, whole)):
        assert a == list(b), f"text {i} ({texts[i][:40]!r}...): cut ids differ from whole-text ids"


class _Recording:
    """A tokenizer that records the longest text it was handed (to prove the cut, not to fake tokenizing)."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def get_vocab(self):
        return self.inner.get_vocab()

    def __call__(self, texts, **kw):
        self.longest = max([self.longest] + [len(t) for t in texts])
        return self.inner(texts, **kw)


def test_a_huge_text_is_tokenized_only_up_to_the_bound(tokenizer):
    huge = document_text(" ".join(random.Random(1).choice(WORDS) for _ in range(100_000)))  # ~0.5 MB
    rec = _Recording(tokenizer)
    ids = tokenize_prefix(rec, [huge], 1024)[0]
    assert ids == tokenizer(huge[:50_000], add_special_tokens=False, truncation=True, max_length=1024)["input_ids"]
    assert rec.longest <= (1024 + 16) * max_token_chars(tokenizer) + 256 < len(huge) // 5


def test_cut_text_prefers_a_word_end():
    assert cut_text("hello world again", 100) == "hello world again"
    assert cut_text("hello world again", 13) == "hello world"
    assert cut_text("x" * 50, 10) == "x" * 10  # no boundary: a plain cut (the margin absorbs it)
    with pytest.raises(ValueError, match="keep"):
        tokenize_prefix(None, ["a"], 0)


def test_reranker_and_encode_job_use_the_cut(tiny_model_dir):
    from kalm_batch import KaLMReranker
    from kalm_batch.pipelines.encode_stages import TokenizeRows

    text = "漢字 and words " * 5000
    r = KaLMReranker(str(tiny_model_dir), max_length=100, query_max_length=20)
    full = r.tokenizer(document_text(text), add_special_tokens=False)["input_ids"]
    assert r.tokenize_documents([text]) == [full[:100]]
    reference = r.tokenizer.decode(r.tokenizer(text, add_special_tokens=False, truncation=True, max_length=20)[
        "input_ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert r.truncate_query(text) == reference  # the reference truncates by tokens, then decodes
    rows = TokenizeRows(str(tiny_model_dir), 100)({"doc_id": ["d"], "source": ["s"], "line": [1], "text": [text]})
    assert list(rows["token_ids"][0]) == full[:100] and rows["truncated"].tolist() == [True]
