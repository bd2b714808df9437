"""kalm-batch: encode corpora once into KaLM-Reranker-V1 passage memories, rerank from them offline and online.

The promise is this short list; everything else is importable but may change.
"""

from __future__ import annotations

from kalm_batch.model import DEFAULT_MODEL, CheckpointError, ModelFingerprint
from kalm_batch.pooling import ALLOWED_RATIOS, coarsen, mep_pool
from kalm_batch.prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_INSTRUCTION
from kalm_batch.reranker import KaLMReranker, Memory, Scores

__version__ = "0.1.0"

__all__ = [
    "ALLOWED_RATIOS",
    "CheckpointError",
    "DEFAULT_INSTRUCTION",
    "DEFAULT_MODEL",
    "DEFAULT_SYSTEM_INSTRUCTION",
    "KaLMReranker",
    "Memory",
    "ModelFingerprint",
    "Scores",
    "__version__",
    "coarsen",
    "mep_pool",
]
