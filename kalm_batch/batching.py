"""Length-sorted batching under a token budget, and padding accounting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class PaddingStats:
    """Real vs padded token positions seen by a model (padding ratio = padded / total)."""

    real_tokens: int = 0
    total_tokens: int = 0
    batches: int = 0

    def add(self, lengths: Sequence[int], padded_to: int) -> None:
        self.real_tokens += sum(lengths)
        self.total_tokens += padded_to * len(lengths)
        self.batches += 1

    @property
    def padding_ratio(self) -> float:
        return 0.0 if not self.total_tokens else 1.0 - self.real_tokens / self.total_tokens

    def merge(self, other: PaddingStats) -> None:
        self.real_tokens += other.real_tokens
        self.total_tokens += other.total_tokens
        self.batches += other.batches


def token_budget_batches(costs: Sequence[int], max_items: int, max_tokens: int) -> list[list[int]]:
    """Group item indices, longest first, so each batch's padded size (items x longest) stays within ``max_tokens``.

    A single item longer than the budget still gets a batch of its own. Returns batches of original indices.
    """
    if max_items < 1 or max_tokens < 1:
        raise ValueError(f"max_items and max_tokens must be >= 1 (got {max_items}, {max_tokens})")
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        longest_if_added = max(longest, costs[i])
        if current and (len(current) >= max_items or longest_if_added * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, longest_if_added = [], costs[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
