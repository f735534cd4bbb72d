"""Entrypoint for `ray job submit --working-dir . -- python jobs/submit.py <stage> --config FILE [key=value ...]`.

<stage> is any command of `utilrag --help`: a registered stage (ingest, pools, bm25, annotate, train,
index, evaluate), `pipeline` or `run`. Connects to the cluster in $RAY_ADDRESS (set by `ray job
submit`), or starts a local one.
"""

import sys
from pathlib import Path

# The submitted working dir carries the library: import it from there, not from an older install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pkg"))

from utilrag.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
