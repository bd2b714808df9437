"""Retrieval metrics for runs, computed with ir-measures (trec_eval semantics).

A run is ``{qid: {doc_id: score}}`` (higher score = better; ir-measures orders by score and breaks
ties by doc id, as trec_eval does), qrels are ``{qid: {doc_id: relevance}}``. Aggregates are the mean
over every query that has at least one judgement; a judged query the run lacks scores 0 for every
measure, so a reranker that drops queries is penalised rather than flattered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ir_measures

from kalm_batch.querylog import read_candidates, read_qrels

DEFAULT_MEASURES = ("nDCG@10", "RR@10", "R@100")

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]


def _parse_measures(measures: Sequence[str]) -> dict[Any, str]:
    """Map each parsed ir-measures measure to the name the caller used."""
    parsed: dict[Any, str] = {}
    for name in measures:
        try:
            parsed[ir_measures.parse_measure(name)] = name
        except (NameError, ValueError, TypeError) as exc:
            raise ValueError(f"unknown measure {name!r} ({exc}); use ir-measures names such as 'nDCG@10'") from None
    return parsed


def evaluate_run(run: Run, qrels: Qrels, measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, float]:
    """Mean of each measure over the judged queries, plus ``"n_queries"`` (their number).

    Queries in ``qrels`` with at least one judgement are the denominator. Such a query that is absent
    from ``run`` (or has no candidates there) contributes 0 to every measure. Run queries without
    judgements are ignored. Raises ValueError when qrels hold no judgement at all.
    """
    by_measure = _parse_measures(measures)
    judged = {qid: {doc: int(rel) for doc, rel in docs.items()} for qid, docs in qrels.items() if docs}
    if not judged:
        raise ValueError("evaluate_run: qrels contain no judgements; pass the qrels of the evaluated queries")
    sub_run = {qid: {doc: float(s) for doc, s in run[qid].items()} for qid in judged if run.get(qid)}
    totals = dict.fromkeys(by_measure.values(), 0.0)
    if sub_run:
        for metric in ir_measures.iter_calc(list(by_measure), judged, sub_run):
            if metric.query_id in sub_run:
                totals[by_measure[metric.measure]] += float(metric.value)
    results: dict[str, float] = {name: total / len(judged) for name, total in totals.items()}
    results["n_queries"] = len(judged)
    return results


def compare_runs(
    runs: dict[str, Run], qrels: Qrels, measures: Sequence[str] = DEFAULT_MEASURES
) -> dict[str, dict[str, float]]:
    """Evaluate several named runs on the same qrels: ``{run_name: evaluate_run(...)}``."""
    return {name: evaluate_run(run, qrels, measures) for name, run in runs.items()}


def format_table(results: dict[str, dict[str, float]], measures: Sequence[str] = DEFAULT_MEASURES) -> str:
    """Fixed-width text table: one row per run, one column per measure (4 decimals), then ``n``.

    A measure missing from a run's results shows as ``-``.
    """
    header = ["run", *measures, "n"]
    body = []
    for name, values in results.items():
        cells = [f"{values[m]:.4f}" if m in values else "-" for m in measures]
        count = values.get("n_queries")
        body.append([name, *cells, str(int(count)) if count is not None else "-"])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(row) for row in body)])


def read_run(url: str, storage_options: dict[str, Any] | None = None) -> Run:
    """Read a TREC run file (or candidates Parquet) into ``{qid: {doc_id: score}}``.

    Strict, because silently skipped lines would change the metrics: any malformed line or repeated
    ``(qid, doc_id)`` raises ValueError listing the first few problems with ``file:line``.
    """
    candidates = read_candidates(url, storage_options)
    if candidates.problems:
        shown = "; ".join(p.reason for p in candidates.problems[:5])
        raise ValueError(f"{url}: {len(candidates.problems)} bad run line(s): {shown}")
    run: Run = {}
    for qid, doc_id, _, score in candidates.rows:
        run.setdefault(qid, {})[doc_id] = score
    return run


def eval_files(
    run_url: str,
    qrels_url: str,
    measures: Sequence[str] = DEFAULT_MEASURES,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Evaluate a TREC run file against a qrels file (BEIR TSV or TREC format)."""
    return evaluate_run(read_run(run_url, storage_options), read_qrels(qrels_url, storage_options), measures)


def per_query(run: Run, qrels: Qrels, measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, dict[str, float]]:
    """``{measure: {qid: value}}`` over every judged query, with :func:`evaluate_run`'s conventions.

    A judged query that the run lacks scores 0; unjudged run queries are ignored. The mean of each measure's values
    equals ``evaluate_run(run, qrels, measures)[measure]``. Paired comparisons of runs (kalm_batch.sweep) use these.
    """
    by_measure = _parse_measures(measures)
    judged = {qid: {doc: int(rel) for doc, rel in docs.items()} for qid, docs in qrels.items() if docs}
    if not judged:
        raise ValueError("per_query: qrels contain no judgements; pass the qrels of the evaluated queries")
    values = {name: dict.fromkeys(judged, 0.0) for name in by_measure.values()}
    sub_run = {qid: {doc: float(s) for doc, s in run[qid].items()} for qid in judged if run.get(qid)}
    if sub_run:
        for metric in ir_measures.iter_calc(list(by_measure), judged, sub_run):
            if metric.query_id in sub_run:
                values[by_measure[metric.measure]][metric.query_id] = float(metric.value)
    return values


def per_query_sums(run: Run, qrels: Qrels, measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, float]:
    """Sums of per-query measure values over the judged queries of ``qrels`` (a judged query the run lacks adds 0),
    plus ``"n_queries"``: the parts that ``mean_of_sums`` turns into ``evaluate_run``'s result. Lets workers compute
    metrics for their own queries; the driver only adds the sums."""
    n_judged = sum(1 for docs in qrels.values() if docs)
    if not n_judged:
        return {**dict.fromkeys(_parse_measures(measures).values(), 0.0), "n_queries": 0}
    sums: dict[str, float] = {m: float(sum(v.values())) for m, v in per_query(run, qrels, measures).items()}
    sums["n_queries"] = n_judged
    return sums


def mean_of_sums(parts: Sequence[dict[str, float]], measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, float]:
    """Add ``per_query_sums`` of disjoint query sets and divide by the judged queries: equal to ``evaluate_run`` over
    the union. Raises ValueError when no query is judged."""
    n = sum(int(p.get("n_queries", 0)) for p in parts)
    if not n:
        raise ValueError("no judged query: the qrels hold no judgement for any query; pass the evaluated queries' qrels")
    result = {m: sum(p.get(m, 0.0) for p in parts) / n for m in measures}
    result["n_queries"] = n
    return result
