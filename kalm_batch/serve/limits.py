"""Request limits, checked by the ingress before any tokenization or model work.

Each limit is a ``ServeConfig`` field; a request over one is a 413 (too large) and text that cannot be encoded (a lone
surrogate such as ``"\\ud800"``, which is valid JSON) is a 422. The error names the field (``documents[3]``,
``pairs[0].query``, ``instruction``) and the limit. Token limits (instruction tokens, the model's ``max_length`` for
TEI ``truncate=false``) are checked by the scorer, on a character-cut text (``kalm_batch.textlimits``).
"""

from __future__ import annotations

from kalm_batch.serve.schemas import ApiError, ScoreJob, ServeConfig


def check_encodable(value: str, field: str) -> None:
    """422 for text UTF-8 cannot carry (lone surrogates): the tokenizer and the JSON response would both fail."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(422, "invalid_text", f"{field} holds a character that is not valid Unicode text (a lone "
                       f"surrogate, {value[e.start]!a}, at character {e.start}); send UTF-8 encodable text",
                       {"field": field, "position": e.start}) from None


def check_chars(value: str, field: str, limit: int, knob: str, error_type: str) -> None:
    if len(value) > limit:
        raise ApiError(413, error_type, f"{field} has {len(value)} characters; the limit is {limit} ({knob})",
                       {"field": field, "limit": limit, "characters": len(value)})


def check_query(query: str, limits: ServeConfig, field: str = "query") -> None:
    check_chars(query, field, limits.max_query_chars, "max_query_chars", "query_too_long")
    check_encodable(query, field)


def check_count(n: int, field: str, limit: int, knob: str, error_type: str = "too_many_documents") -> None:
    if n == 0:
        raise ApiError(422, "validation_error", f"{field} is empty; send at least one document")
    if n > limit:
        raise ApiError(413, error_type, f"{field} has {n} entries; the limit is {limit} ({knob})",
                       {"field": field, "limit": limit})


def check_job(job: ScoreJob, limits: ServeConfig, doc_field: str = "documents", pairwise: bool = False) -> None:
    """Every text of ``job`` within its character limit and encodable; ``pairwise``: fields are ``pairs[i].*``."""
    if job.instruction is not None:
        check_chars(job.instruction, "instruction", limits.max_instruction_chars, "max_instruction_chars",
                    "instruction_too_long")
        check_encodable(job.instruction, "instruction")
    for i, q in enumerate(job.queries if pairwise else job.queries[:1]):
        check_query(q, limits, f"pairs[{i}].query" if pairwise else "query")
    for i, d in enumerate(job.docs):
        if d.kind == "text":
            field = f"pairs[{i}].document" if pairwise else f"{doc_field}[{i}]"
            check_chars(d.value, field, limits.max_document_chars, "max_document_chars", "document_too_long")
        else:
            field = f"pairs[{i}].document_id" if pairwise else f"document_ids[{i}]"
        check_encodable(d.value, field)
