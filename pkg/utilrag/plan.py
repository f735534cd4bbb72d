"""The plan: what a validated config runs, derived in one place and never written back into it.

Validation (config.py) only checks what was written. The entries a config implies are derived here:
each train setting's retriever searches every ``index.trained_targets`` entry (an index target
labelled after the setting, model ``train:<setting>``), ``evaluate.trained`` scores those runs, and
each setting's labels need some annotation stages (UtilSel needs RelSel and the pseudo-answer). The
stages read the derived lists from here; ``utilrag pipeline --dry-run [--json]`` prints them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from utilrag.config import (
    ANNOTATION_NEEDS,
    ANNOTATION_STAGES,
    TRAINED_MODEL,
    IndexTarget,
    JudgeTarget,
    PipelineConfig,
    RunToEvaluate,
)


def annotation_stages(labels: str) -> list[str]:
    """The annotation stages a label source needs, in chain order ([] for human and external labels)."""
    if labels in ("human", "external"):
        return []
    needed, stage = {labels}, labels
    while stage in ANNOTATION_NEEDS:
        stage = ANNOTATION_NEEDS[stage]
        needed.add(stage)
    return [s for s in ANNOTATION_STAGES if s in needed]


def annotate_stages(cfg: PipelineConfig) -> list[str]:
    """The annotation stages this config runs: annotate.stages as written; "needed": those its train settings'
    labels need (a label setting pays for no stage it does not read), the four without a train section."""
    if cfg.annotate is None:
        return []
    if cfg.annotate.stages != "needed":
        return [s for s in ANNOTATION_STAGES if s in cfg.annotate.stages]
    if "train" not in cfg.model_fields_set:
        return ["relsel", "answer", "utilsel", "utilrank"]
    needed = {s for run in cfg.train.runs() if not run.labels_path for s in annotation_stages(run.labels)}
    return [s for s in ANNOTATION_STAGES if s in needed]


def annotator(cfg: PipelineConfig) -> str | None:
    """The model whose labels this config's retrievers learn from (an annotate section with targets)."""
    return cfg.annotate.model if cfg.annotate is not None and cfg.annotate.targets else None


def judged_runs(cfg: PipelineConfig, target: JudgeTarget) -> list[RunToEvaluate]:
    """The evaluated runs of a judge target's dataset split (a run of split null scores every query: 'all')."""
    return [r for r in evaluate_runs(cfg) if r.dataset == target.dataset and (r.split or "all") == target.split]


def _trained(cfg: PipelineConfig) -> list[tuple[str, IndexTarget, RunToEvaluate]]:
    """(setting, its index target, its evaluation run) for each train setting x trained target."""
    found: list[tuple[str, IndexTarget, RunToEvaluate]] = []
    if not cfg.index.trained_targets or "train" not in cfg.model_fields_set:
        return found
    for run in cfg.train.runs():
        for target in cfg.index.trained_targets:
            plain = target.label is None and target.rerank is None
            label = run.name if plain else f"{run.name}-{target.label or f'rerank-{target.rerank}'}"
            added = target.model_copy(update={"label": label, "model": f"{TRAINED_MODEL}{run.name}"})
            scored = RunToEvaluate(dataset=target.dataset, split=target.split, run=label, setting=run.name)
            found.append((run.name, added, scored))
    return found


def index_targets(cfg: PipelineConfig) -> list[IndexTarget]:
    """index.targets as written, then each trained retriever's searches (a duplicate of a written one once)."""
    targets = list(cfg.index.targets)
    for _, target, _ in _trained(cfg):
        if target not in targets:
            targets.append(target)
    return targets


def evaluate_runs(cfg: PipelineConfig) -> list[RunToEvaluate]:
    """evaluate.runs as written, then (evaluate.trained) each trained retriever's runs."""
    runs = list(cfg.evaluate.runs)
    if cfg.evaluate.trained:
        for _, _, scored in _trained(cfg):
            if scored not in runs:
                runs.append(scored)
    return runs


@dataclass
class SettingPlan:
    """One retriever to fit: its labels, the annotation stages they need, and its searches."""

    name: str
    labels: str
    annotation_stages: list[str]
    missing_annotation: list[str]  # needed, but not in annotate.stages (the run would stop at train)
    index_runs: list[str]  # "<dataset>-<split>/<label>" under index/
    curriculum_human_percent: float | None = None


@dataclass
class Encoding:
    """One corpus encoded by one encoder: every search of those passages with that encoder shares it."""

    corpus: str
    model: str | None  # null: index.model
    searches: list[str]  # "<dataset>-<split>/<label>"


def encodings(targets: list[IndexTarget]) -> list[Encoding]:
    """The index stage's corpus encodings, in its order: one per (corpus, encoder)."""
    found: dict[tuple[str, str | None], Encoding] = {}
    for t in targets:
        key = (t.corpus_name(), t.model)
        found.setdefault(key, Encoding(key[0], key[1], [])).searches.append(
            f"{t.dataset}-{t.split or 'all'}/{t.run_label()}"
        )
    return list(found.values())


@dataclass
class Plan:
    stages: list[str]
    annotation: list[str] = field(default_factory=list)  # the annotation stages run (annotate_stages)
    querygen: dict | None = None  # the questions written: dataset, passages, model, splits
    pools: list[dict] = field(default_factory=list)  # per pools section: its candidates' runs and size
    judging: list[dict] = field(default_factory=list)  # per judge target: its runs, depth, model, circular
    settings: list[SettingPlan] = field(default_factory=list)
    index_targets: list[dict] = field(default_factory=list)
    encodings: list[Encoding] = field(default_factory=list)
    evaluate_runs: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """The plan as short text lines (the dry run prints them above the folder table)."""
        out = [f"stages: {' -> '.join(self.stages)}"]
        if self.querygen:
            q = self.querygen
            out.append(
                f"querygen: {q['per_passage']} question(s) for each of {q['passages']:,} sampled passages of "
                f"{q['dataset']} by {q['model']}; {q['heldout_percent']:g}% of its documents held out (gen-test), "
                "the rest gen-train"
            )
        for p in self.pools:
            out.append(f"pools {p['dataset']}/{p['split']}: {p['size']} passages from {' + '.join(p['candidates'])}")
        if self.annotation:
            out.append(f"annotation: {' -> '.join(self.annotation)}")
        for s in self.settings:
            needs = ", ".join(s.annotation_stages) or (
                "none (human labels)" if s.labels == "human" else "none (labels from a file: labels_path)"
            )
            missing = (
                f"; MISSING from annotate.stages: {', '.join(s.missing_annotation)}" if s.missing_annotation else ""
            )
            cl = f", curriculum {s.curriculum_human_percent:g}% human" if s.curriculum_human_percent else ""
            runs = _some(s.index_runs) or "none"
            out.append(f"train {s.name}: labels {s.labels}{cl}; annotation {needs}{missing}; searches {runs}")
        if self.index_targets:
            shared = [e for e in self.encodings if len(e.searches) > 1]
            note = (
                f" ({len(shared)} shared by several query sets, e.g. {shared[0].corpus}: "
                f"{', '.join(s.split('/')[0] for s in shared[0].searches)})"
                if shared
                else ""
            )
            out.append(f"index: {len(self.encodings)} corpus encoding(s){note}, {len(self.index_targets)} search(es)")
        for j in self.judging:
            circular = " (the annotator: circular)" if j["circular"] else ""
            out.append(
                f"judge {j['dataset']}/{j['split']}: top {j['depth']} of {', '.join(j['runs']) or 'no run'} by "
                f"{j['model']}{circular}"
            )
        if self.evaluate_runs:
            scored = [f"{r['dataset']}/{r['label'] or r['run']}" for r in self.evaluate_runs]
            out.append(f"evaluate: {_some(scored)}")
        return out


def _some(items: list[str], shown: int = 6) -> str:
    """A long list cut for a line of text (--json has it whole)."""
    if len(items) <= shown:
        return ", ".join(items)
    return f"{len(items)}: {', '.join(items[:shown])}, … (--json lists all)"


def make_plan(cfg: PipelineConfig, stages: list[str]) -> Plan:
    annotated = set(annotate_stages(cfg))
    settings = []
    if "train" in cfg.model_fields_set:
        trained = _trained(cfg)
        for run in cfg.train.runs():
            needs = annotation_stages(run.labels) if not run.labels_path else []
            settings.append(
                SettingPlan(
                    name=run.name,
                    labels=run.labels,
                    annotation_stages=needs,
                    missing_annotation=[s for s in needs if s not in annotated],
                    index_runs=[
                        f"{t.dataset}-{t.split or 'all'}/{t.run_label()}" for n, t, _ in trained if n == run.name
                    ],
                    curriculum_human_percent=run.curriculum_human_percent,
                )
            )
    searched = index_targets(cfg) if "index" in stages else []
    qcfg, jcfg = cfg.querygen, cfg.judge
    querygen = None
    if qcfg is not None and "querygen" in stages:
        querygen = {**qcfg.model_dump(), "model": qcfg.model or (cfg.annotate.model if cfg.annotate else None)}
    judging = []
    if jcfg is not None and "judge" in stages:
        model = jcfg.model or (cfg.annotate.model if cfg.annotate else None)
        for t in jcfg.targets:
            runs = [r.label or r.run for r in judged_runs(cfg, t)]
            circular = model == annotator(cfg)
            judging.append({**t.model_dump(), "runs": runs, "depth": jcfg.depth, "model": model, "circular": circular})
    pools = [
        {
            "dataset": p.dataset,
            "split": p.split,
            "size": p.size,
            "candidates": [p.run or "bm25s", *([f"dense:{p.dense} (stage candidates)"] if p.dense else [])],
        }
        for p in cfg.pools
        if "pools" in stages
    ]
    return Plan(
        stages=list(stages),
        pools=pools,
        annotation=annotate_stages(cfg) if "annotate" in stages else [],
        querygen=querygen,
        judging=judging,
        settings=settings,
        index_targets=[t.model_dump() for t in searched],
        encodings=encodings(searched),
        evaluate_runs=[r.model_dump() for r in evaluate_runs(cfg)] if "evaluate" in stages else [],
    )
