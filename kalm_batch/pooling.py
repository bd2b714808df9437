"""Matryoshka Embedding Pooling (MEP) and exact coarsening of pooled memories.

MEP shortens the encoder's token states by a mask-aware mean over each run of ``r`` consecutive tokens, with chunks
starting at token 0. A memory pooled at ratio ``r0`` can be re-pooled to any multiple ``r`` of ``r0`` exactly: the
chunk at ``r`` is the valid-token-weighted mean of the ``r / r0`` adjacent ``r0`` chunks, and the valid-token counts
follow from ``n_tokens`` alone because padding only ever sits at the end.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

ALLOWED_RATIOS = (1, 2, 4, 8, 16, 32)  # the chunk sizes KaLM-Reranker-V1 was trained with


def check_ratio(r: int | None, *, allow_none: bool = True, warn: bool = False) -> int | None:
    """Validate a pooling ratio (chunk size); ``None`` means no pooling.

    Like the official class, any positive integer is accepted; a size the model was not trained with
    (not in ``ALLOWED_RATIOS``) logs a warning when ``warn`` is set (the constructor sets it; per-batch checks do not).
    """
    if r is None and allow_none:
        return None
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        what = "a positive integer" + (" or None (no pooling)" if allow_none else "")
        raise ValueError(f"chunk_size/ratio must be {what} (trained sizes: "
                         f"{', '.join(map(str, ALLOWED_RATIOS))}); got {r!r}")
    if warn and r not in ALLOWED_RATIOS:
        log.warning("chunk_size/ratio %d is not one KaLM-Reranker-V1 was trained with (%s); scores may be worse",
                    r, ", ".join(map(str, ALLOWED_RATIOS)))
    return r


def n_vectors(n_tokens: int, r: int | None) -> int:
    """How many pooled vectors a passage of ``n_tokens`` tokens gives at ratio ``r``."""
    return n_tokens if r is None else math.ceil(n_tokens / r)


def mep_pool(states: torch.Tensor, mask: torch.Tensor, r: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool ``states`` [B, L, D] with ``mask`` [B, L] into ([B, ceil(L/r), D], [B, ceil(L/r)]).

    Mirrors the reference: pad L to a multiple of r, zero the padded states, sum each chunk, divide by
    max(1, valid tokens in the chunk); the pooled mask marks chunks with at least one valid token. The arithmetic
    runs in the states' dtype, as the reference does.
    """
    if r is None or r == 1:
        return states, mask.to(torch.long)
    b, length, d = states.shape
    pad = (-length) % r
    if pad:
        states = torch.nn.functional.pad(states, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
    m = mask.to(states.dtype)
    summed = (states * m.unsqueeze(-1)).view(b, -1, r, d).sum(dim=2)
    counts = m.view(b, -1, r).sum(dim=2)
    pooled = summed / counts.clamp(min=1).unsqueeze(-1)
    return pooled, (counts > 0).to(torch.long)


def chunk_counts(n_tokens: int, r: int) -> torch.Tensor:
    """Valid-token count of each r-chunk of a passage of ``n_tokens`` tokens (all r, the last one the remainder)."""
    k = n_vectors(n_tokens, r)
    counts = torch.full((k,), float(r), dtype=torch.float64)
    counts[-1] = n_tokens - r * (k - 1)
    return counts


def coarsen(memory: torch.Tensor, n_tokens: int, r0: int, r: int) -> torch.Tensor:
    """Re-pool a memory stored at ratio ``r0`` to ratio ``r`` (a multiple of ``r0``), exactly.

    ``memory`` is [ceil(n_tokens / r0), D]. Computed in float64 and returned in float32, so the result equals pooling
    the token states at ``r`` up to float32 rounding.
    """
    for name, value in (("r0", r0), ("r", r)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"coarsening needs positive integer ratios; got {name}={value!r}")
    if r % r0:
        raise ValueError(f"cannot read a memory stored at ratio {r0} at ratio {r}: r must be a multiple of {r0}")
    expected = n_vectors(n_tokens, r0)
    if memory.shape[0] != expected:
        raise ValueError(f"memory has {memory.shape[0]} vectors but n_tokens={n_tokens} at ratio {r0} gives {expected}")
    if r == r0:
        return memory.to(torch.float32)
    f = r // r0
    w = chunk_counts(n_tokens, r0)
    x = memory.to(torch.float64) * w.unsqueeze(-1)
    k = n_vectors(n_tokens, r)
    pad = k * f - x.shape[0]
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        w = torch.nn.functional.pad(w, (0, pad))
    summed = x.view(k, f, -1).sum(dim=1)
    return (summed / w.view(k, f).sum(dim=1).unsqueeze(-1)).to(torch.float32)
