"""Fused CPU kernels (``csrc/cpu_kernels.cpp``, ``csrc/small_linear.cpp``,
``csrc/decode_layers.cpp``), built on first use.

torch's C++ extension loader compiles the source once per source version
into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``);
``scripts/setup.sh`` builds it ahead so that no run pays the ~1 minute
compile. When there is no compiler, or ``FNLLM_CPU_KERNELS=0``, ``load()``
returns None and the torch backend keeps its eager ATen path, which computes
the same functions (the kernels are tested against it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / name for name in ("cpu_kernels.cpp", "small_linear.cpp", "decode_layers.cpp")]
_HEADERS = [_CSRC / name for name in ("common.h", "kernels.h")]  # not compiled on their own, part of the build key
_state: dict[str, object] = {}
log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("FNLLM_CPU_KERNELS", "1") != "0"


def load():
    """The compiled module, or None (disabled, or the build failed: logged once)."""
    if not enabled():
        return None
    if "module" not in _state:
        _state["module"] = _build()
    return _state["module"]


_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]


def _stamp_path() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    return Path(root) / "fnllm_cpu_kernels.stamp.json"


def _key() -> str:
    import hashlib
    import platform

    import torch

    sources = [p.read_text() for p in _SOURCES + _HEADERS]
    text = "\0".join([*sources, " ".join(_CFLAGS), torch.__version__, platform.python_version(), platform.machine()])
    return hashlib.sha256(text.encode()).hexdigest()


def _so_id(path: str) -> list[int] | None:
    """The built file's size and modification time: a rebuild changes them."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _load_stamped():
    """The module built earlier for this exact source, flags and torch, imported
    straight from its ``.so`` (torch's loader imports ``cpp_extension`` and
    checks the build: about 0.3 s of every start-up); None when there is none."""
    import importlib.machinery
    import importlib.util
    import json

    try:
        stamp = json.loads(_stamp_path().read_text())
        if stamp.get("key") != _key() or stamp.get("so") != _so_id(stamp["file"]):
            return None  # another source's build, or the .so rebuilt since (by a loader that wrote no stamp)
        loader = importlib.machinery.ExtensionFileLoader(stamp["name"], stamp["file"])
        spec = importlib.util.spec_from_file_location(stamp["name"], stamp["file"], loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    except Exception:  # no stamp, a stale or unreadable one: build (or find) it the usual way
        return None


_STALE_LOCK_S = 600  # a build takes about a minute; a lock this old was left by a killed one


def _clear_stale_lock() -> None:
    """Remove torch's build lock when a killed build left it behind: torch's
    loader otherwise waits for it forever (every later model load hangs)."""
    import time

    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory("fnllm_cpu_kernels", False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except Exception:  # no lock (the usual case), or torch moved its private helper
        return
    if age > _STALE_LOCK_S:
        log.warning("fnllm: removing a stale CPU-kernel build lock %s (%.0f s old)", lock, age)
        lock.unlink(missing_ok=True)


def _build():
    module = _load_stamped()
    if module is not None:
        return module
    _clear_stale_lock()
    try:
        from torch.utils.cpp_extension import load as load_extension

        module = load_extension(
            name="fnllm_cpu_kernels",
            sources=[str(p) for p in _SOURCES],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers: the eager path still works
        log.warning("fnllm: CPU kernels unavailable, using the eager torch path (%s)", exc)
        return None
    try:
        import json

        _stamp_path().write_text(json.dumps({"key": _key(), "name": module.__name__, "file": module.__file__,
                                             "so": _so_id(module.__file__)}))
    except OSError:
        pass
    return module


if __name__ == "__main__":
    print("fnllm CPU kernels:", "built" if load() is not None else "not available")
