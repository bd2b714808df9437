"""One store/model compatibility check, used by the rerank job and Serve.

SHIM (issue 12): written against the settled reading API (``reader.fingerprint``, ``reader.hidden_size``); issue 11
owns this module and may replace it.
"""

from __future__ import annotations

import logging

from kalm_batch.store.manifest import StoreMismatchError

log = logging.getLogger(__name__)


def check_compatible(reader, reranker, *, allow_mismatch: bool = False) -> None:
    """Refuse to score ``reader``'s memories with ``reranker`` unless the same model made them.

    A fingerprint difference (config, tokenizer or weights hash) raises StoreMismatchError naming both models (with
    ``allow_mismatch``: a loud WARNING instead); a different hidden size is refused either way.
    """
    stored = reader.fingerprint
    diffs = reranker.fingerprint.differences(stored)
    if diffs:
        message = (f"store {reader.url} (version {reader.version}) was encoded by {stored.get('model_id')!r} but the "
                   f"scoring model is {reranker.fingerprint.model_id!r}; they differ in {'; '.join(diffs)} "
                   "(model != store). Score with the model that made the store, or re-encode the corpus.")
        if not allow_mismatch:
            raise StoreMismatchError(message)
        log.warning("ALLOWING A MODEL/STORE MISMATCH (scores will not be the official ones): %s", message)
    if reader.hidden_size != reranker.hidden_size:
        raise StoreMismatchError(f"store {reader.url} holds {reader.hidden_size}-wide memories but model "
                                 f"{reranker.fingerprint.model_id!r} has hidden size {reranker.hidden_size}; score "
                                 "with the model that made the store")
