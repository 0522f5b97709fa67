"""Benchmarks: ``python -m magjax.bench NAME [options]`` (``NAME --help`` for each one's).

    python -m magjax.bench head --batch 256 --classes 100000 --devices 8   # head vs its floor
    python -m magjax.bench backbone --arch iresnet18 --batch 32            # vs PyTorch eager
    python -m magjax.bench backbone --arch tiny --batch 128 --convs        # + each convolution
    python -m magjax.bench input --images 1024                             # input pipeline
    python -m magjax.bench train --arch iresnet50 --batch 256 --torch      # whole train step
    python -m magjax.bench compile --topology v5p:4x4x4 --config configs/arcface.py:r100
    python -m magjax.bench compile --topology h100:8 --config configs/arcface.py:r50  # GPUs
    python -m magjax.bench capacity --topology v5e:16x16 --config configs/arcface.py:r100
    python -m magjax.bench capacity --topology a100-40gb:8 --config configs/magface.py:r100 \\
        --of batch                                       # the largest per-GPU batch that fits
    python -m magjax.bench export --arch iresnet50                         # ONNX Runtime vs JAX

Each prints its figures and, last, one JSON line; BENCHMARKS.md records them. They run with
magjax's CPU settings (:mod:`magjax.cpu_runtime`), like training; ``--cpu-defaults`` anywhere
after the name runs with XLA's and glibc's defaults instead (the figures before those settings).
"""

import importlib
import sys

from magjax import cli, cpu_runtime, logs

BENCHMARKS = ("head", "backbone", "input", "train", "compile", "capacity", "export")


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        given = f"unknown benchmark {argv[0]!r}" if argv else "no benchmark named"
        return cli.report_user_error(
            f"{given}; one of {', '.join(BENCHMARKS)} (see python -m magjax.bench --help)"
        )
    if argv[0] in ("compile", "capacity") and not {"-h", "--help"} & set(argv):
        from magjax.bench import compile as compile_bench

        compile_bench.restart_with_deep_stack(argv)
    if "--cpu-defaults" not in argv[1:]:
        cpu_runtime.restart_with_malloc_tunables("magjax.bench")
        cpu_runtime.configure()
    options = [arg for arg in argv[1:] if arg != "--cpu-defaults"]
    logs.route_logging(None)
    if argv[0] not in ("compile", "capacity", "head"):
        # Those three start jax themselves once they have set the compilers' environment or
        # the CPU device count, with libtpu's probing kept off the console too.
        logs.start_jax()
    module = importlib.import_module(f"magjax.bench.{argv[0]}")
    return module.main(options) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
