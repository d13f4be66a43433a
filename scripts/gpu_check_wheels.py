"""The wheels a GPU machine without a package index needs to run scripts/gpu_check.py
(``python scripts/gpu_check.py --download-wheels DIR``, on a machine that has one).

The GPU machine this is made for has Python 3.12, torch 2.11+cu130, transformers 5.17, peft,
accelerate 1.15, tokenizers, safetensors, pyarrow, pandas, fsspec, xxhash, filelock, pyyaml, psutil,
matplotlib and tensorboard, and no network. moetune itself is not installed there: the repository is
copied and ``src`` goes on PYTHONPATH. The wheels are pinned to the versions installed where they are
downloaded (moetune's tested environment), for CPython 3.12 on x86-64 Linux; :data:`WHEELS` says why
each is needed, and DeepSpeed's wheel is built from its source archive. flash-attn is not among them: it publishes no wheel and building it takes longer than
the check, so stage 3 reports it as absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = {
    "transformers": "the version moetune's tests run against (the GPU image's 5.17 is older)",
    "peft": "the version moetune's tests run against",
    "datasets": "the tokenized-data cache every training stage builds",
    "dill": "a dependency of datasets",
    "multiprocess": "a dependency of datasets",
    "tree-sitter": "`moetune data` on the quickstart's Rust crate (stage 2)",
    "tree-sitter-rust": "`moetune data` on the quickstart's Rust crate",
    "google-re2": "`moetune data`: gitignore patterns",
    "pathspec": "`moetune data`: gitignore patterns",
    "regex": "the version transformers checks for at import",
    "hjson": "a dependency of DeepSpeed (stage 6)",
    "pydantic": "a dependency of DeepSpeed",
    "pydantic-core": "a dependency of pydantic",
    "annotated-types": "a dependency of pydantic",
    "typing-inspection": "a dependency of pydantic",
    "bitsandbytes": "QLoRA (stage 5); only its CPU and CUDA 13 libraries are kept (43 MiB as published, a few after)",
}
"""Binary wheels fetched from the package index: name -> why the GPU machine needs it."""

_PLATFORMS = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)] + ["--platform=manylinux2014_x86_64",
                                                                                 "--platform=manylinux1_x86_64"]


def download_wheels(folder: Path) -> None:
    """Every wheel of :data:`WHEELS`, and DeepSpeed's built here, into ``folder`` at the versions installed here."""
    from importlib.metadata import version

    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version=3.12", "--implementation=cp",
                    *_PLATFORMS, "-d", str(folder), *(f"{name}=={version(name)}" for name in WHEELS)], check=True)
    # DeepSpeed (stage 6) publishes only a source archive. Built without its ops, its wheel is pure Python:
    # they are JIT-built where needed, and ZeRO-2 with moetune's own AdamW needs none.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(folder), f"deepspeed=={version('deepspeed')}"],
                   check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    for wheel in folder.glob("bitsandbytes-*.whl"):
        keep_libraries(wheel, ("_cpu", "_cuda13"))
    total = sum(p.stat().st_size for p in folder.glob("*.whl"))
    print(f"{len(list(folder.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {folder}")


def keep_libraries(wheel: Path, markers: tuple[str, ...]) -> None:
    """Rewrite ``wheel`` without the shared libraries (``.so``) whose names contain none of ``markers``; its
    RECORD loses their lines, so pip installs it without complaint."""

    def kept(name: str) -> bool:
        return not name.endswith(".so") or any(marker in name for marker in markers)

    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if not kept(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith("RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True) if kept(line.split(",")[0])).encode()
            dst.writestr(item, data)
    slim.replace(wheel)
