"""Running one stage exactly once, resumably.

The requests are cut into blocks of ``scale.batch_size`` (one actor call each) and streamed through the
vLLM actor pool; the driver writes every finished block as its own Parquet part, atomically
(temporary file + rename). A rerun reads the keys of the parts already written and sends only the
rest, so a stage killed at any point finishes with exactly one row per (query, window). The stage
table is consolidated from the parts and checked against the expected keys before it counts as done.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time
import uuid
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from utilrag import store
from utilrag.annotate.engine import AnnotateError, LLMPredictor, actor_resources, engine_kwargs, sampling_kwargs
from utilrag.annotate.prompts import PROMPT_VERSION
from utilrag.annotate.stages import STAGE_SCHEMA, parse_output, stage_regex
from utilrag.config import AnnotateConfig
from utilrag.data.tables import read_table
from utilrag.logs import clock, get_logger

PART_SCHEMA = pa.schema([("key", pa.string()), *STAGE_SCHEMA])

log = get_logger("annotate")


def read_parts(parts: str) -> pa.Table:
    files = [n for n in store.list_names(parts) if n.startswith("part-") and n.endswith(".parquet")]
    if not files:
        return PART_SCHEMA.empty_table()
    fs, folder = store.filesystem(parts)
    return pa.concat_tables(
        [pq.read_table(posixpath.join(folder, f), schema=PART_SCHEMA, filesystem=fs) for f in files]
    )


def clear_parts(parts: str, changed: bool, label: str) -> None:
    """Before a (re)run writes parts: all of them go if what they were made from changed; otherwise only
    the temporary files of parts being written when the last run was killed."""
    if changed and store.exists(parts):
        log.info(f"{label}: inputs or settings changed; discarding {parts}")
        store.remove(parts)
    for stale in store.list_names(parts):
        if stale.startswith(".tmp-"):
            store.remove(store.join(parts, stale))


def write_atomic(table: pa.Table, location: str) -> None:
    """All of a file or none of it: locally written aside and renamed into place; on object storage
    one upload, which becomes visible only when complete."""
    fs, path = store.filesystem(location)
    if store.is_remote(location):
        pq.write_table(table, path, filesystem=fs)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_part(parts: str, table: pa.Table) -> str:
    name = store.join(parts, f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet")
    write_atomic(table, name)
    return name


def engine_failure(stage: str, err: Exception) -> AnnotateError:
    """The engine's own message, not Ray's traceback around it."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for line in lines:
        if "the vLLM engine did not start: " in line and "{self.error}" not in line:
            return AnnotateError(f"{stage}: " + line[line.index("the vLLM engine did not start: ") :])
    return AnnotateError(f"{stage}: the annotation job failed: {type(err).__name__}: {' | '.join(lines[-3:])}")


def stage_sampling(stage: str, acfg: AnnotateConfig) -> dict:
    max_tokens = acfg.sampling.answer_max_tokens if stage == "answer" else acfg.sampling.max_tokens
    return sampling_kwargs(acfg, max_tokens, stage_regex(stage))


def run_stage(
    stage: str,
    requests: pa.Table,
    folder: str | os.PathLike,
    fingerprint: str,
    acfg: AnnotateConfig,
    model_path: str,
    label: str,
    prompt_version: str = PROMPT_VERSION,
) -> tuple[pa.Table, dict]:
    """Run (or resume, or reuse) ``stage`` over ``requests``; returns the stage table and its summary.
    ``folder`` is a local path or a URI. ``prompt_version`` is recorded on every row (the RAG stage
    passes its own)."""
    folder = store.normalize(folder)
    final = store.join(folder, f"{stage}.parquet")
    parts = store.join(folder, f"{stage}.parts")
    step = store.SideStep.at(store.join(folder, f"{stage}.meta"), fingerprint)
    old = step.reusable(final)
    if old is not None:
        log.info(f"{label} {stage}: unchanged, reusing {final}")
        return read_table(final), old["summary"]
    clear_parts(parts, step.changed, f"{label} {stage}")
    step.begin(stage=stage, expected_rows=requests.num_rows)

    expected = set(requests.column("key").to_pylist())
    written = read_parts(parts)
    done = set(written.column("key").to_pylist())
    todo = requests.filter(pc.invert(pc.is_in(requests.column("key"), pa.array(sorted(done), pa.string()))))
    t0 = time.time()
    if done:
        log.info(
            f"{label} {stage}: resuming: {len(done):,} of {len(expected):,} requests already done, "
            f"{todo.num_rows:,} to go"
        )
    new_rows, dropped, engine_s = 0, 0, None
    if todo.num_rows:
        new_rows, dropped, engine_s = _generate(
            stage, todo, parts, done, acfg, model_path, label, len(expected), prompt_version
        )

    table = read_parts(parts)
    counts = Counter(table.column("key").to_pylist())
    duplicates = sum(c - 1 for c in counts.values())
    missing = expected - set(counts)
    extra = set(counts) - expected
    if duplicates or missing or extra:  # cannot happen by construction; refuse to hand it on if it does
        raise AnnotateError(
            f"{label} {stage}: {len(missing)} missing, {duplicates} duplicate, {len(extra)} unexpected "
            f"rows in {parts}; rerun to finish the missing ones"
        )
    table = table.sort_by([("query_id", "ascending"), ("window", "ascending")]).drop_columns(["key"])
    write_atomic(table, final)
    summary = summarise(stage, table, time.time() - t0, new_rows, dropped, engine_s)
    step.finish(stage=stage, expected_rows=requests.num_rows, summary=summary)
    log.info(f"{label} {stage}: {summary_line(summary)}")
    return table, summary


def _generate(
    stage,
    todo: pa.Table,
    parts: str,
    done: set[str],
    acfg: AnnotateConfig,
    model_path: str,
    label: str,
    total: int,
    prompt_version: str,
) -> tuple[int, int, float | None]:
    """Generate the missing rows; returns (new rows, dropped rows, engine seconds since the first replica was ready)."""
    import ray

    by_key = {k: i for i, k in enumerate(todo.column("key").to_pylist())}
    columns = {c: todo.column(c).to_pylist() for c in ["query_id", "window", "doc_ids", "passages_cut"]}
    sampling = stage_sampling(stage, acfg)
    meta = {
        "model": acfg.model,
        "prompt_version": prompt_version,
        "constrained": bool(acfg.sampling.constrained),
        "sampling": json.dumps({k: v for k, v in sampling.items() if k != "regex"}, sort_keys=True),
    }
    fail = None  # fault injection for tests only (never in a config): a replica dies once in batch N
    if os.environ.get("UTILRAG_FAULT_ANNOTATE_FAIL_AFTER_BATCHES"):
        fail = {
            "after_batches": int(os.environ["UTILRAG_FAULT_ANNOTATE_FAIL_AFTER_BATCHES"]),
            "marker": os.path.join(
                os.path.dirname(parts) if not store.is_remote(parts) else tempfile.gettempdir(), f".{stage}.crashed"
            ),
        }
    # One block per actor call: a batch lost with its replica is retried whole, never half-delivered.
    size = acfg.scale.batch_size
    blocks = [todo.select(["key", "messages"]).slice(i, size) for i in range(0, todo.num_rows, size)]
    ds = ray.data.from_arrow(blocks).map_batches(
        LLMPredictor,
        batch_size=size,
        batch_format="numpy",
        fn_constructor_kwargs=dict(model=model_path, engine=engine_kwargs(acfg), sampling=sampling, fail=fail),
        compute=ray.data.ActorPoolStrategy(min_size=acfg.scale.replicas[0], max_size=acfg.scale.replicas[1]),
        **actor_resources(acfg),
    )
    queries_total = len(set(columns["query_id"]) | {k.split("\t")[0] for k in done})
    seen_keys: set[str] = set(done)
    queries_done = Counter(k.split("\t")[0] for k in done)
    expected_per_query = Counter(columns["query_id"]) + queries_done
    new_rows = dropped = tokens = 0
    t0 = last = time.time()
    first_ready = None  # tokens/s counts from the first engine ready, not from the engine start
    try:
        batch: Any
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows: dict[str, list[Any]] = {name: [] for name in PART_SCHEMA.names}
            for key, raw, p_tok, o_tok, c_tok, reason in zip(
                *(
                    batch.column(c).to_pylist()
                    for c in ["key", "raw_output", "prompt_tokens", "output_tokens", "cached_tokens", "finish_reason"]
                )
            ):
                if key in seen_keys:  # never expected (one block per call); counted if it happens
                    dropped += 1
                    continue
                seen_keys.add(key)
                i = by_key[key]
                parsed = parse_output(stage, raw, columns["doc_ids"][i], reason)
                values = dict(
                    key=key,
                    query_id=columns["query_id"][i],
                    window=columns["window"][i],
                    doc_ids=columns["doc_ids"][i],
                    raw_output=raw,
                    prompt_tokens=p_tok,
                    output_tokens=o_tok,
                    cached_tokens=c_tok,
                    finish_reason=reason,
                    passages_cut=columns["passages_cut"][i],
                    **parsed,
                    **meta,
                )
                for name in PART_SCHEMA.names:
                    rows[name].append(values[name])
                queries_done[columns["query_id"][i]] += 1
                tokens += p_tok + o_tok
            ready = min(batch.column("actor_ready_at").to_pylist(), default=None)
            if ready is not None:
                first_ready = ready if first_ready is None else min(first_ready, ready)
            if rows["key"]:
                write_part(parts, pa.table(rows, schema=PART_SCHEMA))
                new_rows += len(rows["key"])
            now = time.time()
            if now - last >= acfg.scale.progress_every_s:
                last = now
                finished = sum(1 for q, n in queries_done.items() if n >= expected_per_query[q])
                # The rate and ETA go by requests: a question finishes only with its last row (k, retriever)
                rate = new_rows / max(now - t0, 1e-9)
                eta = f"ETA {clock((total - len(seen_keys)) / rate)}" if rate > 0 else "ETA unknown"
                log.info(
                    f"{label} {stage}: requests {len(seen_keys):,}/{total:,} ({rate:,.2f}/s, {eta}), queries "
                    f"{finished:,}/{queries_total:,} complete, "
                    f"{tokens / max(now - (first_ready or t0), 1e-9):,.0f} tokens/s"
                )
    except AnnotateError:
        raise
    except Exception as e:  # noqa: BLE001 -- Ray wraps the engine's error; surface the engine's words
        raise engine_failure(stage, e) from None
    return new_rows, dropped, (time.time() - first_ready) if first_ready else None


def summarise(
    stage: str, table: pa.Table, wall_s: float, new_rows: int, dropped: int, engine_s: float | None = None
) -> dict:
    n = table.num_rows
    queries = len(set(table.column("query_id").to_pylist()))
    status = Counter(table.column("parse_status").to_pylist())
    prompt_tokens = pc.sum(table.column("prompt_tokens")).as_py() or 0
    output_tokens = pc.sum(table.column("output_tokens")).as_py() or 0
    cached = pc.sum(table.column("cached_tokens")).as_py() or 0
    return {
        "rows": n,
        "queries": queries,
        "new_rows": new_rows,
        "resumed_rows": n - new_rows,
        "duplicates_dropped": dropped,
        "parse_status": dict(status),
        "parse_failure_rate": round(1 - status.get("ok", 0) / n, 4) if n else 0.0,
        "finish_reasons": dict(Counter(table.column("finish_reason").to_pylist())),
        "invalid_ids": pc.sum(table.column("invalid_ids")).as_py() or 0,
        "repeated_ids": pc.sum(table.column("repeated_ids")).as_py() or 0,
        "passages_cut": pc.sum(table.column("passages_cut")).as_py() or 0,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "prompt_tokens_per_query": round(prompt_tokens / queries, 1) if queries else 0.0,
        "prefix_cache_hit_rate": round(cached / prompt_tokens, 4) if prompt_tokens else 0.0,
        "wall_s": round(wall_s, 1),
        # generation time: from the first replica ready to the last row (engine start excluded)
        "generate_s": round(engine_s, 1) if engine_s else None,
        "tokens_per_s": round((prompt_tokens + output_tokens) / engine_s, 1) if new_rows == n and engine_s else None,
        "queries_per_s": round(queries / engine_s, 4) if new_rows == n and engine_s else None,
    }


def summary_line(s: dict) -> str:
    rate = f" ({s['generate_s']:.0f}s generating, {s['tokens_per_s']:,.0f} tokens/s)" if s.get("tokens_per_s") else ""
    return (
        f"{s['rows']:,} rows ({s['new_rows']:,} new, {s['resumed_rows']:,} resumed) over {s['queries']:,} queries; "
        f"parse failures {s['parse_failure_rate']:.1%} {s['parse_status']}; {s['prompt_tokens_per_query']:,.0f} "
        f"prompt tokens/query, prefix-cache hits {s['prefix_cache_hit_rate']:.1%}; {s['wall_s']:.0f}s{rate}"
    )
