"""``utilrag <stage> --config FILE [key=value ...]`` and ``utilrag eval-run``.

User mistakes (config, missing data, bad files) print one ``utilrag: error: ...`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from utilrag.config import PipelineConfig, load_config

STAGES = {
    "ingest": "ingest the configured datasets into Parquet",
    "pools": "build candidate pools for annotation",
    "bm25": "BM25 retrieval runs with bm25s",
    "index": "encode a corpus, build sharded FAISS indices, write dense runs",
    "annotate": "LLM utility annotation (RelSel, pseudo-answer, UtilSel, UtilRank, graded) with vLLM",
    "annotate-report": "print the agreement report of finished annotations",
    "train": "fit the bi-encoder with Ray Train + DeepSpeed",
    "evaluate": "evaluate the configured runs",
    "run": "the main job: ingest, pools, BM25, evaluation",
}


def _stage(name: str, cfg: PipelineConfig) -> None:
    from utilrag.raycluster import connect

    if name == "run":
        from utilrag.pipeline import run_pipeline

        run_pipeline(cfg)
    elif name == "ingest":
        from utilrag.data import ingest

        connect(cfg.ray)
        ingest(cfg)
    elif name == "pools":
        from utilrag.data import run_pools

        for pcfg in cfg.pools:
            run_pools(cfg, pcfg)
    elif name == "bm25":
        from utilrag.index import run_bm25

        for bcfg in cfg.bm25:
            run_bm25(cfg, bcfg)
    elif name == "index":
        from utilrag.index import run_index

        run_index(cfg)
    elif name == "annotate":
        from utilrag.annotate import run_annotate

        run_annotate(cfg)
    elif name == "annotate-report":
        from utilrag.annotate import print_reports

        print_reports(cfg)
    elif name == "train":
        from utilrag.train import run_train

        run_train(cfg)
    elif name == "evaluate":
        from utilrag.evaluate import run_evaluation

        run_evaluation(cfg)


def _eval_run(args) -> None:
    from utilrag.evaluate import evaluate, read_trec_file

    qrels = read_trec_file(args.qrels, "qrels")
    run = read_trec_file(args.run, "runs")
    metrics = [m for item in args.metrics for m in item.split(",") if m]
    means, per_query = evaluate(qrels, run, metrics, args.rel_threshold)
    if args.json:
        print(json.dumps({m: round(v, 4) for m, v in means.items()}))
        return
    if args.per_query:
        for qid in sorted(per_query):
            for m in metrics:
                print(f"{m}\t{qid}\t{per_query[qid][m]:.4f}")
    for m in metrics:
        print(f"{m}\tall\t{means[m]:.4f}")
    print(f"queries\tall\t{len(per_query)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="utilrag", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in STAGES.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=True, help="YAML config (e.g. jobs/configs/local.yaml)")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p = sub.add_parser("eval-run", help="trec_eval-like evaluation of one run file")
    p.add_argument("--qrels", required=True, help="TREC qrels (qid 0 docid grade) or BEIR qrels tsv")
    p.add_argument("--run", required=True, help="TREC run (qid Q0 docid rank score tag)")
    p.add_argument("--metrics", nargs="+", default=["nDCG@10,MRR@10,R@100,R@1000,MAP"])
    p.add_argument(
        "--rel-threshold", type=int, default=1, help="grade counted relevant by MRR/Recall/MAP (TREC DL passage: 2)"
    )
    p.add_argument("--per-query", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object of metric -> value")
    return parser


def main(argv: list[str] | None = None) -> int:
    from utilrag.errors import UtilragError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "eval-run":
            _eval_run(args)
        else:
            _stage(args.command, load_config(args.config, args.overrides))
    except UtilragError as e:  # every stage's user-facing errors: one line, exit 2
        print(f"utilrag: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the stages clean up in their finally blocks; no traceback
        print("utilrag: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
