"""Fused CPU kernels (``csrc/cpu_kernels.cpp``), built on first use.

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

_SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
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


def _build():
    try:
        from torch.utils.cpp_extension import load as load_extension

        return load_extension(
            name="fnllm_cpu_kernels",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers: the eager path still works
        log.warning("fnllm: CPU kernels unavailable, using the eager torch path (%s)", exc)
        return None


if __name__ == "__main__":
    print("fnllm CPU kernels:", "built" if load() is not None else "not available")
