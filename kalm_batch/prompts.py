"""The contract strings of KaLM-Reranker-V1: document prefix, decoder chat template, default instructions.

These are byte-for-byte the strings of the official inference code (``kalm_reranker.py``); change nothing here
without a parity test against the reference.
"""

from __future__ import annotations

DOCUMENT_PREFIX = "<Document>: "

DEFAULT_SYSTEM_INSTRUCTION = (
    'Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
    'Note that the answer can only be "yes" or "no".'
)
DEFAULT_INSTRUCTION = "Given a query, retrieve documents that answer the query."

DECODER_PREFIX = "<bos><start_of_turn>user\n"
DECODER_SUFFIX = "<end_of_turn>\n<start_of_turn>model\n\n\n\n"

YES_TOKEN = "yes"
NO_TOKEN = "no"


def document_text(document: str) -> str:
    """The encoder input for one passage."""
    return DOCUMENT_PREFIX + document


def decoder_text(truncated_query: str, instruction: str, system_instruction: str) -> str:
    """The decoder prompt for one (already truncated) query."""
    return (
        DECODER_PREFIX
        + system_instruction
        + "\n\n<Instruct>: "
        + instruction
        + "\n<Query>: "
        + truncated_query
        + DECODER_SUFFIX
    )
