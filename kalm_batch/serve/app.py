"""Composing and running the Serve application: ``KaLMIngress`` (HTTP) bound to ``KaLMScorer`` replicas.

* ``build_app(cfg)`` — the bound application, with replica counts, CPU/GPU reservations and the scorer's
  ``user_config`` (``max_batch_size``, ``batch_wait_timeout_s``, ``max_pairs_per_batch``) taken from ``cfg``.
* ``app_builder(args)`` — the ``import_path`` target of ``cluster/serve.yaml`` (``serve run`` / ``serve deploy``);
  ``args`` is ``{model, store, ...}`` with any other ``ServeConfig`` field. Options set in the YAML's
  ``deployments:`` section override the ones set here.
* ``run_serve(cfg, blocking=True)`` — what ``kalm-batch serve`` calls: starts Ray if needed, starts Serve on
  ``cfg.host:cfg.port`` and runs the app (blocking until interrupted, or returning the ingress handle). It refuses
  a replica the running cluster could never schedule (more CPUs/GPUs than it has: Serve would wait forever); on an
  autoscaling cluster deploy with ``serve deploy cluster/serve.yaml`` instead.

Start-up failures that no retry can fix fail fast: ``preflight(cfg)`` (called by ``run_serve`` before Ray starts,
and by ``app_builder``) opens the store and checks it against the model with the scorer's own
``open_compatible_store``, so a store that is missing/incomplete (no Delta log), unreadable, or made by another model
raises ``StoreError`` / ``StoreMismatchError`` / ``ValueError`` at once, and ``kalm-batch serve`` prints that one
message and exits 2. The same errors raised inside a replica (the store changed between the check and the replica's
start, or ``serve deploy`` put the replica where the store reads differently) fail the deployment at its first failed
start: Serve allows one (``max_constructor_retries=1``), the replica itself retries only errors a retry may fix (an
object-store read error) and raises ``ScorerStartError`` with one line otherwise (``kalm_batch.serve.startup``), and
``run_serve`` raises ``ServeStartError`` with that line alone, no traceback.
"""

from __future__ import annotations

import logging
import re
import time

import ray
from ray import serve
from ray.serve import Application

from kalm_batch.serve.ingress import KaLMIngress
from kalm_batch.serve.schemas import ServeConfig
from kalm_batch.serve.scorer import KaLMScorer, open_compatible_store, scorer_reranker

logger = logging.getLogger(__name__)


def build_app(cfg: ServeConfig) -> Application:
    """The ingress bound to the scorer, configured from ``cfg``."""
    config = cfg.model_dump()
    scorer = KaLMScorer.options(
        num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=cfg.scorer_max_ongoing_requests or max(2 * cfg.max_batch_size, 16),
        max_queued_requests=cfg.max_queued_requests,  # beyond it the handle raises BackPressureError -> 503
        user_config=cfg.batching(),
        max_constructor_retry_count=cfg.max_constructor_retries,
    ).bind(config)
    return KaLMIngress.options(ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
                               max_ongoing_requests=cfg.ingress_max_ongoing_requests).bind(scorer, config)


def app_builder(args: dict) -> Application:
    """Entry point for ``serve run``/``serve deploy`` (``import_path: kalm_batch.serve.app:app_builder``)."""
    cfg = ServeConfig.model_validate(dict(args))
    preflight(cfg)
    return build_app(cfg)


def preflight(cfg: ServeConfig) -> None:
    """Open the store and check it against the model, as each replica will (tokenizer and config only, no weights).

    Raises at once what Serve would otherwise retry in every replica's constructor before failing.
    """
    open_compatible_store(cfg, scorer_reranker(cfg.model_copy(update={"device": "cpu"})), cache_bytes=0)


def check_resources(cfg: ServeConfig, cluster: dict) -> None:
    """Fail fast where a replica could never be scheduled (Serve would otherwise wait for it forever)."""
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if cfg.num_cpus + cfg.ingress_num_cpus > cpus:
        raise ValueError(f"num_cpus={cfg.num_cpus} per scorer replica (+ ingress_num_cpus={cfg.ingress_num_cpus}) "
                         f"exceeds the {cpus:g} CPUs of this Ray cluster; use a fractional num_cpus such as 0.5")
    if cfg.num_gpus > gpus:
        raise ValueError(f"num_gpus={cfg.num_gpus} per scorer replica but this Ray cluster has {gpus:g} GPUs; "
                         "use num_gpus=0 to score on CPU")
    if cfg.replicas * cfg.num_cpus + cfg.ingress_num_cpus > cpus:
        logger.warning("%d scorer replicas x %g CPUs exceed the cluster's %g CPUs: some replicas will wait for "
                       "resources", cfg.replicas, cfg.num_cpus, cpus)


class ServeStartError(RuntimeError):
    """The application did not start; the message carries the failing deployments' own errors."""


def _start_error(app_name: str, exc: RuntimeError) -> ServeStartError:
    """Why ``app_name`` failed to deploy: the scorer's one ``ScorerStartError`` line when a replica raised one, else
    Serve's error with the status messages of the unhealthy deployments (where a replica's traceback lands)."""
    parts = [str(exc)]
    app = serve.status().applications.get(app_name)
    if app is not None:
        parts += [app.message] + [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
    text = "\n".join(p for p in parts if p)
    lines = re.findall(r"ScorerStartError: ([^\n]+)", text)
    return ServeStartError(lines[-1] if lines else text)


def run_serve(cfg: ServeConfig, blocking: bool = True):
    """Start Serve on ``cfg.host:cfg.port`` and run the app; returns the ingress handle when not blocking.

    Raises ``ServeStartError`` (with the replicas' errors, e.g. a store/model fingerprint mismatch) when the
    application fails to deploy.
    """
    preflight(cfg)
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    check_resources(cfg, ray.cluster_resources())
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    try:
        handle = serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    except RuntimeError as exc:
        raise _start_error(cfg.app_name, exc) from None
    logger.info("kalm rerank endpoint on http://%s:%d%s", cfg.host, cfg.port, cfg.route_prefix)
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("shutting down Serve")
        serve.shutdown()
    return None
