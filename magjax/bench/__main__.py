"""Dispatches ``python -m magjax.bench NAME ARGS...`` to ``magjax.bench.NAME.main(ARGS)``."""

import importlib
import sys

BENCHMARKS = ("head", "backbone", "input", "train", "compile", "capacity", "export")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        names = ",".join(BENCHMARKS)
        print(f"usage: python -m magjax.bench {{{names}}} [options]", file=sys.stderr)
        return 2
    if argv[0] in ("compile", "capacity"):
        from magjax.bench import compile as compile_bench

        compile_bench.restart_with_deep_stack(argv)
    module = importlib.import_module(f"magjax.bench.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
