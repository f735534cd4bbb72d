import subprocess
import sys

import pytest
import yaml

from utilrag.config import AnnotateConfig, ConfigError, PipelineConfig, load_config
from utilrag.config_reference import config_json_schema, config_reference
from utilrag.paths import REPO_ROOT
from utilrag.plan import evaluate_runs, index_targets, make_plan

LOCAL = REPO_ROOT / "jobs" / "configs" / "local.yaml"
PAPER = REPO_ROOT / "jobs" / "configs" / "msmarco-qwen32b.yaml"


def test_shipped_configs_validate():
    local = load_config(LOCAL)
    assert [d.name for d in local.ingest.datasets] == ["scifact", "trec-dl-2019", "squad-v1.1-dev"]
    assert [r.name for r in local.train.runs()] == ["human", "relsel", "utilsel", "utilrank", "utilsel-cl20"]
    paper = load_config(PAPER)
    assert paper.annotate.model == "Qwen/Qwen2.5-32B-Instruct-GPTQ-Int8"
    assert paper.pools[0].size == 31 and paper.annotate.window == 16
    assert paper.annotate.engine.tensor_parallel_size == 1 and paper.annotate.scale.replicas == (1, 16)
    assert paper.train.loss == "summarg" and paper.train.lr == 3e-5


def test_overrides_set_nested_keys_and_list_items():
    cfg = load_config(
        LOCAL,
        [
            "output_dir=/tmp/x",
            "ingest.reject_threshold=0.5",
            "pools.0.size=8",
            "ray.num_cpus=1",
            "evaluate.metrics=[nDCG@10]",
        ],
    )
    assert cfg.output_dir == "/tmp/x"
    assert cfg.ingest.reject_threshold == 0.5
    assert cfg.pools[0].size == 8
    assert cfg.ray.num_cpus == 1
    assert cfg.evaluate.metrics == ["nDCG@10"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("ingest.colour=red", "ingest.colour: unknown key"),
        ("pools.0.size=many", "pools.0.size: Input should be a valid integer"),
        ("pools.0.size=1", "pools.0.size: Input should be greater than or equal to 2"),
        ("pools.9.size=3", "'pools.9' is not an index of a 1-item list"),
        ("ingest.reject_threshold", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(LOCAL, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest:\n  datasets: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text("output_dir: x\n")
    with pytest.raises(ConfigError, match="ingest: required key is missing"):
        load_config(missing, schema=PipelineConfig)


def test_cli_prints_one_error_line_and_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "utilrag.cli", "ingest", "--config", str(LOCAL), "ingest.bogus=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"utilrag: error: {LOCAL}: ingest.bogus: unknown key"]


def test_cli_one_line_for_a_bad_ray_cpu_count_and_ctrl_c(tmp_path, capsys, monkeypatch):
    """ray.num_cpus=-3 is a config error (one line, exit 2), not a Ray traceback; Ctrl-C is one
    line and exit 130."""
    import utilrag.cli as cli

    config = tmp_path / "c.yaml"
    config.write_text("ingest: {datasets: [{name: scifact}]}\n")
    assert cli.main(["ingest", "--config", str(config), "ray.num_cpus=-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ray.num_cpus" in err[0] and "greater than or equal to 1" in err[0]

    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert cli.main(["ingest", "--config", str(config)]) == 130
    assert capsys.readouterr().err.strip() == "utilrag: interrupted"


@pytest.mark.parametrize("command", [["ingest"], ["pipeline"], ["run"]])
def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path, capsys, command):
    import utilrag.cli as cli

    config = tmp_path / "c.yaml"
    config.write_text("ingest: {datasets: [{name: scifact}]}\n")
    assert cli.main([*command, "--config", str(config), "output_dir=/proc/x"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "utilrag: error: output_dir /proc/x: cannot create it: No such file or directory"
    ]
    assert not (tmp_path / "x").exists()


def test_annotate_sections_take_overrides_and_refuse_the_old_flat_keys():
    cfg = load_config(LOCAL, ["annotate.scale.batch_size=4", "annotate.engine.enforce_eager=false"])
    assert cfg.annotate.scale.batch_size == 4 and cfg.annotate.engine.enforce_eager is False
    assert cfg.annotate.sampling.max_tokens == 48 and cfg.annotate.engine.cpu_threads_bind == "0-1"
    with pytest.raises(ConfigError, match="annotate.batch_size: unknown key"):
        load_config(LOCAL, ["annotate.batch_size=4"])


def test_content_settings_keep_the_flat_fingerprint_keys():
    """The stage fingerprint's settings stay the flat keys they were before the sub-sections, so
    finished stages are not redone; scale and placement settings are not among them."""
    acfg = AnnotateConfig.model_validate(
        {"model": "m", "sampling": {"max_tokens": 8}, "engine": {"dtype": "float32"}, "scale": {"batch_size": 2}}
    )
    assert acfg.content_settings() == {
        "model": "m",
        "window": 16,
        "passage_words": 300,
        "human_positive": "random",
        "temperature": 0.6,  # the authors' code's sampling (the paper is silent)
        "top_p": 0.95,
        "seed": 0,
        "max_tokens": 8,
        "answer_max_tokens": 256,
        "constrained": False,
        "dtype": "float32",
        "quantization": None,
        "max_model_len": 8192,
    }


def test_every_key_has_a_description():
    schema = config_json_schema()
    models = {"PipelineConfig": schema, **schema["$defs"]}
    missing = [
        f"{name}.{key}"
        for name, model in models.items()
        for key, prop in model["properties"].items()
        if not prop.get("description")
    ]
    assert not missing
    rows = config_reference().splitlines()[2:]
    assert all(row.rstrip(" |").rsplit(" | ", 1)[1].strip() for row in rows)
    keys = [row.split(" | ")[0].strip("| `") for row in rows]
    assert {"pools[].size", "annotate.engine.enforce_eager", "annotate.scale.batch_size"} <= set(keys)


def test_the_configuration_reference_is_generated():
    text = (REPO_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    section = text.split(start, 1)[1].split(end, 1)[0]
    assert section.strip() == config_reference().strip(), "stale: run python scripts/gen_config_reference.py"


def test_a_data_root_uri_stays_a_uri(monkeypatch, tmp_path):
    from utilrag.paths import resolve_data_root

    assert resolve_data_root("s3://bucket/datasets/") == "s3://bucket/datasets"
    assert resolve_data_root("gs://bucket/d") == "gs://bucket/d"
    assert resolve_data_root(f"file://{tmp_path}") == str(tmp_path)
    monkeypatch.setenv("UTILRAG_DATA_ROOT", "s3://other/root")
    assert resolve_data_root(None) == "s3://other/root"


def test_the_paper_config_indexes_and_evaluates_the_model_it_trains(capsys):
    """Table 2 from the paper config's plan (`utilrag pipeline --dry-run --json`, no data, no Ray): every
    label setting's retriever is indexed from train/<name>/model, encoded by the spec saved beside it (no
    pooling or length overrides in the index section), searches MS MARCO dev, DL19 and DL20 by full
    retrieval over the one msmarco-passage encoding, and the 14 BEIR sets (CQADupStack's 12 forums), and
    is evaluated on each against the human-label one."""
    import json

    from utilrag.cli import main
    from utilrag.config import BEIR_14, DATASET_GROUPS

    cfg = load_config(PAPER)
    names = [r.name for r in cfg.train.runs()]
    assert names == ["human", "relsel", "utilsel", "utilrank", "utilsel-cl20"]
    assert cfg.train.runs()[-1].curriculum_human_percent == 20 and cfg.train.runs()[0].labels == "human"
    overrides = cfg.index.model_dump(include={"pooling", "normalize", "query_max_len", "passage_max_len"})
    assert set(overrides.values()) == {None}

    assert main(["pipeline", "--config", str(PAPER), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    beir = [m for b in BEIR_14 for m in DATASET_GROUPS.get(b, (b,))]
    assert len(beir) == 25  # 13 sets + CQADupStack's 12 forums
    for name in names:
        searched = {
            (t["dataset"], t["split"], t["corpus"] or t["dataset"], t["rerank"])
            for t in plan["index_targets"]
            if t["model"] == f"train:{name}"
        }
        assert searched == {
            ("msmarco-passage", "dev.small", "msmarco-passage", None),
            ("trec-dl-2019", "default", "msmarco-passage", None),  # full retrieval, not BM25 re-ranking
            ("trec-dl-2020", "default", "msmarco-passage", None),
            *((b, "test", b, None) for b in beir),
        }, name
        # one encoding of the 8.8M passages per retriever, shared by dev, DL19 and DL20
        [shared] = [e for e in plan["encodings"] if e["model"] == f"train:{name}" and len(e["searches"]) > 1]
        assert shared["corpus"] == "msmarco-passage" and len(shared["searches"]) == 3
    assert len(plan["encodings"]) == len(names) * (1 + len(beir))
    scored = {(r["dataset"], r["run"]) for r in plan["evaluate_runs"] if r["setting"]}
    assert scored == {(t["dataset"], t["label"]) for t in plan["index_targets"]}
    assert {r["dataset"] for r in plan["evaluate_runs"] if r["run"] == "bm25s"} == {
        "msmarco-passage", "trec-dl-2019", "trec-dl-2020"
    }  # fmt: skip
    ingested = {d.name: d for d in cfg.ingest.datasets}
    assert set(beir) <= set(ingested) and ingested["trec-dl-2020"].queries_only
    assert cfg.evaluate.baseline == "bm25s" and cfg.evaluate.settings_baseline == "human"


def test_train_settings_are_runs_with_their_keys_changed():
    cfg = load_config(
        LOCAL,
        [
            "train.settings=[{name: human}, {name: util, labels: utilsel, curriculum_human_percent: 20},"
            " {name: one, loss: single, positives: one}]",
            "index.trained_targets=[{dataset: scifact, split: test}, {dataset: trec-dl-2019, rerank: bm25}]",
            "index.targets=[{dataset: scifact, split: test, label: minilm}]",  # none naming a trained model
        ],
    )
    human, util, one = cfg.train.runs()
    assert (human.labels, human.curriculum_human_percent, human.lr) == ("human", None, 2e-5)
    assert (util.name, util.labels, util.curriculum_human_percent, util.lr) == ("util", "utilsel", 20.0, 2e-5)
    assert (one.loss, one.positives, one.settings) == ("single", "one", [])
    # each retriever searches each trained target, and evaluate scores each run, tagged with its setting
    added = [(t.label, t.model, t.rerank) for t in index_targets(cfg) if t.model]
    assert added == [
        ("human", "train:human", None), ("human-rerank-bm25", "train:human", "bm25"),
        ("util", "train:util", None), ("util-rerank-bm25", "train:util", "bm25"),
        ("one", "train:one", None), ("one-rerank-bm25", "train:one", "bm25"),
    ]  # fmt: skip
    scored = [(r.run, r.setting) for r in evaluate_runs(cfg) if r.setting]
    assert scored == [(label, model.split(":")[1]) for label, model, _ in added]
    # derived by the plan, never written into the config: the tree holds what the file says
    assert not [t for t in cfg.index.targets if t.model] and not [r for r in cfg.evaluate.runs if r.setting]
    again = PipelineConfig.model_validate(cfg.model_dump())
    assert index_targets(again) == index_targets(cfg) and evaluate_runs(again) == evaluate_runs(cfg)
    # the plan: each setting's labels, the annotation stages they need, its searches
    plan = make_plan(cfg, ["annotate", "train", "index", "evaluate"])
    util_plan = next(s for s in plan.settings if s.name == "util")
    assert util_plan.annotation_stages == ["relsel", "answer", "utilsel"]
    assert util_plan.index_runs == ["scifact-test/util", "trec-dl-2019-all/util-rerank-bm25"]
    assert next(s for s in plan.settings if s.name == "human").annotation_stages == []
    assert len(plan.index_targets) == len(index_targets(cfg)) and plan.as_json()["settings"][1]["name"] == "util"


def test_a_setting_whose_labels_the_annotation_does_not_make_is_named_in_the_plan():
    from utilrag.plan import make_plan

    cfg = load_config(LOCAL, ["annotate.stages=[relsel]", "train.settings=[{name: u, labels: utilrank}]"])
    [setting] = make_plan(cfg, ["train"]).settings
    assert setting.missing_annotation == ["answer", "utilrank"]
    assert "MISSING from annotate.stages: answer, utilrank" in "\n".join(make_plan(cfg, ["train"]).lines())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.settings=[{name: a}, {name: a}]"], "two entries are named 'a'"),
        (["train.settings=[{name: a, loss: single}]"], "setting 'a': loss 'single' trains on one positive"),
        (["train.settings=[{name: a, colour: red}]"], "train.settings.0.colour: unknown key"),
    ],
)
def test_bad_train_settings_name_the_setting(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(LOCAL, overrides)


def test_trained_targets_need_a_train_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ingest: {datasets: [{name: scifact}]}\nindex: {trained_targets: [{dataset: scifact}]}\n")
    with pytest.raises(ConfigError, match="no train section to take the retrievers from"):
        load_config(path)


def test_each_run_is_tested_against_its_reference():
    from utilrag.evaluate import reference

    cfg = load_config(
        LOCAL,
        ["train.settings=[{name: human}, {name: util, labels: utilsel}]",
         "index.trained_targets=[{dataset: scifact, split: test}, {dataset: trec-dl-2019, rerank: bm25}]"],
    )  # fmt: skip
    refs = {r.run: reference(cfg, r) for r in evaluate_runs(cfg)}
    assert refs["util"] == "human" and refs["util-rerank-bm25"] == "human-rerank-bm25"
    assert refs["human"] == "human"  # itself: not tested
    assert refs["minilm"] == refs["tasb"] == "bm25"


def test_a_config_extends_another_and_names_only_what_it_changes(tmp_path):
    """`extends: <file>`: the base is read first; sections merge key by key, lists and values replace;
    a missing base or a cycle is one ConfigError line."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"ingest": {"reject_threshold": 0.5, "datasets": [{"name": "scifact"}]},
                                    "train": {"lr": 1e-5, "settings": [{"name": "a"}, {"name": "b"}]}}))  # fmt: skip
    variant = tmp_path / "sub" / "variant.yaml"
    variant.parent.mkdir()
    variant.write_text(yaml.safe_dump({"extends": "../base.yaml", "train": {"settings": [{"name": "c"}]}}))
    cfg = load_config(variant, ["train.epochs=3"])
    assert cfg.ingest.reject_threshold == 0.5 and [d.name for d in cfg.ingest.datasets] == ["scifact"]
    assert cfg.train.lr == 1e-5 and cfg.train.epochs == 3 and [s.name for s in cfg.train.settings] == ["c"]
    variant.write_text("extends: ../missing.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*missing.yaml \(extended by .*variant.yaml\)"):
        load_config(variant)
    base.write_text("extends: sub/variant.yaml\n")
    variant.write_text("extends: ../base.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(variant)


def test_every_paper_config_validates_and_plans(capsys):
    """jobs/configs/paper/: one config per paper table, each extending the paper config; each validates and
    its plan names the settings the table compares (no data, no Ray)."""
    import json

    from utilrag.cli import main

    expected = {
        "table2": {"human", "relsel", "utilsel", "utilrank", "utilsel-cl20", "utilsel-cl100"},
        "losses": {"utilsel-rand1", "utilsel-joint", "utilsel"},
        "positives": {"utilsel", "utilsel-pos-one", "utilsel-pos-avg"},
        "curriculum": {"human", "utilsel-cl20", "utilsel-cl100", "utilsel-union20"},
        "contriever": {"contriever-human", "contriever-utilsel", "contriever-utilsel-cl20"},
        "llama-annotator": {"human", "llama-utilsel", "llama-utilrank", "llama-utilsel-cl20"},
        "qametric": {"human", "qametric", "qametric-cl20"},
        "human-positive": {"utilsel-inclusion"},
        "rag-nq": {"human", "relsel", "utilsel", "utilrank", "utilsel-cl20"},
        "rag-hotpotqa": {"human", "relsel", "utilsel", "utilrank", "utilsel-cl20"},
        "rag-msmarco-qa": {"human", "relsel", "utilsel", "utilrank", "utilsel-cl20"},
    }
    folder = REPO_ROOT / "jobs" / "configs" / "paper"
    assert {p.stem for p in folder.glob("*.yaml")} == set(expected)
    for name, settings in expected.items():
        assert main(["pipeline", "--config", str(folder / f"{name}.yaml"), "--dry-run", "--json"]) == 0, name
        plan = json.loads(capsys.readouterr().out)["plan"]
        assert {s["name"] for s in plan["settings"]} == settings, name
    contriever = load_config(folder / "contriever.yaml")
    assert (contriever.train.model, contriever.train.pooling) == ("facebook/contriever", "mean")
    nq = load_config(folder / "rag-nq.yaml").rag
    assert nq is not None and (nq.dataset, nq.corpus, nq.k) == ("dpr-nq-test", "dpr-wiki-passages", [5])
    union = next(s for s in load_config(folder / "curriculum.yaml").train.runs() if s.name == "utilsel-union20")
    assert union.human_mix_percent == 20 and union.curriculum_human_percent is None
