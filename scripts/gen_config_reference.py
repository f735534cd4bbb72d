"""Rewrite the configuration reference (docs/configuration.md) from the config schema.

    python scripts/gen_config_reference.py          # rewrite the table between the markers
    python scripts/gen_config_reference.py --check  # exit 1 if the table is stale

The table is ``utilrag.config_reference.config_reference()``, put between ``<!-- config-reference:start -->``
and ``<!-- config-reference:end -->`` in docs/configuration.md. Nothing else is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pkg"))

from utilrag.config_reference import config_reference  # noqa: E402

PAGE = ROOT / "docs" / "configuration.md"
START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def splice(text: str, table: str) -> str:
    """``text`` with everything between the markers replaced by ``table``."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{PAGE}: expected one {START} ... {END} pair")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table.rstrip()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale; write nothing")
    args = parser.parse_args(argv)
    text = PAGE.read_text(encoding="utf-8")
    new = splice(text, config_reference())
    if args.check:
        if new != text:
            print(f"{PAGE}: the configuration reference is stale; run python scripts/gen_config_reference.py")
            return 1
        return 0
    if new != text:
        PAGE.write_text(new, encoding="utf-8")
        print(f"{PAGE}: configuration reference rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
