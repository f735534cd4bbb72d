"""Datasets by name: where they live under the data root, how their files map to tables,
and how to fetch the official public files when they are missing."""

from __future__ import annotations

import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from utilrag import store
from utilrag.config import BEIR_14, CQADUPSTACK_FORUMS, DatasetConfig
from utilrag.data.formats import list_files
from utilrag.errors import UtilragError
from utilrag.logs import get_logger
from utilrag.store import exists

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
MSMARCO_TAR = "https://msmarco.z22.web.core.windows.net/msmarcoranking/collectionandqueries.tar.gz"
DL19_QRELS = "https://trec.nist.gov/data/deep/2019qrels-pass.txt"
DL19_QUERIES = "https://msmarco.z22.web.core.windows.net/msmarcoranking/msmarco-test2019-queries.tsv.gz"
HOTPOTQA = "http://curtis.ml.cmu.edu/datasets/hotpot"
DL20_QRELS = "https://trec.nist.gov/data/deep/2020qrels-pass.txt"
DL20_QUERIES = "https://msmarco.z22.web.core.windows.net/msmarcoranking/msmarco-test2020-queries.tsv.gz"

BEIR_NAMES = list(BEIR_14)  # the paper's 14 BEIR sets (config.BEIR_14)

log = get_logger("ingest")


class DatasetError(UtilragError):
    """A dataset that is missing or laid out wrongly (printed as one message, exit 2)."""


@dataclass(frozen=True)
class Registered:
    layout: str
    relevance_threshold: int = 1
    unknown_qrels_docs: str = "reject"
    downloads: list[tuple[str, str]] = field(default_factory=list)  # (url, file name or "" to unpack)
    needs: str = ""  # the files a complete copy holds, for the offline message
    # BEIR's evaluation drops a retrieved document whose id is the query's (ArguAna, Quora: the
    # query is itself a corpus document and would otherwise be its own top hit).
    ignore_identical_ids: bool = False
    folder: str | None = None  # under data_root; null: the name (CQADupStack forums share one download)
    titles: bool = True  # passage titles kept (DatasetConfig.titles)
    # ir: a corpus / queries / qrels layout (data/formats.py); qa: one question-answering file with
    # answers, read by data/qa.py in ``qa_format`` (a published file, looked for as is or (un)gzipped)
    kind: str = "ir"
    qa_format: str = ""

    @property
    def qa_file(self) -> str:
        return self.downloads[0][1]


def _qa(url: str, fmt: str, file: str = "") -> Registered:
    """A question-answering set: one official file under data_root/<name>/."""
    file = file or url.rsplit("/", 1)[-1]
    return Registered("qa", kind="qa", qa_format=fmt, downloads=[(url, file)], needs=f"{file} (or its .gz)")


def _trec_dl(qrels_url: str, queries_url: str) -> Registered:
    """A TREC Deep Learning passage track year: NIST's graded qrels (relevant from grade 2) and
    topics over the MS MARCO collection."""
    return Registered(
        "msmarco",
        relevance_threshold=2,
        unknown_qrels_docs="keep",
        downloads=[(MSMARCO_TAR, ""), (qrels_url, "qrels.txt"), (queries_url, "queries.tsv.gz")],
        needs="collection.tsv[.gz], queries.tsv (qid<TAB>text), qrels.txt (TREC qrels), optional runs/*.trec",
    )


REGISTRY: dict[str, Registered] = {
    **{
        name: Registered(
            "beir",
            downloads=[(BEIR_URL.format(name=name), "")],
            needs="corpus.jsonl, queries.jsonl, qrels/<split>.tsv (BEIR layout)",
            ignore_identical_ids=name in ("arguana", "quora"),
        )
        for name in BEIR_NAMES
    },
    "msmarco-passage": Registered(
        "msmarco",
        downloads=[(MSMARCO_TAR, "")],
        needs="collection.tsv, queries.train.tsv, queries.dev.tsv, qrels.train.tsv, qrels.dev.tsv",
    ),
    # The local copy holds the 43 judged queries and only the passages of four public runs'
    # top-100, so judged passages outside the pool are kept in qrels (they still count in nDCG's ideal).
    "trec-dl-2019": _trec_dl(DL19_QRELS, DL19_QUERIES),
    # BEIR's cqadupstack.zip holds one BEIR dataset per forum: cqadupstack/<forum>/corpus.jsonl, …
    **{
        f"cqadupstack-{forum}": Registered(
            "beir",
            downloads=[(BEIR_URL.format(name="cqadupstack"), "")],
            needs="cqadupstack/<forum>/{corpus.jsonl, queries.jsonl, qrels/test.tsv} (BEIR's cqadupstack.zip)",
            folder=f"cqadupstack/{forum}",
        )
        for forum in CQADUPSTACK_FORUMS
    },
    "trec-dl-2020": _trec_dl(DL20_QRELS, DL20_QUERIES),
    # The RepLLaMA / Tevatron MS MARCO train pool (1 positive + 30 hard negatives per query), the
    # paper's annotation input: no fixed download here (the hub dataset Tevatron/msmarco-passage,
    # exported as JSONL); `utilrag upload <folder> --kind dataset --name tevatron-msmarco` puts a copy
    # under a bucket's data root.
    # Its passages carry titles (RocketQA's) that the 8.8M collection we evaluate on lacks: dropped by default,
    # so that training sees passages as the index encodes them.
    "tevatron-msmarco": Registered(
        "tevatron",
        titles=False,
        needs="*.jsonl[.gz] of {query_id, query, positive_passages, negative_passages} "
        "(the Tevatron/msmarco-passage train split)",
    ),
    # QA sets for RAG (layout qa): questions, answers and, where the set has them, passages.
    "squad-v1.1-dev": _qa("https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json", "squad"),
    "squad-v2.0-dev": _qa("https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json", "squad"),
    "nq-open-dev": _qa(
        "https://raw.githubusercontent.com/google-research-datasets/natural-questions/master/nq_open/NQ-open.dev.jsonl",
        "nq-open",
    ),
    "hotpotqa-dev-distractor": _qa(
        "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json", "hotpotqa"
    ),
    "hotpotqa-dev-fullwiki": _qa("http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_fullwiki_v1.json", "hotpotqa"),
    "msmarco-qna-v2.1-dev": _qa("https://msmarco.z22.web.core.windows.net/msmarco/dev_v2.1.json.gz", "msmarco-qna"),
    # the gold answers of MS MARCO's training queries (same query ids as the passage-ranking train queries):
    # what the QA-metric label baseline scores its answers against (annotate.qametric.answers)
    "msmarco-qna-v2.1-train": _qa("https://msmarco.z22.web.core.windows.net/msmarco/train_v2.1.json.gz", "msmarco-qna"),
    "dpr-nq-dev": _qa("https://dl.fbaipublicfiles.com/dpr/data/retriever/nq-dev.qa.csv", "dpr-qa"),
    # NQ-open test, 3,610 questions (the paper's 2,255 NQ questions cannot be identified from public files)
    "dpr-nq-test": _qa("https://dl.fbaipublicfiles.com/dpr/data/retriever/nq-test.qa.csv", "dpr-qa"),
    "dpr-wiki-passages": _qa("https://dl.fbaipublicfiles.com/dpr/wikipedia_split/psgs_w100.tsv.gz", "dpr-passages"),
}


def kind(name: str) -> str | None:
    """ir or qa for a registered name; None for any other."""
    reg = REGISTRY.get(name)
    return reg.kind if reg else None


@dataclass
class FileJob:
    """One input file and how to parse it."""

    uri: str
    table: str
    parser: str
    ctx: dict


@dataclass
class ResolvedDataset:
    name: str
    root: str
    layout: str
    relevance_threshold: int
    unknown_qrels_docs: str
    jobs: list[FileJob]
    ignore_identical_ids: bool = False
    titles: bool = True


def _match(files: list[str], pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [f for f in files if rx.search(f.rsplit("/", 1)[-1])]


def _split_name(uri: str, word: str) -> str:
    stem = re.sub(r"\.(tsv|txt|jsonl|trec|run)(\.gz)?$", "", uri.rsplit("/", 1)[-1])
    stem = re.sub(word, "", stem).strip("._-")
    return stem or "default"


def _detect_layout(files: list[str]) -> str:
    if _match(files, r"^corpus\.jsonl(\.gz)?$"):
        return "beir"
    if _match(files, r"^collection\.tsv(\.gz)?$"):
        return "msmarco"
    if _match(files, r"\.jsonl(\.gz)?$"):
        return "tevatron"
    return "unknown"


def _plain_jobs(root: str, ctx: dict) -> list[FileJob]:
    """A plain corpus (data/plain.py): corpus.* if present, else every readable file under the folder;
    queries.* beside it, optional."""
    from utilrag.data import plain

    files = plain.list_tree(root) or [root]
    readable = [f for f in files if plain.suffix(f)]
    queries = [f for f in readable if plain.QUERY_FILE.match(f.rsplit("/", 1)[-1].lower())]
    named = [f for f in readable if re.match(r"^corpus\.", f.rsplit("/", 1)[-1].lower())]
    corpus = named or [f for f in readable if f not in queries]
    ctx = {**ctx, "root": root}
    return [FileJob(f, "corpus", "plain_corpus", ctx) for f in corpus] + [
        FileJob(f, "queries", "plain_queries", ctx) for f in queries
    ]


def _jobs_for(root: str, layout: str, files: list[str]) -> list[FileJob]:
    jobs: list[FileJob] = []
    if layout == "beir":
        for f in _match(files, r"^corpus\.jsonl(\.gz)?$"):
            jobs.append(FileJob(f, "corpus", "beir_corpus", {}))
        for f in _match(files, r"^queries\.jsonl(\.gz)?$"):
            jobs.append(FileJob(f, "queries", "beir_queries", {}))
        for f in _match(list_files(root.rstrip("/") + "/qrels"), r"\.tsv(\.gz)?$"):
            jobs.append(FileJob(f, "qrels", "beir_qrels", {"split": _split_name(f, "")}))
    elif layout == "msmarco":
        for f in _match(files, r"^collection\.tsv(\.gz)?$"):
            jobs.append(FileJob(f, "corpus", "msmarco_collection", {}))
        for f in _match(files, r"queries.*\.tsv(\.gz)?$"):
            jobs.append(FileJob(f, "queries", "tsv_queries", {}))
        for f in _match(files, r"qrels.*\.(tsv|txt)(\.gz)?$"):
            jobs.append(FileJob(f, "qrels", "trec_qrels", {"split": _split_name(f, r"qrels")}))
        runs_dir = root.rstrip("/") + "/runs"
        for f in _match(list_files(runs_dir), r"\.(trec|run|txt)(\.gz)?$"):
            jobs.append(FileJob(f, "runs", "trec_run", {"run": _split_name(f, "")}))
    elif layout == "tevatron":
        for f in _match(files, r"\.jsonl(\.gz)?$"):
            split = _split_name(f, "")
            for table in ("queries", "corpus", "qrels", "pools"):
                jobs.append(FileJob(f, table, f"tevatron_{table}", {"split": split}))
    return jobs


def offline_message(name: str, folder: str) -> str:
    reg = REGISTRY.get(name)
    needs = reg.needs if reg else "a BEIR, MS MARCO or Tevatron layout"
    urls = ", ".join(u for u, _ in reg.downloads) if reg else "(not a registered name)"
    return (
        f"dataset {name!r} is not at {folder} and could not be downloaded. Put these files there: "
        f"{needs}; official sources: {urls}. Or set UTILRAG_DATA_ROOT / data_root, or give the "
        f"dataset a path."
    )


def download(name: str, folder: Path, queries_only: bool = False) -> None:
    """Fetch a registered dataset's official files into folder (raises DatasetError when offline);
    ``queries_only``: not the archive that holds the passages (TREC DL: MS MARCO's collection tar)."""
    reg = REGISTRY[name]
    downloads = [(u, t) for u, t in reg.downloads if t or not queries_only or u.endswith(".zip")]
    if not downloads:  # no public file to fetch (tevatron-msmarco): say what goes where
        raise DatasetError(offline_message(name, str(folder)))
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        for url, target in downloads:
            local = Path(tmp) / url.rsplit("/", 1)[-1]
            log.info(f"download {url}")
            try:
                with urllib.request.urlopen(url, timeout=60) as resp, open(local, "wb") as out:
                    shutil.copyfileobj(resp, out, 1 << 20)
            except (urllib.error.URLError, OSError) as e:
                raise DatasetError(offline_message(name, str(folder)) + f" (download failed: {e})") from None
            if target:
                shutil.move(str(local), folder / target)
            elif local.suffix == ".zip":
                with zipfile.ZipFile(local) as z:
                    z.extractall(tmp)
                inner = Path(tmp) / local.stem  # BEIR zips hold one folder named like the zip
                for item in (inner if inner.is_dir() else Path(tmp)).iterdir():
                    if item != local:
                        shutil.move(str(item), folder / item.name)
            else:
                with tarfile.open(local) as t:
                    t.extractall(folder, filter="data")


def resolve(ds: DatasetConfig, data_root: str, allow_download: bool = True) -> ResolvedDataset:
    """Find a dataset's files and plan how each is parsed."""
    reg = REGISTRY.get(ds.name)
    if ds.path:
        root = ds.path if "://" in ds.path else str(Path(ds.path).expanduser().resolve())
    elif reg is None:
        raise DatasetError(
            f"dataset {ds.name!r}: not a registered name ({', '.join(sorted(REGISTRY))}) and no path given"
        )
    else:
        root = store.join(data_root, reg.folder or ds.name)
        if not exists(root) or not list_files(root):
            if not allow_download or store.is_remote(root):  # downloads go to local folders only
                raise DatasetError(offline_message(ds.name, root))
            # a forum of CQADupStack: the one zip unpacks every forum under data_root/cqadupstack
            folder = Path(store.join(data_root, reg.folder.split("/")[0])) if reg.folder else Path(root)
            download(ds.name, folder, ds.queries_only)
    if not exists(root):
        raise DatasetError(f"dataset {ds.name!r}: path not found: {root}")
    single_file = not list_files(root) and exists(root)
    files = [root] if single_file else list_files(root)
    layout = ds.layout if ds.layout != "auto" else (reg.layout if reg else _detect_layout(files))
    if layout == "plain":  # your own corpus: queries optional, no qrels
        ctx = {"passage_words": ds.passage_words, "passage_overlap": ds.passage_overlap}
        jobs = _plain_jobs(root, {**ctx, "max_document_mb": ds.max_document_mb})
        if not any(j.table == "corpus" for j in jobs):
            raise DatasetError(
                f"dataset {ds.name!r} at {root}: no corpus file (.jsonl, .csv, .tsv, .parquet, .txt or .md) "
                "for layout 'plain'"
            )
        return ResolvedDataset(ds.name, root, layout, 1, "reject", jobs, False)
    jobs = _jobs_for(root, layout, files)
    if ds.queries_only:  # the passages are another dataset's (an index target's corpus)
        jobs = [j for j in jobs if j.table != "corpus"]
    if not any(j.table == "queries" for j in jobs) or not (ds.queries_only or any(j.table == "corpus" for j in jobs)):
        raise DatasetError(
            f"dataset {ds.name!r} at {root}: no corpus or queries file for layout {layout!r}; "
            + offline_message(ds.name, root).split(". ", 1)[1]
        )
    threshold = (
        ds.relevance_threshold if ds.relevance_threshold is not None else (reg.relevance_threshold if reg else 1)
    )
    # queries_only: nothing here to check judged passages against
    unknown = "keep" if ds.queries_only else ds.unknown_qrels_docs or (reg.unknown_qrels_docs if reg else "reject")
    identical = (
        ds.ignore_identical_ids if ds.ignore_identical_ids is not None else bool(reg and reg.ignore_identical_ids)
    )
    titles = ds.titles if ds.titles is not None else (reg.titles if reg else True)
    return ResolvedDataset(ds.name, root, layout, threshold, unknown, jobs, identical, titles)
