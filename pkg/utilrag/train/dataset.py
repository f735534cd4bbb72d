"""Training groups: per query its positives (from the chosen label source) and negatives (the rest
of its candidate pool), m+1 passages per group, re-sampled each epoch with a seed; built with their
texts by one task on a CPU node into one Parquet file per phase and worker, which that worker reads
in order and tokenises as it trains."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from utilrag import store
from utilrag.config import PipelineConfig, TrainConfig
from utilrag.data.dataset import open_dataset
from utilrag.data.labels import agreement, read_external_labels
from utilrag.data.tables import read_table
from utilrag.errors import UtilragError
from utilrag.store import Committed, Store


class TrainInputError(UtilragError):
    """A training input (labels, pools) that is missing or unusable."""


def human_positives(cfg: PipelineConfig, tcfg: TrainConfig) -> dict[str, set[str]]:
    dataset = open_dataset(cfg, tcfg.dataset)
    qrels = dataset.qrels(tcfg.split)
    positives: dict[str, set[str]] = defaultdict(set)
    for q, d, g in zip(*(qrels.column(c).to_pylist() for c in ["query_id", "doc_id", "grade"])):
        if g >= dataset.relevance_threshold:
            positives[q].add(d)
    return positives


def labels_location(cfg: PipelineConfig, tcfg: TrainConfig) -> tuple[str, Committed | None]:
    """The labels table: train.labels_path as given, else the annotation stage's committed output."""
    if tcfg.labels_path:
        if not store.exists(tcfg.labels_path):
            raise TrainInputError(f"train.labels_path {tcfg.labels_path}: not found")
        return tcfg.labels_path, None
    folder = Store(cfg.output_dir).annotate(tcfg.dataset, tcfg.split)
    committed = store.require(
        folder, f"train.labels={tcfg.labels!r} needs the annotation of {tcfg.dataset}/{tcfg.split} (or labels=human)"
    )
    return committed.path("labels.parquet"), committed


def llm_labels(cfg: PipelineConfig, tcfg: TrainConfig) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """The source's positives per query, and the passages it labelled at all (positive or not). External
    labels list positives only: what they did not choose is unknown, so a query's human positives they
    leave out are neither positive nor negative (as Exclusion)."""
    if tcfg.labels == "external":
        assert tcfg.labels_path is not None  # validated with the config
        external = read_external_labels(tcfg.labels_path)
        return external, {q: set(d) for q, d in external.items()}
    labels = read_table(labels_location(cfg, tcfg)[0])
    labels = labels.filter(pc.equal(labels.column("source"), tcfg.labels))
    positives: dict[str, set[str]] = defaultdict(set)
    labelled: dict[str, set[str]] = defaultdict(set)
    for q, d, positive in zip(*(labels.column(c).to_pylist() for c in ["query_id", "doc_id", "positive"])):
        labelled[q].add(d)
        if positive:
            positives[q].add(d)
    return positives, labelled


def pools_by_query(cfg: PipelineConfig, tcfg: TrainConfig) -> dict[str, list[str]]:
    folder = Store(cfg.output_dir).pools(tcfg.dataset, tcfg.split)
    pools = read_table(store.require(folder, f"train: pools of {tcfg.dataset}/{tcfg.split}").path("pools.parquet"))
    by_query: dict[str, list[str]] = defaultdict(list)
    for q, d in zip(pools.column("query_id").to_pylist(), pools.column("doc_id").to_pylist()):
        by_query[q].append(d)
    return by_query


def seeded_percent(query_ids: list[str], percent: float, seed: int) -> set[str]:
    n = int(round(len(query_ids) * percent / 100))
    return set(random.Random(f"{seed}:human").sample(sorted(query_ids), n))


@dataclass
class Phase:
    """One training phase: positives per query, and the passages never used as negatives."""

    name: str
    positives: dict[str, set[str]]
    epochs: int
    mode: str  # positive sampling: all / one / rand1 / avg
    not_negative: dict[str, set[str]] = field(default_factory=dict)


def phase_positives(cfg: PipelineConfig, tcfg: TrainConfig, query_ids: list[str] | None = None) -> list[Phase]:
    """The training phases.

    LLM labels: a human positive the labels leave out (Exclusion) is neither positive nor negative.
    Curriculum: phase 1 on the LLM labels, phase 2 on the human labels of a seeded X% of the
    queries with Pos-one (the optimizer and lr are reset between phases). X% (and human_mix_percent's)
    is of the training queries (``query_ids``: the pooled ones, after max_queries), not of every
    query the qrels label: a subset run must not draw its human share mostly outside itself."""
    human = human_positives(cfg, tcfg)
    among = list(human) if query_ids is None else [q for q in query_ids if q in human]
    if tcfg.labels == "human":
        return [Phase("human", human, tcfg.epochs, tcfg.positives)]
    llm, labelled = llm_labels(cfg, tcfg)
    excluded = {q: human[q] - labelled[q] for q in labelled if human.get(q, set()) - labelled[q]}
    if tcfg.human_mix_percent:
        for q in seeded_percent(among, tcfg.human_mix_percent, tcfg.seed):
            llm[q] = llm.get(q, set()) | human[q]
    phases = [Phase(tcfg.labels, llm, tcfg.epochs, tcfg.positives, excluded)]
    if tcfg.curriculum_human_percent:
        chosen = seeded_percent(among, tcfg.curriculum_human_percent, tcfg.seed)
        phases.append(Phase("curriculum-human", {q: human[q] for q in chosen}, tcfg.curriculum_epochs, "one"))
    return phases


def make_groups(
    positives: dict[str, set[str]],
    pools: dict[str, list[str]],
    group_size: int,
    mode: str,
    epochs: int,
    seed: int,
    query_ids: list[str],
    not_negative: dict[str, set[str]] | None = None,
) -> list[dict]:
    """One row per (epoch, query with a positive): group_size doc ids and a positive mask.

    Positive sampling (docs/method.md §4): ``all`` and ``avg`` put every positive in the group (up
    to group_size - 1; the loss sums or averages over them), ``one`` always the same one (drawn once),
    ``rand1`` one drawn anew each epoch. Negatives: the rest of the pool, less ``not_negative``."""
    rows = []
    for epoch in range(epochs):
        order = list(query_ids)
        random.Random(f"{seed}:order:{epoch}").shuffle(order)
        for q in order:
            pos = sorted(positives.get(q, ()))
            if not pos:
                continue  # a query without a positive carries no signal for these losses
            rng = random.Random(f"{seed}:{q}:{epoch}")
            skip = positives[q] | (not_negative or {}).get(q, set())
            negs = [d for d in pools.get(q, []) if d not in skip]
            if mode in ("all", "avg"):
                chosen = rng.sample(pos, min(len(pos), group_size - 1))
            elif mode == "one":  # one positive per query, drawn once (seeded), the same every epoch
                chosen = [random.Random(f"{seed}:{q}:one").choice(pos)]
            else:
                chosen = [rng.choice(pos)]
            need = group_size - len(chosen)
            if len(negs) >= need:
                picked = rng.sample(negs, need)
            elif negs:
                picked = [rng.choice(negs) for _ in range(need)]
            else:
                continue
            rows.append(
                {
                    "epoch": epoch,
                    "query_id": q,
                    "doc_ids": chosen + picked,
                    "positives": [True] * len(chosen) + [False] * need,
                }
            )
    return rows


def tokenize_batch(batch: dict, tokenizer, query_max_len: int, passage_max_len: int) -> dict:
    """One batch of texts (numpy columns) -> fixed-length token id arrays. Run in the training worker,
    as Tevatron's collator does: a fast tokenizer takes milliseconds per batch, while a Ray Data map
    task per phase cost a process start and a tokenizer load (~10 s a phase here)."""
    q = tokenizer(
        list(batch["query"]), padding="max_length", truncation=True, max_length=query_max_len, return_tensors="np"
    )
    groups = [list(g) for g in batch["passages"]]
    n, size = len(groups), len(groups[0])
    p = tokenizer(
        [x for g in groups for x in g],
        padding="max_length",
        truncation=True,
        max_length=passage_max_len,
        return_tensors="np",
    )
    return {
        "q_ids": q["input_ids"],
        "q_mask": q["attention_mask"],
        "p_ids": p["input_ids"].reshape(n, size, passage_max_len),
        "p_mask": p["attention_mask"].reshape(n, size, passage_max_len),
        "positives": np.array([list(x) for x in batch["positives"]], dtype=bool),
    }


def deal_to_workers(rows: list[dict], tcfg: TrainConfig) -> tuple[list[list[dict]], int]:
    """Rows dealt round-robin in batches of per_device_queries and cut to equal step counts (the
    cross-worker gather needs equal local batches), so a resumed run sees the same data."""
    per_step = tcfg.per_device_queries * tcfg.num_workers
    steps = len(rows) // per_step
    if tcfg.max_steps is not None:
        steps = min(steps, tcfg.max_steps)
    if steps == 0:
        raise TrainInputError(
            f"train: {len(rows)} training groups are fewer than one step "
            f"({tcfg.per_device_queries} queries x {tcfg.num_workers} workers)"
        )
    per_worker: list[list[dict]] = [[] for _ in range(tcfg.num_workers)]
    for step in range(steps):
        for w in range(tcfg.num_workers):
            start = step * per_step + w * tcfg.per_device_queries
            per_worker[w].extend(rows[start : start + tcfg.per_device_queries])
    return per_worker, steps


GROUP_SCHEMA = pa.schema(
    [("query", pa.string()), ("passages", pa.list_(pa.string())), ("positives", pa.list_(pa.bool_()))]
)


def build_worker_files(cfg: PipelineConfig, tcfg: TrainConfig, location: str) -> list[dict]:
    """Every phase's training groups with their texts, one Parquet file per phase and worker
    (``<location>/<phase>_<rank>.parquet``, in step order); returns the phases (name, steps, offset,
    groups, positive_sampling). Run as a task on a CPU node (``build_on_a_worker``): the pools, labels,
    the pooled passages' texts and the groups are held there, never on the driver (the head)."""
    dataset = open_dataset(cfg, tcfg.dataset)
    pools = pools_by_query(cfg, tcfg)
    query_ids = sorted(pools)
    if tcfg.max_queries is not None and tcfg.max_queries < len(query_ids):
        query_ids = sorted(seeded_percent(query_ids, 100 * tcfg.max_queries / len(query_ids), tcfg.seed))
    queries = dataset.table("queries")
    texts = dict(zip(queries.column("query_id").to_pylist(), queries.column("text").to_pylist()))
    del queries
    phases, offset, dealt = [], 0, []
    planned = phase_positives(cfg, tcfg, query_ids)
    if tcfg.labels == "external":  # compared with the human positives as the annotation report does ours
        pooled = {q: pools[q] for q in query_ids}
        assert tcfg.labels_path is not None  # validated with the config
        # the file's own positives: phase 1 may have the human mix (human_mix_percent) added
        label_agreement = agreement(read_external_labels(tcfg.labels_path), human_positives(cfg, tcfg), pooled)
    for phase in planned:
        rows = make_groups(
            phase.positives, pools, tcfg.group_size, phase.mode, phase.epochs, tcfg.seed, query_ids, phase.not_negative
        )
        if not rows:  # say why, in the user's terms: no positive at all, or nothing left to contrast them with
            labelled = [q for q in query_ids if phase.positives.get(q)]
            whole = [
                q for q in labelled if set(pools.get(q, [])) <= phase.positives[q] | phase.not_negative.get(q, set())
            ]
            raise TrainInputError(
                f"train ({tcfg.name}): no training group from the {phase.name!r} labels: {len(labelled):,} of "
                f"{len(query_ids):,} pooled queries have a positive, and {len(whole):,} of those have every pool "
                "passage positive (no negative to contrast them with): larger pools, or another label setting"
            )
        per_worker, steps = deal_to_workers(rows, tcfg)
        dealt.append((phase.name, per_worker))
        phases.append(
            {"name": phase.name, "steps": steps, "offset": offset, "groups": len(rows), "positive_sampling": phase.mode}
        )
        if tcfg.labels == "external" and len(phases) == 1:
            phases[0]["label_agreement"] = label_agreement
        offset += steps
    # only the passages the groups show (pools and positives): at MS MARCO's scale a fraction of the corpus
    shown = pa.array(sorted({d for _, ws in dealt for items in ws for r in items for d in r["doc_ids"]}), pa.string())
    corpus = dataset.table("corpus")
    corpus = corpus.filter(pc.is_in(pc.cast(corpus.column("doc_id"), pa.string()), value_set=shown))
    docs = {
        str(d): f"{t or ''} {x or ''}".strip()
        for d, t, x in zip(*(corpus.column(c).to_pylist() for c in ["doc_id", "title", "text"]))
    }
    del corpus
    missing = next((d for d in shown.to_pylist() if d not in docs), None)
    if missing is not None:
        raise TrainInputError(
            f"train: passage {missing!r} of a training group (a pool passage or a positive) is not in the corpus "
            f"of {tcfg.dataset}"
        )
    rows_per_group = tcfg.per_device_queries * max(1, 4096 // tcfg.per_device_queries)
    for name, per_worker in dealt:
        for rank, items in enumerate(per_worker):
            table = pa.table(
                {
                    "query": [texts[r["query_id"]] for r in items],
                    "passages": [[docs[d] for d in r["doc_ids"]] for r in items],
                    "positives": [r["positives"] for r in items],
                },
                schema=GROUP_SCHEMA,
            )
            _write_whole(table, group_file(location, name, rank), rows_per_group)
    return phases


def _write_whole(table: pa.Table, location: str, row_group_size: int) -> None:
    """A file a reader sees whole or not at all (a second job of the same settings, refused at its
    begin, writes the same files meanwhile): a local file by rename; an object PUT is whole anyway.
    Row groups of a multiple of the batch size: read_groups's batches never straddle two."""
    import pyarrow.parquet as pq

    fs, path = store.filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    staged = path if store.is_remote(location) else f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, staged, filesystem=fs, row_group_size=row_group_size)
    if staged != path:
        os.replace(staged, path)


def build_on_a_worker(cfg: PipelineConfig, tcfg: TrainConfig, location: str) -> list[dict]:
    """build_worker_files as one Ray task on a CPU node; a TrainInputError raised there comes back as itself."""
    from utilrag.raycluster import on_a_cpu_node

    resolved = cfg.model_copy(update={"output_dir": Store(cfg.output_dir).root})  # the task's cwd is not ours
    if tcfg.labels_path:
        tcfg = tcfg.model_copy(update={"labels_path": store.normalize(tcfg.labels_path)})
    return on_a_cpu_node(build_worker_files, resolved, tcfg, location)


def group_file(location: str, phase: str, rank: int) -> str:
    return store.join(location, f"{phase}_{rank}.parquet")


def read_groups(location: str, batch_size: int) -> Iterator[dict]:
    """A worker's own group file, in file order, in batches of ``batch_size`` rows (the file is written
    in row groups of a multiple of it, so every batch is whole). Read with pyarrow in the training
    process: a Ray Data read would start tasks that each ask for a CPU the training workers hold."""
    import pyarrow.parquet as pq

    fs, path = store.filesystem(location)
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
            yield {name: batch.column(name).to_pylist() for name in batch.schema.names}
