"""utilrag <stage> --config FILE [key=value ...], utilrag pipeline [--dry-run], status, upload, eval-run / eval-qa.

The stage commands come from the stage registry (``utilrag.stages``), in pipeline order. User
mistakes (config, missing data, bad files) print one ``utilrag: error: ...`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from utilrag.stages import STAGES

JOBS = {
    "pipeline": "every configured stage in order (--from STAGE, --only STAGE ...), reusing unchanged outputs",
    "run": "the main job: every configured stage in order (make run), reusing unchanged outputs",
    "annotate-report": "print the agreement report of finished annotations",
    "status": "each stage folder of the run directory: complete, running (by whom), interrupted, failed, missing",
}


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


def _eval_qa(args) -> None:
    from utilrag.rag.eval_qa import eval_qa, format_eval_qa

    print(format_eval_qa(eval_qa(args.data, args.predictions), args.json))


def _upload(args) -> None:
    from utilrag.logs import setup_logging
    from utilrag.upload import render, upload

    setup_logging("INFO")
    print(render(upload(args.source, args.to, args.kind, args.name, args.data_root, args.revision)))


def _config(args) -> None:
    from utilrag.config_reference import config_json_schema, config_reference

    print(json.dumps(config_json_schema(), indent=2) if args.schema else config_reference())


def _dry_run(cfg, args) -> None:
    """``pipeline --dry-run``: the stages this config and these flags would run, in order, each folder
    they would write and its state now; nothing runs, no cluster starts."""
    from utilrag import status
    from utilrag.pipeline import select_stages
    from utilrag.plan import make_plan

    stages = select_stages(cfg, args.only, args.start)
    plan = make_plan(cfg, stages)
    states = status.status(cfg, stages)
    if args.json:
        print(json.dumps(status.as_json(cfg, states, stages=stages, plan=plan.as_json())))
    else:
        print("\n".join(plan.lines()) + "\n")
        print(status.render(cfg, states, f"pipeline --dry-run ({' -> '.join(stages)})"))


def _with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (e.g. jobs/configs/local.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="utilrag", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        _with_config(sub.add_parser(stage.name, help=stage.help))
    for name, help_text in JOBS.items():
        p = sub.add_parser(name, help=help_text)
        _with_config(p)
        if name == "pipeline":
            p.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage (earlier ones skipped)")
            p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
            p.add_argument(
                "--dry-run",
                action="store_true",
                help="print the stages and folders it would run and their state; run nothing",
            )
        if name in ("pipeline", "status"):
            p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p = sub.add_parser("eval-run", help="trec_eval-like evaluation of one run file")
    p.add_argument("--qrels", required=True, help="TREC qrels (qid 0 docid grade) or BEIR qrels tsv")
    p.add_argument("--run", required=True, help="TREC run (qid Q0 docid rank score tag)")
    p.add_argument("--metrics", nargs="+", default=["nDCG@10,MRR@10,R@100,R@1000,MAP"])
    p.add_argument(
        "--rel-threshold", type=int, default=1, help="grade counted relevant by MRR/Recall/MAP (TREC DL passage: 2)"
    )
    p.add_argument("--per-query", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object of metric -> value")
    p = sub.add_parser("eval-qa", help="official SQuAD v1.1 EM/F1 of answer predictions against a QA file")
    p.add_argument(
        "--data", required=True, help="a QA file: SQuAD JSON, NQ-open JSONL, DPR csv, HotpotQA, MS MARCO QnA"
    )
    p.add_argument("--predictions", required=True, help="{question_id: answer} JSON, or JSONL of {query_id, answer}")
    p.add_argument("--json", action="store_true", help='print {"exact_match": …, "f1": …} like the official script')
    p = sub.add_parser(
        "upload",
        help="copy a registered dataset, a local folder or a model to a bucket or shared path once, and print "
        "the config override that uses it",
    )
    p.add_argument("source", help="a registered dataset name, a local folder, or a model (folder, hub owner/name)")
    p.add_argument("--to", required=True, help="s3://bucket/prefix, gs://bucket/prefix or a shared path")
    p.add_argument("--kind", default="auto", choices=["auto", "dataset", "files", "model"])
    p.add_argument("--name", help="the folder name under datasets/ or models/ (default: from the source)")
    p.add_argument("--data-root", help="where registered datasets are found or downloaded locally")
    p.add_argument("--revision", help="a hub model's commit (pin it: the cluster then runs exactly that)")
    p = sub.add_parser("config", help="the configuration reference (Markdown), or its JSON schema")
    p.add_argument("--schema", action="store_true", help="print the JSON schema instead of the Markdown table")
    return parser


def _dispatch(args) -> None:
    if args.command == "eval-run":
        return _eval_run(args)
    if args.command == "config":
        return _config(args)
    if args.command == "eval-qa":
        return _eval_qa(args)
    if args.command == "upload":
        return _upload(args)
    from utilrag.config import load_config
    from utilrag.logs import setup_logging

    setup_logging(args.log_level)
    cfg = load_config(args.config, args.overrides)
    if args.command in ("status", "annotate-report") or getattr(args, "dry_run", False):
        _read_only(cfg, args)
        return
    _check_output_dir(str(cfg.output_dir))  # every command that writes
    from utilrag.logs import get_logger, start_run_log, stop_run_log

    handler = start_run_log(str(cfg.output_dir), args.command)
    log_file = handler.baseFilename
    try:
        _write(cfg, args)
    finally:  # named on success and on failure: the warnings and workers' output that explain it
        from utilrag.raycluster import copy_worker_logs, forward_worker_output, worker_logs_location

        log = get_logger(args.command)
        log.info(f"log: {log_file}")
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized() and not forward_worker_output():  # Ray was started or joined
            workers = copy_worker_logs(log_file.removesuffix(".log") + "-workers")
            log.info(f"workers' output (vLLM, Ray Train, Ray Data): {workers or worker_logs_location()}")
        stop_run_log(handler)


def _read_only(cfg, args) -> None:
    if args.command == "pipeline" and args.dry_run:
        _dry_run(cfg, args)
    elif args.command == "status":
        from utilrag import status

        states = status.status(cfg)
        print(json.dumps(status.as_json(cfg, states)) if args.json else status.render(cfg, states, "status"))
    else:
        from utilrag.annotate import print_reports

        print_reports(cfg)


def _write(cfg, args) -> None:
    if args.command == "pipeline":
        from utilrag.pipeline import run_pipeline

        run_pipeline(cfg, only=args.only, start=args.start)
    elif args.command == "run":
        from utilrag.pipeline import run_pipeline

        run_pipeline(cfg)
    else:
        from utilrag.stages import get_stage

        get_stage(args.command).runner()(cfg)


def _check_output_dir(out: str) -> None:
    """A local output directory that cannot be created or written is the user's to fix: one line, not a
    traceback from the first stage that writes (on object storage the store's own errors say it)."""
    import os

    from utilrag.errors import UtilragError
    from utilrag.store import is_remote

    if is_remote(out):
        return
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UtilragError(f"output_dir {out}: cannot create it: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UtilragError(f"output_dir {out}: not writable by this user")


def main(argv: list[str] | None = None) -> int:
    from utilrag.errors import UtilragError

    args = build_parser().parse_args(argv)
    try:
        _dispatch(args)
    except UtilragError as e:  # every stage's user-facing errors: one line, exit 2
        print(f"utilrag: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # Object storage refusing (no such bucket, no credentials, access denied) is the user's to fix:
        # pyarrow's message names the bucket and the reason. Other I/O errors keep their traceback.
        if not any(word in str(e) for word in ("AWS Error", "S3", "GCS", "google")):
            raise
        print(f"utilrag: error: object storage: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the stages clean up in their finally blocks; no traceback
        print("utilrag: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
