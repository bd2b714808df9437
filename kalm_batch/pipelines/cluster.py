"""Joining or starting Ray for a job, and sizing actors to what the cluster has."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


_FORWARDED_ENV = ("AWS_", "KALM_", "HF_")


def forwarded_env() -> dict:
    """The driver's object-store and hub settings (AWS_*, KALM_*, HF_*), for the workers' runtime env."""
    return {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV)}


# The forwarded variables as the cluster's workers already have them: set by init_ray when it started a local Ray
# (workers inherit the driver's environment) or joined one (the job's runtime_env). None: Ray was started elsewhere.
_CLUSTER_ENV: dict | None = None


def stage_remote_args() -> dict:
    """Per-stage Ray options so tasks and actors see the driver's S3 endpoint and credentials even when they changed
    after Ray was started (e.g. by another job in the same session).

    Only variables the workers do not already have are sent: any ``runtime_env`` makes Ray start fresh worker
    processes instead of reusing its pre-started ones, which costs seconds per stage on a small machine.
    """
    env = forwarded_env()
    if _CLUSTER_ENV is not None:
        env = {k: v for k, v in env.items() if _CLUSTER_ENV.get(k) != v}
    return {"runtime_env": {"env_vars": env}} if env else {}


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to ``address`` ('auto', 'ray://...') or start a local Ray when None/'local' (the embedded default)."""
    global _CLUSTER_ENV
    import ray

    if ray.is_initialized():
        return
    forwarded = forwarded_env()
    if address in (None, "local"):  # the local workers inherit this process's environment
        _start_local_ray(num_cpus or os.cpu_count())
    else:
        ray.init(address=address, runtime_env={"env_vars": forwarded} if forwarded else None, configure_logging=False)
    _CLUSTER_ENV = forwarded
    log.info("ray resources: %s", ray.cluster_resources())


def _start_local_ray(num_cpus: int, attempts: int = 3) -> None:
    """Start a local Ray; retried when Ray's own start-up check (a fixed 30 s wait for the raylet) times out, which
    happens on an overloaded host."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, configure_logging=False)
            return
        except Exception as e:  # Ray raises a bare Exception for this case
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            log.warning("local Ray did not start in time (attempt %d of %d); retrying: %s", attempt, attempts, e)
            ray.shutdown()


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def actor_resources(gpus_per_worker: float | None, workers: int) -> dict:
    """``num_gpus`` per actor when the cluster has GPUs, else a fractional CPU share that never oversubscribes."""
    import ray

    gpus = cluster_gpus() if gpus_per_worker is None else gpus_per_worker
    if gpus and gpus_per_worker is None:
        gpus = 1.0
    if gpus:
        return {"num_gpus": gpus, "num_cpus": 1}
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    share = max(0.1, min(1.0, (cpus * 0.5) / max(1, workers)))
    return {"num_cpus": round(share, 2)}


CPUS_PER_CPU_ACTOR = 8  # on a CPU-only cluster, one scoring/encoding actor per this many CPUs (torch threads)


def parse_workers(spec: int | str) -> tuple[int, int] | None:
    """``--workers``: ``auto`` -> None (sized to the cluster), ``N`` -> (N, N), ``MIN:MAX`` -> a growing pool."""
    text = str(spec).strip().lower()
    if text == "auto":
        return None
    low, sep, high = text.partition(":")
    try:
        sizes = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise ValueError(f"--workers {spec!r}: write 'auto', a number of actors (e.g. 4) or MIN:MAX (e.g. 1:8, a pool "
                         "that grows with an autoscaling cluster)") from None
    if sizes[0] < 1 or sizes[1] < sizes[0]:
        raise ValueError(f"--workers {spec!r}: need 1 <= MIN <= MAX")
    return sizes


def auto_workers(gpus_per_worker: float | None = None) -> int:
    """One actor per GPU (per ``gpus_per_worker`` GPUs) where the cluster has GPUs, else one per
    CPUS_PER_CPU_ACTOR CPUs; at least 1."""
    import ray

    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0.0))
    if gpus and gpus_per_worker != 0:
        return max(1, int(gpus // (gpus_per_worker or 1.0)))
    return max(1, int(float(resources.get("CPU", 1.0)) // CPUS_PER_CPU_ACTOR))


def worker_pool(spec: int | str, gpus_per_worker: float | None = None) -> tuple[object, dict, tuple[int, int]]:
    """(Ray Data ActorPoolStrategy, per-actor resources, (min, max) actors) for ``--workers`` (both jobs use this).

    ``auto`` sizes a fixed pool to the cluster as it is now (auto_workers); ``MIN:MAX`` gives a pool that Ray Data
    grows up to MAX actors as an autoscaling cluster adds nodes.
    """
    import ray

    sizes = parse_workers(spec)
    if sizes is None:
        n = auto_workers(gpus_per_worker)
        sizes = (n, n)
    low, high = sizes
    strategy = (ray.data.ActorPoolStrategy(size=low) if low == high
                else ray.data.ActorPoolStrategy(min_size=low, max_size=high))
    return strategy, actor_resources(gpus_per_worker, high), sizes


def process_peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited across fork+exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
