"""Install requirements/gpu.lock into a fresh venv the way cluster/Dockerfile installs it, then check it.

    python3 scripts/check_gpu_env.py [--venv DIR] [--pip-cache DIR] [--delete]   # make check-gpu-env

The cluster image (cluster/Dockerfile) and the launcher configs install the lock with pip --no-deps,
nothing re-resolved. This does the same on a CPU machine (the lock's wheels are manylinux x86_64; no GPU
or NVIDIA driver is needed), with the pip flags read from the Dockerfile so the two cannot drift, adds
utilrag itself (pip install --no-deps -e .), then checks, in the venv:

1. every pin of the lock is installed at its version;
2. ``import torch, vllm, faiss, ray, deepspeed, utilrag`` work (versions, torch.version.cuda, whether faiss
   is the GPU build);
3. vLLM's compiled extensions: each is dlopen()ed; those that need libcuda.so.1 (the NVIDIA driver's
   library, on GPU nodes only) cannot load here, so their dynamic symbols are checked instead: every
   symbol they take from torch, the CUDA 13 wheels and the system must be defined there (an
   extension built for another torch fails this);
4. the requirements of every installed package, including the extras that packages request of each
   other (torch -> cuda-toolkit[cublas,...], vllm -> humming-kernels[cu13], utilrag[gpu]), which
   ``pip check`` does not follow; then ``pip check`` itself.

Expected, and reported as such: vLLM 0.33.0 requires torchaudio, torchvision and torchcodec, which
gpu.lock leaves out (its header says why). Anything else fails the check (exit 1).
Several GB of CUDA wheels and 5-20 minutes: not part of ``make test``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
LOCK = ROOT / "requirements" / "gpu.lock"
MARKER = ".utilrag-gpu-env"  # in a venv this script made: the only kind it removes
IMAGE_LOCK = "/home/ray/utilrag/requirements/gpu.lock"
MODULES = ["torch", "vllm", "faiss", "ray", "deepspeed", "utilrag"]
# Left out of the lock on purpose (see its header): vLLM's audio / image / video inputs.
DROPPED = ("torchaudio", "torchvision", "torchcodec")
# This machine's pip config points at local indexes that lack most projects: noise, not a finding.
NOISE = "is ignored: it is neither a file nor a directory"


def say(msg: str) -> None:
    print(f"[check-gpu-env] {msg}", flush=True)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(lock: Path) -> dict[str, str]:
    return {norm(n): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock.read_text(), re.M)}


def expected(line: str) -> bool:
    return any(re.search(rf"\brequires {name}\b", line) for name in DROPPED)


# ----------------------------------------------------------------------------- inside the venv
def check_pins(lock: Path) -> list[str]:
    from importlib import metadata

    pins = lock_pins(lock)
    have = {norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = [f"{n}: lock {v}, installed {have.get(n, 'missing')}" for n, v in sorted(pins.items()) if have.get(n) != v]
    say(f"{len(pins) - len(wrong)}/{len(pins)} pins of {lock.name} installed at their version")
    extra = sorted(set(have) - set(pins) - {"pip", "utilrag"})
    if extra:
        say(f"  installed but not in the lock: {', '.join(extra)}")
    return wrong


def check_imports() -> list[str]:
    import importlib
    import traceback

    failed = []
    for name in MODULES:
        t = time.perf_counter()
        try:
            mod = importlib.import_module(name)
        except BaseException as exc:  # ImportError, or OSError from a shared library that does not load
            traceback.print_exc()
            failed.append(f"import {name}: {type(exc).__name__}: {exc}")
            continue
        say(f"import {name:<10} {getattr(mod, '__version__', '?'):<16} {time.perf_counter() - t:5.1f}s")
    if "torch" in sys.modules:
        import torch

        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        say(
            f"torch.version.cuda={torch.version.cuda} cudnn={torch.backends.cudnn.version()} nccl={nccl} "
            f"cuda.is_available()={torch.cuda.is_available()} (False without a GPU)"
        )
    if "faiss" in sys.modules:
        import faiss

        gpu = all(hasattr(faiss, s) for s in ("StandardGpuResources", "GpuIndexFlatIP", "index_cpu_to_gpu"))
        say(f"faiss GPU build: {'yes' if gpu else 'NO'} (get_num_gpus()={faiss.get_num_gpus()}: 0 without a GPU)")
        if not gpu:
            failed.append("faiss is not the GPU build")
    return failed


def dynamic_symbols(path: Path, undefined: bool) -> set[str]:
    flag = "--undefined-only" if undefined else "--defined-only"
    out = subprocess.run(["nm", "-D", flag, str(path)], capture_output=True, text=True).stdout
    syms = set()
    for line in out.splitlines():
        parts = line.split()
        if undefined and (len(parts) != 2 or parts[0] != "U"):  # weak ones (w, v) may stay unresolved
            continue
        syms.add(parts[-1].split("@")[0])
    return syms


def check_vllm_extensions() -> list[str]:
    import ctypes
    import importlib.util

    import torch  # loads libtorch*, libc10*, the CUDA 13 runtime: what the extensions link against

    site = Path(torch.__file__).parent.parent
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin is not None
    vllm_dir = Path(spec.origin).parent
    libdirs = [site / "torch" / "lib", site / "nvidia" / "cu13" / "lib"]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(map(str, libdirs))}
    loaded, driver, problems = [], [], []
    have_nm = shutil.which("nm") is not None
    for so in sorted(vllm_dir.rglob("*.so")):
        rel = str(so.relative_to(site))
        try:
            ctypes.CDLL(str(so))
            loaded.append(so.name)
            continue
        except OSError as exc:
            if "libcuda.so.1" not in str(exc):
                problems.append(f"{rel}: {exc}")
                continue
        driver.append(so.name)
        if not have_nm:
            continue
        # Every library it would load (ldd), the driver's excepted; then what they all define.
        ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True, env=env).stdout
        libs = re.findall(r"(?:=> |^\s+)(/\S+)", ldd, re.M)  # the loader itself has no "=>"
        defined: set[str] = set()
        for lib in libs:
            defined |= dynamic_symbols(Path(lib), undefined=False)
        missing = {
            s
            for s in dynamic_symbols(so, undefined=True) - defined
            if not re.match(r"_?Py|cu[A-Z]", s)  # the interpreter's; the driver API (libcuda.so.1)
        }
        if missing:
            problems.append(f"{rel}: {len(missing)} symbols defined nowhere, e.g. {sorted(missing)[:3]}")
    say(f"vLLM extensions: {len(loaded)} load here ({', '.join(loaded)})")
    say(
        f"vLLM extensions: {len(driver)} need libcuda.so.1, the NVIDIA driver's library (GPU nodes only), "
        f"so cannot be loaded here: {', '.join(driver)}"
    )
    if driver and not have_nm:
        say("  nm not found: their symbols were not checked")
    elif driver and not problems:
        say(f"  every other symbol they use is defined by torch {torch.__version__}, the CUDA 13 wheels or the system")
    return problems


def check_requirements() -> list[str]:
    """pip check, following extras too: (package, extra) pairs reached from every installed package."""
    from importlib import metadata

    from packaging.requirements import Requirement

    dists = {norm(d.metadata["Name"]): d for d in metadata.distributions()}
    todo = [(name, "") for name in dists] + [("utilrag", "gpu")]
    seen: set[tuple[str, str]] = set()
    problems: dict[tuple[str, str], str] = {}
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen or name not in dists:
            continue
        seen.add((name, extra))
        dist, who = dists[name], f"{name}[{extra}]" if extra else name
        if extra and extra not in {norm(e) for e in dist.metadata.get_all("Provides-Extra") or []}:
            problems[(who, "")] = f"{name} {dist.version} has no extra [{extra}]"
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            if extra and "extra" not in str(req.marker):
                continue  # a base requirement, checked with the package itself
            target = norm(req.name)
            if target not in dists:
                problems[(who, target)] = f"{who} {dist.version} requires {req}, which is not installed"
            elif not req.specifier.contains(dists[target].version, prereleases=True):
                problems[(who, target)] = (
                    f"{who} {dist.version} requires {req}, but {dists[target].version} is installed"
                )
            todo += [(target, norm(e)) for e in req.extras]
    extras = sorted(f"{n}[{e}]" for n, e in seen if e)
    say(f"requirements of {len(seen)} (package, extra) pairs, extras included: {', '.join(extras)}")
    return sorted(problems.values())


def inside(lock: Path) -> int:
    bad = []
    for title, check in [
        ("pins", lambda: check_pins(lock)),
        ("imports", check_imports),
        ("vLLM extensions", check_vllm_extensions),
    ]:
        problems = check()
        bad += problems
        for p in problems:
            say(f"  {title}: {p}")
    reqs = check_requirements()
    for line in reqs:
        say(f"  {line}{'   (expected: left out of the lock)' if expected(line) else ''}")
    bad += [line for line in reqs if not expected(line)]
    return 1 if bad else 0


# ----------------------------------------------------------------------------- on the host
def dockerfile_pip_flags() -> list[str]:
    m = re.search(rf"python -m pip install (.*?) -r {re.escape(IMAGE_LOCK)}", DOCKERFILE.read_text())
    if not m or "--no-deps" not in m.group(1).split():
        raise SystemExit(f"cannot read the lock's pip install flags (with --no-deps) from {DOCKERFILE}")
    return m.group(1).split()


def pip(py: Path, *args: str) -> None:
    """Run pip in the venv, its output shown less this machine's index noise; fail on failure."""
    cmd = [str(py), "-m", "pip", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if NOISE not in line:
                print(line, end="", flush=True)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")


def fresh_venv(venv: Path) -> Path:
    if sys.version_info[:2] != (3, 11):  # the lock's Python; the Dockerfile asserts the same
        raise SystemExit(f"gpu.lock is for CPython 3.11, this is {sys.version.split()[0]}: set PYTHON")
    if venv.exists():
        if not (venv / MARKER).is_file():
            raise SystemExit(f"{venv} exists and was not made by this script: not touching it (--venv)")
        shutil.rmtree(venv)
    inside_repo = venv.is_relative_to(ROOT)
    if inside_repo and subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(venv)]).returncode:
        raise SystemExit(f"{venv} is inside the repository but not git-ignored: use another --venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (venv / MARKER).touch()
    return venv / "bin" / "python"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/utilrag-gpu-env"), help="made afresh")
    parser.add_argument("--lock", type=Path, default=LOCK)
    parser.add_argument(
        "--pip-cache",
        type=Path,
        help="pip --cache-dir instead of the Dockerfile's --no-cache-dir: keeps built wheels (deepspeed is an "
        "sdist) and downloads where the index allows HTTP caching",
    )
    parser.add_argument("--delete", action="store_true", help="remove the venv at the end")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # the checks, in the venv
    args = parser.parse_args(argv)
    lock = args.lock.resolve()
    if args.inside:
        return inside(lock)

    start = time.monotonic()
    flags = dockerfile_pip_flags()
    if args.pip_cache:  # where the wheels come from, not what is installed
        flags = [f"--cache-dir={args.pip_cache}" if f == "--no-cache-dir" else f for f in flags]
    venv = args.venv.absolute()
    py = fresh_venv(venv)
    pip_version = subprocess.run([str(py), "-m", "pip", "--version"], capture_output=True, text=True).stdout
    say(f"venv {venv}: Python {sys.version.split()[0]}, pip {pip_version.split()[1]}")
    say(f"pip install {' '.join(flags)} -r {lock}   (as cluster/Dockerfile)")
    pip(py, "install", *flags, "-r", str(lock))
    say(f"lock installed in {time.monotonic() - start:.0f}s; utilrag: pip install --no-deps --no-build-isolation -e .")
    pip(py, "install", "-q", *flags, "--no-build-isolation", "-e", str(ROOT))

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    status = subprocess.run([str(py), __file__, "--inside", "--lock", str(lock)], env=env).returncode
    check = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True)
    lines = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.strip()]
    say("pip check:")
    for line in lines:
        print(f"    {line}{'   (expected: left out of the lock)' if expected(line) else ''}")
    unexpected = [ln for ln in lines if not expected(ln) and not ln.startswith("No broken requirements")]
    status = status or (1 if unexpected else 0)
    n_expected = sum(map(expected, lines))

    size = subprocess.run(["du", "-sh", str(venv)], capture_output=True, text=True).stdout.split("\t")[0]
    if args.delete:
        shutil.rmtree(venv)
    where = "removed" if args.delete else f"kept at {venv} ({size})"
    verdict = "OK" if status == 0 else "FAILED"
    say(
        f"{verdict}: {lock.name} installed as cluster/Dockerfile does ({' '.join(flags)}), imports, vLLM extensions, "
        f"requirements; pip check: {n_expected} expected, "
        f"{len(unexpected)} unexpected; venv {where}; {time.monotonic() - start:.0f}s"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
