"""Cascade reranking, as pure functions: parse ``R1:K1,R2:K2,...``, pick each stage's candidates, merge the stages.

A cascade scores the top ``K1`` first-stage candidates of each query at pooling ratio ``R1``, then the top ``K2`` of
those (by stage-1 score) at ``R2``, and so on; one store serves every ratio that is a multiple of its r0, exactly.
The final ranking of a query is the last stage's order for the documents it scored, then the previous stage's order
for the documents it scored that the later stage did not, and so on down to stage 1.

Within a stage, documents are ordered by P(yes) descending, then by the yes-no logit margin (P(yes) saturates at 1.0
in float32 where the margin does not), then by first-stage rank, then by doc id, so orders are deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class CascadeError(ValueError):
    """A ``--cascade`` / ``--ratio`` / ``--top-k`` combination that cannot be run."""


@dataclass(frozen=True)
class Stage:
    """Score the top ``k`` candidates left by the previous stage (stage 1: first-stage rank) at pooling ``ratio``."""

    ratio: int
    k: int


@dataclass(frozen=True)
class Scored:
    """One scored candidate of a query in one stage."""

    doc_id: str
    p_yes: float
    margin: float
    first_stage_rank: int


@dataclass(frozen=True)
class Placed:
    """A candidate's place in the final ranking: ``stage`` (1-based) is the last stage that scored it."""

    rank: int
    stage: int
    scored: Scored

    @property
    def run_score(self) -> float:
        """Score for a TREC run: ``(stage - 1) + P(yes)``, so later-stage tiers sort above earlier ones."""
        return (self.stage - 1) + float(self.scored.p_yes)


def parse_cascade(spec: str) -> list[Stage]:
    """``"32:100,4:20"`` -> ``[Stage(32, 100), Stage(4, 20)]``; raises CascadeError naming the bad part."""
    stages = []
    parts = [p.strip() for p in str(spec).split(",")]
    for i, part in enumerate(parts, start=1):
        ratio, sep, k = part.partition(":")
        try:
            if not sep:
                raise ValueError
            stages.append(Stage(int(ratio), int(k)))
        except ValueError:
            raise CascadeError(f"--cascade {spec!r}: stage {i} is {part!r}; write each stage as RATIO:K, e.g. "
                               "'32:100,4:20' (score the top 100 at r=32, then their top 20 at r=4)") from None
    return stages


def validate_stages(stages: Sequence[Stage], ratios: Sequence[int], spec: str = "") -> list[Stage]:
    """Check every K >= 1 and strictly decreasing, and every ratio servable by the store (in ``ratios``)."""
    what = f"--cascade {spec!r}" if spec else "stages"
    if not stages:
        raise CascadeError(f"{what}: no stage given")
    for i, s in enumerate(stages, start=1):
        if s.k < 1:
            raise CascadeError(f"{what}: stage {i} keeps K={s.k} candidates; K must be >= 1")
        if s.ratio not in ratios:
            raise CascadeError(f"{what}: stage {i} ratio {s.ratio} cannot be served by this store; it serves "
                               f"ratios {list(ratios)} (multiples of its r0={min(ratios)})")
        if i > 1 and s.k >= stages[i - 2].k:
            raise CascadeError(f"{what}: stage {i} keeps K={s.k} but stage {i - 1} keeps K={stages[i - 2].k}; "
                               "each stage must keep fewer candidates than the one before (K strictly decreasing)")
    return list(stages)


def plan_stages(*, ratios: Sequence[int], cascade: str | None = None, ratio: int | None = None,
                top_k: int | None = None, default_top_k: int = 100) -> list[Stage]:
    """The stages of a run: ``cascade`` if given, else one stage at ``ratio`` (default r0) over ``top_k``.

    With a cascade, ``ratio`` must be unset and ``top_k`` (if set) must not be below the first stage's K.
    """
    if cascade:
        if ratio is not None:
            raise CascadeError(f"--ratio {ratio} and --cascade {cascade!r} both given; the cascade names a ratio per "
                               "stage, so drop --ratio")
        stages = validate_stages(parse_cascade(cascade), ratios, cascade)
        if top_k is not None and top_k < stages[0].k:
            raise CascadeError(f"--top-k {top_k} keeps fewer candidates than the cascade's first stage scores "
                               f"(K1={stages[0].k}); drop --top-k or lower K1")
        return stages
    r = min(ratios) if ratio is None else ratio
    if r not in ratios:
        raise CascadeError(f"--ratio {r} cannot be served by this store; it serves ratios {list(ratios)} "
                           f"(multiples of its r0={min(ratios)})")
    return validate_stages([Stage(r, default_top_k if top_k is None else top_k)], ratios)


def stage_order(items: Sequence[Scored]) -> list[Scored]:
    """Best first: P(yes) desc, margin desc, first-stage rank asc, doc id asc."""
    return sorted(items, key=lambda s: (-s.p_yes, -s.margin, s.first_stage_rank, s.doc_id))


def select_top(scored: Mapping[str, Sequence[Scored]], k: int) -> dict[str, list[Scored]]:
    """Each query's ``k`` best candidates of a stage (the input of the next stage)."""
    return {qid: stage_order(items)[:k] for qid, items in scored.items()}


def final_ranking(stages: Sequence[Mapping[str, Sequence[Scored]]]) -> dict[str, list[Placed]]:
    """Merge per-stage results (``stages[i][qid]`` = what stage i+1 scored) into one ranking per query.

    The last stage's order comes first, then each earlier stage's order for the documents no later stage scored.
    A query appears if any stage scored one of its candidates; ranks are 1-based and dense.
    """
    qids = list(dict.fromkeys(q for stage in stages for q in stage))
    out: dict[str, list[Placed]] = {}
    for qid in qids:
        placed: list[Placed] = []
        seen: set[str] = set()
        for number in range(len(stages), 0, -1):
            for s in stage_order(stages[number - 1].get(qid, ())):
                if s.doc_id not in seen:
                    seen.add(s.doc_id)
                    placed.append(Placed(len(placed) + 1, number, s))
        out[qid] = placed
    return out
