"""Bounded tokenization: cut a long text by characters *before* tokenizing, keeping the kept token ids exact.

``tokenize_prefix(tokenizer, texts, keep)`` returns, for each text, the first ``keep`` token ids that tokenizing the
whole text would give (``add_special_tokens=False``), while tokenizing only about ``keep + margin`` tokens' worth of
characters. A 5 MB text then costs what a ``keep``-token text costs.

How the cut stays exact:

* the text is cut where a word ends (just before a whitespace character that follows a non-space one). Tokenizers
  that pre-split on whitespace (byte-level BPE, SentencePiece's metaspace) never let a token cross that point, so
  every token before the cut is the token the full text has there;
* the cut keeps at least ``keep + margin`` tokens (``margin`` spare tokens absorb the last, possibly different,
  word or a cut with no word boundary near it, e.g. CJK text); too few tokens and the cut grows (x4);
* the cut never needs to exceed ``(keep + margin) * longest token`` characters (no token covers more characters
  than its own vocabulary string has), so the loop ends.

Both the encode job (``TokenizeRows``) and Serve (``KaLMReranker.tokenize_documents``, query and instruction limits)
tokenize through here; ``tests/test_textlimits.py`` checks the ids against whole-text tokenization, multi-byte
text included.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

__all__ = ["cut_text", "max_token_chars", "tokenize_prefix"]

DEFAULT_MARGIN = 16          # spare tokens past ``keep`` that absorb the cut word
_FIRST_CHARS_PER_TOKEN = 8   # first guess; grown x4 while a cut holds too few tokens
_BOUNDARY_SEARCH = 256       # how far back from the limit a word boundary is looked for

_token_chars: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def max_token_chars(tokenizer) -> int:
    """The longest vocabulary string (an upper bound on the characters one token covers); cached per tokenizer."""
    try:
        return _token_chars[tokenizer]
    except (KeyError, TypeError):
        pass
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    try:
        _token_chars[tokenizer] = longest
    except TypeError:  # not weak-referenceable: compute again next time
        pass
    return longest


def cut_text(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, at the last word end within the final 256 characters if any."""
    if len(text) <= limit:
        return text
    for i in range(limit, max(0, limit - _BOUNDARY_SEARCH), -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return text[:i]
    return text[:limit]


def tokenize_prefix(tokenizer, texts: Sequence[str], keep: int, *, margin: int = DEFAULT_MARGIN) -> list[list[int]]:
    """The first ``keep`` token ids of each text, equal to those of the whole text, from a bounded character cut."""
    if keep < 1:
        raise ValueError(f"keep must be a positive number of tokens, got {keep}")
    need = keep + margin
    bound = need * max_token_chars(tokenizer) + _BOUNDARY_SEARCH
    out: list[list[int] | None] = [None] * len(texts)
    todo, chars = list(range(len(texts))), need * _FIRST_CHARS_PER_TOKEN
    while todo:
        cuts = [cut_text(texts[i], chars) for i in todo]
        ids = tokenizer(cuts, add_special_tokens=False)["input_ids"]
        retry = []
        for i, cut, row in zip(todo, cuts, ids):
            if len(cut) == len(texts[i]) or len(row) >= need or chars >= bound:
                out[i] = list(row[:keep])
            else:
                retry.append(i)
        todo, chars = retry, min(chars * 4, bound)
    return out  # type: ignore[return-value]
