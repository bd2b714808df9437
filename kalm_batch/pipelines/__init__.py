"""Ray Data pipelines, one shape per job: a typed config -> a builder of the lazy Ray Data pipeline -> a run function.

- encode: ``EncodeConfig`` -> ``build_encode_pipeline`` -> ``run_encode`` (kalm_batch/pipelines/encode.py)
- rerank: ``RerankConfig`` -> ``build_records_pipeline`` / ``build_score_pipeline`` -> ``run_rerank``
  (kalm_batch/pipelines/rerank.py)

Both take ``--workers auto`` (kalm_batch.pipelines.cluster.worker_pool) and get their flags from their config through
kalm_batch.cliutil. Stages are plain functions and callable classes, testable without Ray. Names load lazily.
"""

from __future__ import annotations

from kalm_batch._lazy import lazy_exports

_EXPORTS = {
    "EncodeConfig": "kalm_batch.pipelines.encode",
    "EncodeSummary": "kalm_batch.pipelines.encode",
    "build_encode_pipeline": "kalm_batch.pipelines.encode",
    "run_encode": "kalm_batch.pipelines.encode",
    "RerankConfig": "kalm_batch.pipelines.rerank",
    "RerankSummary": "kalm_batch.pipelines.rerank",
    "build_records_pipeline": "kalm_batch.pipelines.rerank",
    "build_score_pipeline": "kalm_batch.pipelines.rerank",
    "run_rerank": "kalm_batch.pipelines.rerank",
    "worker_pool": "kalm_batch.pipelines.cluster",
}

__all__ = [  # noqa: RUF022 (grouped by job)
    "EncodeConfig", "EncodeSummary", "build_encode_pipeline", "run_encode", "RerankConfig", "RerankSummary",
    "build_records_pipeline", "build_score_pipeline", "run_rerank", "worker_pool",
]

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
