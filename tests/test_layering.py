"""The package layering: core modules import no stage; a stage package imports only stages before
it in the pipeline (data -> annotate -> train -> index -> evaluate -> rag); only the CLI and the
pipeline (and status, which reads every stage's folders, and upload, which stages every stage's data
and models) see everything. Imports inside functions count too."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pkg" / "utilrag"

# Stage packages in pipeline order; a package may import itself and those before it.
STAGE_PACKAGES = ["data", "annotate", "train", "index", "evaluate", "rag"]
TOP = {"utilrag.cli", "utilrag.pipeline", "utilrag.status", "utilrag.upload"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    """None: top level; -1: core; else the stage package's position. data.tables/formats/registry
    are core-level helpers that the data package owns."""
    if module in TOP:
        return None
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in STAGE_PACKAGES:
        return STAGE_PACKAGES.index(parts[1])
    return -1


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("utilrag"):
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("utilrag")]
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PKG.parent / rel).with_suffix(".py").is_file() or (PKG.parent / rel / "__init__.py").is_file()


def test_no_package_imports_a_later_stage():
    violations = []
    core_may_import = {"utilrag.data.tables", "utilrag.data.formats", "utilrag.data.registry"}
    for path in sorted(PKG.rglob("*.py")):
        module = _module_name(path)
        mine = _layer(module)
        if mine is None:
            continue
        for line, imported in _imports(path):
            if not _is_module(imported):
                continue
            theirs = _layer(imported)
            if theirs is None:
                violations.append(f"{path.relative_to(PKG)}:{line} imports the top level {imported}")
            elif mine == -1 and theirs >= 0 and imported not in core_may_import:
                violations.append(f"{path.relative_to(PKG)}:{line}: a core module imports the stage {imported}")
            elif theirs > mine:
                violations.append(f"{path.relative_to(PKG)}:{line}: imports {imported}, a later stage")
    assert violations == []


def test_the_checker_sees_a_violation(tmp_path):
    """The walker finds imports inside functions (the kind that hid the old cycles)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from utilrag.index.bm25 import run_bm25\n")
    assert (2, "utilrag.index.bm25") in _imports(source)
    assert _layer("utilrag.index.bm25") > _layer("utilrag.data.pools")
    assert _layer("utilrag.config") == -1 and _layer("utilrag.cli") is None
