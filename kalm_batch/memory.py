"""``Memory``: one passage's pooled encoder states, and exact coarsening to a coarser pooling ratio.

Below both the reranker (which makes and scores memories) and the store (which keeps them): neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kalm_batch.pooling import coarsen


@dataclass
class Memory:
    """One passage's pooled encoder states: ``vectors`` [n_vectors, hidden] on CPU, made from ``n_tokens`` tokens."""

    vectors: torch.Tensor
    n_tokens: int
    ratio: int | None

    def to_numpy(self) -> np.ndarray:
        return self.vectors.float().numpy()

    def at_ratio(self, r: int) -> Memory:
        """The same passage pooled at ``r`` (a multiple of this memory's ratio), exactly."""
        if r == self.ratio:
            return self
        if self.ratio is None:
            raise ValueError("an unpooled memory cannot be coarsened; encode with a ratio instead")
        return Memory(coarsen(self.vectors, self.n_tokens, self.ratio, r), self.n_tokens, r)
