"""Smaller stages of the rerank job, as plain functions (each runs without Ray):

- ``prepared_dataset`` / ``count_prepared`` (driver): the prepared records (``_work/prepared/part=N/``) and their
  counts, streamed;
- ``count_records`` (``map_batches``, dry run): counts and work estimates of a batch of joined records;
- ``dry_run_report`` (driver): runs the counting pass and adds the counts up;
- ``add_counters`` (driver): the committed partitions' counters added up for the summary.

The read stage is kalm_batch/pipelines/rerank_inputs.py, the per-query plan rerank_plan.py, the scoring actor
rerank_partition.py.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from kalm_batch import fsio, runfolder
from kalm_batch.pipelines.rerank_plan import PAIR, PROBLEM, QUERY, SKIP


def _role(t: pa.Table, role: str) -> pa.Table:
    return t.filter(pc.equal(t.column("role"), role))


def prepared_dataset(out: str, storage_options: dict | None = None, part: int | None = None):
    """The prepared records (all, or one partition's) as a pyarrow dataset (hive partitions ``part=N``)."""
    import pyarrow.dataset as ds

    url = fsio.join_url(out, runfolder.PREPARED_DIR, *([f"part={part}"] if part is not None else []))
    fs, path = fsio.fs_for_pyarrow(url, storage_options)
    return ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive" if part is None else None)


def count_prepared(out: str, storage_options: dict | None = None) -> dict:
    """Partitions and pair counts of the prepared records, streamed from two small columns (constant memory)."""
    import pyarrow.dataset as ds

    fs, path = fsio.fs_for_pyarrow(fsio.join_url(out, runfolder.PREPARED_DIR), storage_options)
    parts = sorted(int(info.base_name.split("=", 1)[1]) for info in fs.get_file_info(
        __import__("pyarrow.fs", fromlist=["FileSelector"]).FileSelector(path, allow_not_found=True))
        if info.base_name.startswith("part="))
    data = prepared_dataset(out, storage_options)
    role, file = ds.field("role"), ds.field("file")
    pairs = data.count_rows(filter=role == PAIR)
    return {"parts": parts, "input_pairs": pairs + data.count_rows(filter=role == SKIP),
            "pairs_found": data.count_rows(filter=(role == PAIR) & file.is_valid()), "records": data.count_rows()}


# ----- dry run -------------------------------------------------------------------------------------------------
_TOKENIZERS: dict = {}


def _prompt_len(model: str, instruction: str | None, query_max_length: int):
    from kalm_batch.reranker import KaLMReranker

    if model not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[model] = KaLMReranker(model, query_max_length=query_max_length)  # tokenizer + config only
    reranker = _TOKENIZERS[model]
    return lambda text: len(reranker.prompt_ids(text, instruction))


def count_records(batch: pa.Table, *, model: str, instruction: str | None, query_max_length: int,
                  ks: list[int]) -> pa.Table:
    """Counts of a batch of joined records; per stage s, pairs <= sum over queries of min(K_s, its pairs)."""
    pairs, queries = _role(batch, PAIR), _role(batch, QUERY)
    prompt_len = _prompt_len(model, instruction, query_max_length)
    stage_pairs, stage_tokens = [0] * len(ks), [0] * len(ks)
    for text, n in zip(queries.column("query").to_pylist(), queries.column("first_stage_rank").to_pylist()):
        length = prompt_len(text)
        for i, k in enumerate(ks):
            stage_pairs[i] += min(k, n)
            stage_tokens[i] += min(k, n) * length
    counts = {"queries": queries.num_rows, "pairs": pairs.num_rows, "missing": pairs.column("file").null_count,
              "no_query": _role(batch, SKIP).num_rows, "stage_pairs": stage_pairs, "stage_prompt_tokens": stage_tokens,
              "problems": dict(Counter(_role(batch, PROBLEM).column("kind").to_pylist())),
              "files": sorted(set(pairs.column("file").drop_null().to_pylist()))}
    return pa.table({"counts": [json.dumps(counts)]})


def dry_run_report(cfg, joined, reader, stages, start: float):
    """Execute the counting pass over the joined records; returns a RerankSummary with ``estimate`` filled."""
    from kalm_batch.pipelines.cluster import stage_remote_args
    from kalm_batch.pipelines.rerank import RerankSummary

    ks = [s.k for s in stages]
    rows = joined.map_batches(count_records, batch_format="pyarrow", batch_size=None, num_cpus=0.5,
                              fn_kwargs={"model": cfg.model, "instruction": cfg.instruction,
                                         "query_max_length": cfg.query_max_length, "ks": ks}, **stage_remote_args())
    total: dict = {"queries": 0, "pairs": 0, "missing": 0, "no_query": 0, "problems": Counter(), "files": set(),
                   "stage_pairs": [0] * len(ks), "stage_prompt_tokens": [0] * len(ks)}
    for row in rows.iter_rows():
        c = json.loads(row["counts"])
        for key in ("queries", "pairs", "missing", "no_query"):
            total[key] += c[key]
        total["problems"].update(c["problems"])
        total["files"].update(c["files"])
        for key in ("stage_pairs", "stage_prompt_tokens"):
            total[key] = [a + b for a, b in zip(total[key], c[key])]
    seconds = time.perf_counter() - start
    found = total["pairs"] - total["missing"]
    summary = reader.summary()
    per_doc = summary["vectors"] / summary["rows"] if summary.get("vectors") and summary.get("rows") else None
    per_stage = []
    for i, s in enumerate(stages):
        pairs = found if i == 0 else min(found, total["stage_pairs"][i])
        vectors = round(pairs * per_doc * reader.ratio / s.ratio) if per_doc else None
        scale = pairs / total["stage_pairs"][i] if total["stage_pairs"][i] else 0.0
        prompt = round(total["stage_prompt_tokens"][i] * scale)
        per_stage.append({"stage": i + 1, "ratio": s.ratio, "k": s.k, "pairs": pairs, "vectors": vectors,
                          "decoder_tokens": prompt + vectors if vectors is not None else None,
                          "prompt_tokens": prompt, "vectors_note": "estimated from the store's mean vectors per doc"})
    estimate = {"queries": total["queries"], "input_pairs": total["pairs"] + total["no_query"],
                "pairs_in_store": found, "pairs_doc_missing": total["missing"], "pairs_no_query": total["no_query"],
                "store_files_touched": len(total["files"]), "problems": dict(sorted(total["problems"].items())),
                "stages": per_stage, "seconds": round(seconds, 3),
                "seconds_per_million_pairs": round(seconds / max(total["pairs"], 1) * 1e6, 2)}
    return RerankSummary(out=cfg.out, dry_run=True, store=summary, stages=per_stage, input_pairs=estimate["input_pairs"],
                         pairs_scored=0, skipped_pairs=total["missing"] + total["no_query"],
                         skipped={"doc_not_in_store": total["missing"], "no_query": total["no_query"]},
                         pairs_per_s=0.0, wall_s=round(seconds, 3), fetch_decode_s=0.0, score_s=0.0,
                         fetch_decode_share=0.0, queries_ranked=0, problems=estimate["problems"], estimate=estimate)


# ----- summary -------------------------------------------------------------------------------------------------
def add_counters(counters: list[dict], stages, score_wall: float) -> dict:
    """The partitions' counters added up: pairs, skipped and problems by kind, per-stage costs, per-actor busy time,
    per-run metric sums (a list of per-partition sums per run name)."""
    skipped, problems = Counter(), Counter()
    per_stage = [defaultdict(float) for _ in stages]
    actors: dict[str, dict] = {}
    metrics: dict[str, list[dict]] = defaultdict(list)
    for c in counters:
        skipped.update(c["skipped"])
        problems.update(c["problems"])
        for acc, cost in zip(per_stage, c["costs"]):
            for key in ("pairs", "errors", "vectors", "files", "fetch_decode_s", "score_s"):
                acc[key] += cost[key]
        a = actors.setdefault(c["actor"], {"actor": c["actor"], "partitions": 0, "busy_s": 0.0,
                                           "started": c["actor_started"], "finished": c["finished"]})
        a["partitions"] += 1
        a["busy_s"] += c["busy_s"]
        a["finished"] = max(a["finished"], c["finished"])
        for name, sums in (c.get("metrics") or {}).items():
            metrics[name].append(sums)
    stage_rows = [{"stage": i + 1, "ratio": s.ratio, "k": s.k, **{k: (round(v, 4) if isinstance(v, float) and
                   k.endswith("_s") else int(v)) for k, v in acc.items()}} for i, (s, acc) in
                  enumerate(zip(stages, per_stage))]
    for row in stage_rows:
        row.setdefault("pairs", 0)
        row.setdefault("vectors", 0)
    actor_rows = [{"actor": a["actor"], "partitions": a["partitions"], "busy_s": round(a["busy_s"], 3),
                   "busy_share": round(a["busy_s"] / max(a["finished"] - a["started"], 1e-9), 3)}
                  for a in actors.values()]
    return {"stages": stage_rows, "input_pairs": sum(c["input_pairs"] for c in counters),
            "pairs_scored": sum(c["pairs_scored"] for c in counters), "skipped_pairs": sum(skipped.values()),
            "skipped": dict(sorted(skipped.items())), "problems": dict(sorted(problems.items())),
            "queries_ranked": sum(c["queries_ranked"] for c in counters),
            "run_lines": sum(c["run_lines"] for c in counters), "actors": actor_rows, "metrics": dict(metrics),
            "write_s": round(sum(c.get("write_s", 0.0) for c in counters), 4),
            "fetch_decode_s": sum(r.get("fetch_decode_s", 0.0) for r in stage_rows),
            "score_s": sum(r.get("score_s", 0.0) for r in stage_rows)}
