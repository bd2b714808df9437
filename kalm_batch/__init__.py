"""kalm-batch: encode corpora once into KaLM-Reranker-V1 passage memories, rerank from them offline and online.

The promise is this short list; everything else is importable but may change. Names are resolved lazily (PEP 562)
so that light modules (corpus reading, shard writing) run in Ray workers without importing torch or transformers.
"""

from __future__ import annotations

from kalm_batch._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "ALLOWED_RATIOS": "kalm_batch.pooling",
    "CheckpointError": "kalm_batch.model",
    "DEFAULT_INSTRUCTION": "kalm_batch.prompts",
    "DEFAULT_MODEL": "kalm_batch.model",
    "DEFAULT_SYSTEM_INSTRUCTION": "kalm_batch.prompts",
    "KaLMReranker": "kalm_batch.reranker",
    "Memory": "kalm_batch.memory",
    "ModelFingerprint": "kalm_batch.model",
    "Scores": "kalm_batch.reranker",
    "coarsen": "kalm_batch.pooling",
    "mep_pool": "kalm_batch.pooling",
}

__all__ = [
    "ALLOWED_RATIOS",
    "DEFAULT_INSTRUCTION",
    "DEFAULT_MODEL",
    "DEFAULT_SYSTEM_INSTRUCTION",
    "CheckpointError",
    "KaLMReranker",
    "Memory",
    "ModelFingerprint",
    "Scores",
    "__version__",
    "coarsen",
    "mep_pool",
]


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
