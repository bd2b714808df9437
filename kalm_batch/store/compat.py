"""The one store/model compatibility check, used by the rerank job and Serve alike."""

from __future__ import annotations

import logging

from kalm_batch.store.errors import StoreMismatchError

log = logging.getLogger(__name__)


def check_compatible(reader, reranker, *, allow_mismatch: bool = False) -> None:
    """Refuse to score ``reader``'s store with a model other than the one that encoded it.

    The fingerprints are compared by config, tokenizer and weights hashes; ``allow_mismatch`` turns a fingerprint
    difference into a loud warning. A different hidden size is refused either way (the memories cannot be scored).
    """
    stored = reader.fingerprint
    model = reranker.fingerprint
    where = f"store {reader.url} (version {reader.version})"
    if reader.hidden_size != reranker.hidden_size:
        raise StoreMismatchError(f"{where} holds {reader.hidden_size}-wide memories made by "
                                 f"{stored.get('model_id')!r} but model {model.model_id!r} has hidden size "
                                 f"{reranker.hidden_size}; score with the model that made the store")
    diffs = model.differences(stored)
    if not diffs:
        return
    message = (f"{where} was encoded by {stored.get('model_id')!r} but the scoring model is {model.model_id!r}; "
               f"they differ in {'; '.join(diffs)} (model != store). Score with the model that made the store, or "
               "re-encode the corpus.")
    if not allow_mismatch:
        raise StoreMismatchError(message)
    log.warning("ALLOWING A MODEL/STORE MISMATCH (scores will not be the official ones): %s", message)
