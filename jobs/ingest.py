"""Entrypoint for `ray job submit --working-dir . -- python jobs/ingest.py --config jobs/configs/local.yaml [key=value ...]`.

Connects to the cluster in $RAY_ADDRESS (set by `ray job submit`), or starts a local one.
"""
import sys

from utilrag.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
