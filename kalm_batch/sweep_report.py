"""The sweep's report: paired statistics over queries, sweep.json, sweep.md and sweep.png (matplotlib, optional).

Significance is a paired bootstrap over queries: the per-query differences (setting - best) are resampled with
replacement ``B`` times; the 95% interval is the percentile interval of the resampled mean difference, and the
two-sided p-value is the share of mean differences of the *centred* resamples (differences minus their mean, i.e.
under "no difference") at least as far from 0 as the observed mean difference.
"""

from __future__ import annotations

import io
import logging

import numpy as np

from kalm_batch import fsio

log = logging.getLogger(__name__)

PRIMARY = "nDCG@10"
SIGNIFICANCE = ("paired bootstrap over queries ({b} resamples, seed {seed}): 95% percentile interval of the mean "
                "difference; two-sided p from the centred resamples")
PLOT_HINT = "sweep.png needs matplotlib: pip install 'kalm-batch[plot]'"


def paired_bootstrap(diffs: np.ndarray, resamples: int, seed: int) -> dict:
    """Mean of the paired differences, its 95% bootstrap interval and the two-sided bootstrap p-value."""
    d = np.asarray(diffs, dtype=np.float64)
    mean = float(d.mean())
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(axis=1)
    centred = means - mean
    p = float(np.mean(np.abs(centred) >= abs(mean) - 1e-12)) if mean != 0 else 1.0
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": mean, "ci95": [float(lo), float(hi)], "p": p}


def _vs_best(row_pq: dict, best_pq: dict, qids: list[str], resamples: int, seed: int) -> dict:
    out = {}
    for measure, values in row_pq.items():
        diffs = np.array([values[q] - best_pq[measure][q] for q in qids])
        out[measure] = paired_bootstrap(diffs, resamples, seed)
    return out


def _means(pq_values: dict) -> dict:
    return {m: float(np.mean(list(v.values()))) for m, v in pq_values.items()}


def build_report(cfg, plan, results: list[dict], sizes: dict[int, dict], first_stage_pq: dict) -> dict:
    """The whole report as plain data: a row per setting (metrics, work, bytes, difference vs the best setting),
    the first-stage row, and how it was made (sample, significance method)."""
    qids = sorted(first_stage_pq[PRIMARY])
    rows = []
    for res in results:
        pq_values = res.pop("per_query")
        rows.append({**res, "metrics": _means(pq_values), "bytes_per_passage": sizes[res["store_ratio"]],
                     "_pq": pq_values})
    best = max(rows, key=lambda r: r["metrics"][PRIMARY])  # first of equals (ratios ascending, then cascades)
    best_pq = best["_pq"]
    first = {"setting": "first stage", "metrics": _means(first_stage_pq), "_pq": first_stage_pq}
    for row in rows + [first]:
        pq_values = row.pop("_pq")
        row["vs_best"] = None if row is best else _vs_best(pq_values, best_pq, qids, cfg.bootstrap, cfg.seed)
    return {
        "store": cfg.store, "r0": plan.r0, "model": cfg.model, "top_k": cfg.top_k, "measures": list(first["metrics"]),
        "n_queries": len(qids), "queries": qids, "eligible_queries": plan.n_eligible, "sampled": plan.sampled,
        "sample": {"n": len(qids), "of": plan.n_eligible, "seed": cfg.seed} if plan.sampled else None,
        "best": best["setting"], "ranked_by": PRIMARY,
        "significance": SIGNIFICANCE.format(b=cfg.bootstrap, seed=cfg.seed),
        "bytes_note": f"mean codec bytes per passage (zstd payload + int8 scales; no Parquet/index overhead), measured "
                      f"on {next(iter(sizes.values()))['passages']} stored passages of the swept candidates, "
                      "coarsened to each ratio; a cascade needs a store at its finest ratio",
        "settings": rows, "first_stage": first, "outputs": {},
    }


# ----- sweep.md --------------------------------------------------------------------------------------------------
def _delta(row: dict, measure: str) -> str:
    vs = row["vs_best"]
    if vs is None:
        return "best"
    d = vs[measure]
    return f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] p={d['p']:.3f}"


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def markdown(report: dict) -> str:
    """sweep.md: quality and cost per setting, then every measure's difference against the best setting."""
    measures = report["measures"]
    scope = (f"a random **sample** of {report['sample']['n']} of the {report['sample']['of']} judged queries "
             f"(--sample-queries, seed {report['sample']['seed']})" if report["sampled"]
             else f"all {report['n_queries']} judged queries")
    lines = [f"# kalm-batch sweep: {report['store']} (r0={report['r0']})", "",
             (f"Model `{report['model']}`; top {report['top_k']} first-stage candidates per query; metrics over "
             f"{scope}. Best setting by {report['ranked_by']}: **{report['best']}**."), ""]
    header = ["setting", *measures, f"Δ {PRIMARY} vs best [95% CI] p", "decoder ms/query", "fetch ms/query",
              "pairs/query", "vectors/query", "decoder tokens/query", "bytes/passage bf16", "bytes/passage int8"]
    body = []
    for r in report["settings"]:
        b = r["bytes_per_passage"]
        body.append([r["setting"], *(f"{r['metrics'][m]:.4f}" for m in measures), _delta(r, PRIMARY),
                     f"{1000 * r['decoder_s_per_query']:.1f}", f"{1000 * r['fetch_decode_s_per_query']:.1f}",
                     f"{r['pairs_per_query']:.1f}", f"{r['vectors_per_query']:.0f}",
                     f"{r['decoder_tokens_per_query']:.0f}", f"{b['bfloat16']:.0f}", f"{b['int8']:.0f}"])
    first = report["first_stage"]
    body.append(["first stage", *(f"{first['metrics'][m]:.4f}" for m in measures), _delta(first, PRIMARY),
                 *["-"] * 7])
    lines += _md_table(header, body)
    lines += ["", f"Differences against **{report['best']}** for every measure (setting - best):", ""]
    lines += _md_table(["setting", *measures], [[r["setting"], *(_delta(r, m) for m in measures)]
                                                for r in report["settings"] + [first]])
    lines += ["", f"Significance: {report['significance']}.", "",
              ("Decoder and fetch ms/query: the rerank summary's decoder scoring and store fetch+decode seconds "
              "(summed over actors) / queries ranked. Decoder tokens: prompt tokens fed to the decoder (the memory "
              "vectors are attended to, not fed)."), "", f"Bytes: {report['bytes_note']}.", ""]
    plot = report["outputs"].get("plot")
    lines += [f"![quality vs cost and bytes]({plot.rsplit('/', 1)[-1]})" if plot else PLOT_HINT, ""]
    return "\n".join(lines)


# ----- sweep.png -------------------------------------------------------------------------------------------------
def _panel(ax, rows: list[dict], first: dict, x_of, xlabel: str) -> None:
    for r in rows:
        x, y = x_of(r), r["metrics"][PRIMARY]
        ax.scatter([x], [y], s=45, zorder=3, marker="o" if r["cascade"] is None else "D")
        ax.annotate(r["setting"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(first["metrics"][PRIMARY], color="grey", linestyle="--", linewidth=1,
               label=f"first stage ({first['metrics'][PRIMARY]:.3f})")
    ax.set_xlim(0, 1.25 * max(x_of(r) for r in rows))  # from 0: costs and bytes compare as ratios
    ax.margins(y=0.12)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(PRIMARY)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def render_png(report: dict) -> bytes | None:
    """The figure as PNG bytes: quality vs decoder ms per query, quality vs bf16 bytes per passage (None, with a
    logged hint, when matplotlib is not installed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning(PLOT_HINT)
        return None
    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    rows, first = report["settings"], report["first_stage"]
    _panel(left, rows, first, lambda r: max(1000 * r["decoder_s_per_query"], 1e-3), "decoder ms per query")
    _panel(right, rows, first, lambda r: r["bytes_per_passage"]["bfloat16"], "bytes per passage (bf16 store)")
    sample = f", sample of {report['n_queries']}/{report['eligible_queries']} queries" if report["sampled"] else ""
    fig.suptitle(f"kalm-batch sweep: {PRIMARY} vs cost (r0={report['r0']}, top {report['top_k']}, "
                 f"{report['n_queries']} queries{sample})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(out: str, report: dict, storage_options: dict | None = None) -> dict:
    """sweep.png (if matplotlib is there), sweep.md and sweep.json under ``out``, each atomically; returns the
    report with its ``outputs``."""
    png = render_png(report)
    outputs = {name: fsio.join_url(out, name) for name in ("sweep.json", "sweep.md")}
    if png is not None:
        outputs["plot"] = fsio.join_url(out, "sweep.png")
        fsio.write_bytes_atomic(outputs["plot"], png, storage_options)
    report["outputs"] = outputs
    fsio.write_bytes_atomic(outputs["sweep.md"], markdown(report).encode(), storage_options)
    fsio.write_json_atomic(outputs["sweep.json"], report, storage_options)
    return report
