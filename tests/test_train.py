"""Training groups, curriculum phases, and a real Ray Train + DeepSpeed run that loses a worker
(SIGKILL) mid-run, resumes from its last checkpoint and ends with the uninterrupted run's weights."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_lines
from utilrag.config import ConfigError
from utilrag.train.dataset import make_groups, phase_positives


def test_groups_pos_all_and_pos_one():
    positives = {"q1": {"a", "b"}, "q2": {"c"}, "q3": set()}
    pools = {"q1": ["a", "b", "n1", "n2", "n3"], "q2": ["c", "n1", "n4"], "q3": ["n1", "n2"]}
    rows = make_groups(positives, pools, group_size=4, mode="all", epochs=2, seed=0, query_ids=["q1", "q2", "q3"])
    assert len(rows) == 4  # q3 has no positive: skipped in both epochs
    q1 = [r for r in rows if r["query_id"] == "q1"][0]
    assert sorted(q1["doc_ids"][:2]) == ["a", "b"] and q1["positives"] == [True, True, False, False]
    q2 = [r for r in rows if r["query_id"] == "q2"][0]
    assert q2["doc_ids"][0] == "c" and len(q2["doc_ids"]) == 4  # 2 negatives, sampled with replacement
    one = make_groups(positives, pools, group_size=3, mode="one", epochs=1, seed=0, query_ids=["q1"])
    assert sum(one[0]["positives"]) == 1 and set(one[0]["doc_ids"][1:]) <= {"n1", "n2", "n3"}
    again = make_groups(positives, pools, group_size=4, mode="all", epochs=2, seed=0, query_ids=["q1", "q2", "q3"])
    assert again == rows
    first, second = (sorted(r["doc_ids"]) for r in rows if r["query_id"] == "q1")
    assert first[:2] == second[:2] == ["a", "b"]  # Pos-all keeps both positives in every epoch


def test_positive_sampling_modes_and_exclusion():
    positives = {"q1": {"a", "b", "c"}}
    pools = {"q1": ["a", "b", "c", "h", "n1", "n2", "n3", "n4"]}
    kw = dict(group_size=3, epochs=40, seed=0, query_ids=["q1"])

    def firsts(mode):
        return [r["doc_ids"][0] for r in make_groups(positives, pools, mode=mode, **kw)]

    assert len(set(firsts("one"))) == 1  # Pos-one: the same positive (drawn once) every epoch
    assert set(firsts("rand1")) == {"a", "b", "c"}  # Rand1: drawn anew each epoch
    avg = make_groups(positives, pools, mode="avg", **kw)
    assert all(sum(r["positives"]) == 2 for r in avg)  # every positive that fits (group_size - 1)
    # Exclusion: the human positive h is neither a positive nor a negative
    rows = make_groups(positives, pools, mode="one", not_negative={"q1": {"h"}}, **kw)
    assert not [r for r in rows if "h" in r["doc_ids"]]
    assert [r for r in make_groups(positives, pools, mode="one", **kw) if "h" in r["doc_ids"]]


def test_single_positive_losses_refuse_several_positives():
    from utilrag.config import TrainConfig

    with pytest.raises(ValueError, match=r"loss 'single' trains on one positive .* set train.positives: one"):
        TrainConfig(loss="single", positives="all")
    with pytest.raises(ValueError, match=r"set train.positives: rand1"):
        TrainConfig(loss="rand1", positives="avg")
    with pytest.raises(ValueError, match=r"set train.loss: joint"):
        TrainConfig(loss="summarg", positives="avg")
    TrainConfig(loss="single", positives="one")
    TrainConfig(loss="joint", positives="avg")


def test_pos_avg_weighs_every_query_alike():
    import torch

    from utilrag.train.loss import joint_avg_loss, joint_loss, loss_for

    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    mask = torch.tensor([[True, True, False, False]])
    log_p = scores - torch.logsumexp(scores, dim=1, keepdim=True)
    assert torch.isclose(joint_loss(scores, mask), -(log_p[0, 0] + log_p[0, 1]))
    assert torch.isclose(joint_avg_loss(scores, mask), -(log_p[0, 0] + log_p[0, 1]) / 2)
    assert loss_for("joint", "avg") is joint_avg_loss and loss_for("joint", "all") is joint_loss


def _config(make_config, root, **train):
    return make_config(
        {
            "ingest": {"datasets": [{"name": "tiny", "path": str(root), "layout": "msmarco"}]},
            "pools": [{"dataset": "tiny", "split": "train", "size": 8}],
            "train": {
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "dataset": "tiny",
                "split": "train",
                "pooling": "mean",
                "normalize": True,
                "temperature": 0.05,
                "query_max_len": 8,
                "passage_max_len": 16,
                "group_size": 4,
                "per_device_queries": 2,
                "num_workers": 2,
                "deepspeed_zero_stage": 2,
                "epochs": 1,
                "max_steps": 5,
                "checkpoint_every": 2,
                "lr": 1e-4,
                "max_failures": 1,
                **train,
            },
        }
    )


def test_curriculum_phases_from_a_labels_table(ray_local, make_config, tiny_dataset, tmp_path):
    from utilrag.data import ingest

    human = {}
    for line in (tiny_dataset / "qrels.train.tsv").read_text().splitlines():
        q, _, d, _ = line.split()
        human.setdefault(q, set()).add(d)
    labels = pa.table(
        {
            "query_id": ["q0", "q1", "q1"],
            "doc_id": ["5", "6", "7"],
            "source": ["utilsel"] * 3,
            "positive": [True, True, False],
        }
    )
    pq.write_table(labels, tmp_path / "labels.parquet")
    cfg = _config(
        make_config,
        tiny_dataset,
        labels="utilsel",
        labels_path=str(tmp_path / "labels.parquet"),
        curriculum_human_percent=25,
        human_mix_percent=None,
    )
    ingest(cfg)
    phases = phase_positives(cfg, cfg.train)
    assert [(p.name, p.epochs, p.mode) for p in phases] == [
        ("utilsel", 1, "all"),
        ("curriculum-human", 1, "one"),
    ]
    assert phases[0].positives == {"q0": {"5"}, "q1": {"6"}}
    # Exclusion: the labels leave q0's and q1's human positives out: they are never negatives
    labelled = {"q0": {"5"}, "q1": {"6", "7"}}
    expected = {q: human[q] - labelled[q] for q in labelled if human[q] - labelled[q]}
    assert expected and phases[0].not_negative == expected
    assert len(phases[1].positives) == 6  # 25% of the 24 queries, seeded
    # of the training queries: a run on 8 of them draws 25% of those 8, all inside them
    subset = sorted(human)[:8]
    curriculum = phase_positives(cfg, cfg.train, subset)[1].positives
    assert len(curriculum) == 2 and set(curriculum) <= set(subset)


def test_training_data_is_built_by_a_task_and_read_by_each_worker(ray_local, make_config, tiny_dataset, tmp_path):
    """The groups, texts joined, are written by a Ray task (not the driver) as one file per phase and
    worker, in step order; the build is deterministic; too few groups for one step is the user's one line."""
    import pyarrow.parquet as pq

    from utilrag.data import ingest, run_pools
    from utilrag.train.dataset import TrainInputError, build_on_a_worker, read_groups

    cfg = _config(make_config, tiny_dataset, name="files")
    ingest(cfg)
    run_pools(cfg, cfg.pools[0])
    phases = build_on_a_worker(cfg, cfg.train, str(tmp_path / "a"))
    # 24 queries with a positive, 2 workers x 2 queries a step: 6 steps, cut to max_steps 5
    assert phases == [{"name": "human", "steps": 5, "offset": 0, "groups": 24, "positive_sampling": "all"}]
    files = [pq.read_table(tmp_path / "a" / f"human_{rank}.parquet") for rank in (0, 1)]
    assert [f.num_rows for f in files] == [10, 10]
    texts = {line.split("\t")[1] for line in (tiny_dataset / "collection.tsv").read_text().splitlines()}
    row = files[0].to_pylist()[0]
    assert len(row["passages"]) == len(row["positives"]) == 4 and row["positives"][0]
    assert set(row["passages"]) <= texts and row["query"].startswith("what about ")
    # what a worker reads: its file in order, in whole batches of per_device_queries
    read = list(read_groups(str(tmp_path / "a" / "human_1.parquet"), 2))
    assert [len(b["query"]) for b in read] == [2] * 5
    assert sum((b["query"] for b in read), []) == files[1]["query"].to_pylist()
    build_on_a_worker(cfg, cfg.train, str(tmp_path / "b"))
    for rank in (0, 1):  # the same files again: a resumed run reads the same stream
        assert pq.read_table(tmp_path / "b" / f"human_{rank}.parquet").equals(files[rank])
    short = _config(make_config, tiny_dataset, name="short", per_device_queries=16)
    with pytest.raises(TrainInputError, match=r"^train: 24 training groups are fewer than one step \(16 queries x 2"):
        build_on_a_worker(short, short.train, str(tmp_path / "c"))


def test_external_labels_are_trained_on_and_compared_with_the_human_positives(
    ray_local, make_config, tiny_dataset, tmp_path
):
    """train.labels: external reads a file of positives made elsewhere (JSONL here; TSV, TREC qrels and
    Parquet in test_labels_files_in_every_form): its positives make the groups, a human positive it leaves
    out is not a negative, and its agreement with the human positives is recorded with the phases."""
    import json

    import pyarrow.parquet as pq

    from utilrag.data import ingest, run_pools
    from utilrag.train.dataset import build_on_a_worker, human_positives, pools_by_query

    base = _config(make_config, tiny_dataset, name="ext")
    ingest(base)
    run_pools(base, base.pools[0])
    human = human_positives(base, base.train)
    pools = pools_by_query(base, base.train)
    # the first 12 pooled queries: a human positive plus a pool passage that is not one; q99: not pooled
    chosen = sorted(pools)[:12]
    rows = [{"qid": q, "docid": sorted(human[q])[0]} for q in chosen]
    rows += [{"qid": q, "docid": next(d for d in pools[q] if d not in human[q])} for q in chosen]
    rows.append({"qid": "q99", "docid": "0"})
    labels = tmp_path / "authors.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(make_config, tiny_dataset, name="ext", labels="external", labels_path=str(labels), max_steps=None)
    [phase] = build_on_a_worker(cfg, cfg.train, str(tmp_path / "groups"))
    assert (phase["name"], phase["groups"]) == ("external", 12)  # the 12 labelled pooled queries
    agreement = phase["label_agreement"]
    relevant = sum(len(human[q]) for q in chosen)
    assert agreement["queries"] == 12 and agreement["precision"] == 0.5
    assert agreement["recall"] == round(12 / relevant, 4) and agreement["positives_per_query"] == 2.0
    assert agreement["labelled_queries_outside_the_pools"] == 1
    groups = pq.read_table(tmp_path / "groups" / "external_0.parquet").to_pylist()
    texts = {ln.split("\t")[0]: ln.split("\t")[1] for ln in (tiny_dataset / "collection.tsv").read_text().splitlines()}
    for g in groups:  # a human positive the labels left out is never shown as a negative
        q = next(r["qid"] for r in rows if texts[r["docid"]] in g["passages"])
        left_out = {texts[d] for d in human[q]} - {texts[r["docid"]] for r in rows if r["qid"] == q}
        negatives = {p for p, pos in zip(g["passages"], g["positives"]) if not pos}
        assert not (left_out & negatives)
    with pytest.raises(ConfigError, match="labels 'external' reads labels_path"):
        _config(make_config, tiny_dataset, labels="external")


def test_labels_files_in_every_form(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from utilrag.data.labels import LabelsFileError, agreement, read_external_labels

    tsv = write_lines(
        tmp_path / "l.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t0.9", "q1\td2\t1", "q2\td3\t2", "q2\td4\t0"]
    )
    qrels = write_lines(tmp_path / "l.qrels", ["q1 0 d1 1", "q1 0 d2 1", "q2 0 d3 2", "q2 0 d4 0"])
    table = tmp_path / "l.parquet"
    pq.write_table(pa.table({"query_id": ["q1", "q1", "q2"], "doc_id": ["d1", "d2", "d3"], "rank": [1, 2, 1]}), table)
    expected = {"q1": {"d1", "d2"}, "q2": {"d3"}}
    for path in (tsv, qrels, table):
        assert read_external_labels(str(path)) == expected, path
    bad = write_lines(tmp_path / "bad.tsv", ["q1 d1", "q1 d2 d3 d4 d5"])
    with pytest.raises(LabelsFileError, match=r"bad.tsv:2: expected 'qid docid \[score\]'"):
        read_external_labels(str(bad))
    broken = write_lines(tmp_path / "bad.jsonl", ['{"qid": "q1", "docid": "d1"}', "{oops"])
    with pytest.raises(LabelsFileError, match=r"bad.jsonl:2: not JSON"):
        read_external_labels(str(broken))
    got = agreement(expected, {"q1": {"d1"}, "q2": {"d9"}}, {"q1": ["d1", "d2"], "q2": ["d3"], "q3": ["d5"]})
    assert (got["queries"], got["precision"], got["recall"], got["positives_per_query"]) == (2, 0.3333, 0.5, 1.5)


@pytest.mark.slow
def test_kill_a_worker_resume_and_match_the_uninterrupted_weights(
    ray_local, make_config, tiny_dataset, tiny_encoder, tmp_path, monkeypatch
):
    """A two-phase curriculum (LLM labels, then human labels of 50% of the queries) on one engine;
    rank 1 SIGKILLs itself at phase 2's first step (resume from the end of phase 1: fresh AdamW state
    and schedule); the resumed run ends with the uninterrupted run's weights."""
    import pandas as pd
    import torch
    from transformers import AutoModel

    from utilrag.data import ingest, run_pools
    from utilrag.train import run_train

    qrels = [line.split() for line in (tiny_dataset / "qrels.train.tsv").read_text().splitlines()]
    pq.write_table(
        pa.table(
            {
                "query_id": [q for q, _, _, _ in qrels],
                "doc_id": [d for _, _, d, _ in qrels],
                "source": ["utilsel"] * len(qrels),
                "positive": [True] * len(qrels),
            }
        ),
        tmp_path / "labels.parquet",
    )
    cfg = _config(
        make_config,
        tiny_dataset,
        name="straight",
        labels="utilsel",
        labels_path=str(tmp_path / "labels.parquet"),
        curriculum_human_percent=50,
        checkpoint_every=None,  # checkpoints at phase ends only: the kill resumes from one
        model=tiny_encoder,
    )
    ingest(cfg)
    run_pools(cfg, cfg.pools[0])
    straight = Path(run_train(cfg)[0]) / "model"
    log = pd.read_csv(straight.parent / "metrics.csv")
    assert list(log.drop_duplicates("phase")["phase"]) == ["utilsel", "curriculum-human"]
    phase2 = log[log["phase"] == "curriculum-human"]
    assert len(phase2) == 3 and phase2["lr"].iloc[0] > phase2["lr"].iloc[-1]
    assert phase2["lr"].iloc[0] > log[log["phase"] == "utilsel"]["lr"].iloc[-1]  # the schedule restarted

    a = AutoModel.from_pretrained(straight)
    base = AutoModel.from_pretrained(tiny_encoder)
    moved = max(float((pa_ - pb).abs().max()) for pa_, pb in zip(a.parameters(), base.parameters()))
    assert moved > 1e-4  # training changed the weights
    # (Resuming mid-phase restores AdamW moments and the schedule: benchmarks/gpu_check.py's checkpoint
    # check, run by test_gpu_check, compares those step by step; here the phase boundary, where the
    # restart must begin phase 2 afresh from phase 1's final state.)
    for name, kill_at in (("killed-phase2-start", "1:0"),):
        cfg.train.name = name
        monkeypatch.setenv("UTILRAG_FAULT_TRAIN_KILL_AT_STEP", kill_at)  # rank 1 SIGKILLs itself once
        killed = Path(run_train(cfg)[0]) / "model"
        log = pd.read_csv(killed.parent / "metrics.csv")
        assert log["global_step"].max() == 8 and np.isfinite(log["loss"]).all()
        assert (killed.parent / "loss.png").stat().st_size > 1000
        b = AutoModel.from_pretrained(killed)
        for (pname, pa_), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pa_, pb, rtol=1e-4, atol=1e-5, msg=f"{name}: {pname}")
