"""Online reranking on Ray Serve: Cohere/Jina/TEI-compatible routes over memories from a pre-encoded store.

``run_serve(ServeConfig(...))`` starts the endpoint; ``app_builder`` is the ``serve run``/``serve deploy`` target.
See ``kalm_batch.serve.ingress`` for the routes and error contract and ``kalm_batch.serve.scorer`` for batching.
"""

from __future__ import annotations

from kalm_batch.serve.schemas import ServeConfig

__all__ = ["ServeConfig", "ServeStartError", "app_builder", "build_app", "run_serve"]


def __getattr__(name: str):
    # Ray Serve is imported only when the app is actually built, so ``ServeConfig`` stays cheap to import.
    if name in ("ServeStartError", "app_builder", "build_app", "run_serve"):
        from kalm_batch.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'kalm_batch.serve' has no attribute {name!r}")
