"""Shared helpers for the benchmark scripts: the Nano-shape random model, machine description, peak RSS."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def nano_model_dir(cache: str = "/tmp/kalm-bench/nano") -> Path:
    """A random-weight checkpoint of the real KaLM-Reranker-V1-Nano shape (written once, then reused)."""
    import torch

    from kalm_batch.tiny import write_random_model

    path = Path(cache)
    if not (path / "model.safetensors").exists():
        write_random_model(path, shape="nano", dtype=torch.bfloat16)
    return path


def tiny_model_dir(cache: str = "/tmp/kalm-bench/tiny") -> Path:
    from kalm_batch.tiny import write_random_model

    path = Path(cache)
    if not (path / "model.safetensors").exists():
        write_random_model(path, shape="tiny")
    return path


def machine() -> str:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} torch threads"


def peak_rss_mb() -> float:
    from kalm_batch.pipelines.cluster import process_peak_rss_mb

    return process_peak_rss_mb()


def run_child(args: list[str]) -> str:
    """Run this interpreter on ``args`` (a phase of a benchmark in a fresh process) and return its stdout."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.strip().splitlines()[-1]
