"""The ``fnllm`` command line (generate lands with the engine, Stage 4)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("fnllm: not yet: `fnllm generate` lands with the engine (Stage 4).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
