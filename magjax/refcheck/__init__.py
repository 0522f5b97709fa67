"""Checks magjax against reference values produced by running the official code.

    python -m magjax.refcheck tests/fixtures/loss_refs.json [--dtype float32] [--mesh 8] [--block 3]
    python -m magjax.refcheck tests/fixtures/curricularface_refs.json [--mesh 8]
    python -m magjax.refcheck tests/fixtures/eval_refs.json

Prints one line per case with the largest error of each field, then ``K/K cases match``; exits
non-zero if any case fails. Formats:

* ``magjax-loss-refs/1``: each case names a loss and its hyper-parameters; it runs through
  :class:`magjax.losses.MarginLoss` with the option that reproduces that official code
  (``arcface``/``cosface``/``combined``: arcface_torch with its 1e-30 probability floor and
  straight-through ArcFace gradient; ``magface``: official MagFace; ``adaface``: official
  AdaFace head, EMA state carried across the case's steps; ``curricularface``: the authors'
  head, ``t`` carried across the steps). With ``--mesh N`` every case runs
  through the class-sharded head on N devices instead of the dense loss; with ``--block N``
  through the head that visits the classes N at a time (``head.block_size``).
* ``magjax-eval-refs/1``: verification and IJB cases (:mod:`magjax.refcheck.eval_cases`).

The harnesses that run magjax's code on a case live beside this module
(:mod:`~magjax.refcheck.loss_cases`, :mod:`~magjax.refcheck.eval_cases`), not in the library.

Pass rule per field: ``max|got - expected| <= tol * max(1, max|expected|)`` with tol 1e-8 in
float64 and 1e-4 in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TOLERANCE = {"float64": 1e-8, "float32": 1e-4}


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m magjax.refcheck",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", help="reference JSON files")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="float64")
    parser.add_argument(
        "--mesh",
        type=int,
        default=0,
        help="run loss cases through the class-sharded head on N devices",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=0,
        metavar="N",
        help="run loss cases through the head N classes at a time "
        "(head.block_size; on the --mesh devices, or on one)",
    )
    args = parser.parse_args(argv)
    if args.block < 0:
        parser.error(f"--block must be >= 1 (or 0: the dense head), got {args.block}")
    return args


def _provide_devices(count: int) -> None:
    """Asks XLA for ``count`` fake CPU devices; must run before jax is first imported."""
    if count > 1 and "jax" not in sys.modules:
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def within_tolerance(error: float, scale: float, dtype: str) -> bool:
    """The pass rule of every float field: ``error <= tol * scale``."""
    return error <= TOLERANCE[dtype] * scale


def field_error(got, expected) -> tuple[float, float]:
    """``(max |got - expected|, max(1, max |expected|))`` over arrays or scalars."""
    import numpy as np

    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        raise ValueError(f"shape {got.shape} != expected {expected.shape}")
    if not np.isfinite(got).all() and np.array_equal(np.isnan(got), np.isnan(expected)):
        finite = ~np.isnan(expected)
        got, expected = got[finite], expected[finite]
    error = float(np.max(np.abs(got - expected))) if got.size else 0.0
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    return error, scale


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    _provide_devices(args.mesh)
    import jax

    from magjax import logs

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    logs.route_logging(None)
    logs.start_jax()
    if args.mesh and jax.device_count() < args.mesh:
        print(
            f"--mesh {args.mesh} needs {args.mesh} devices, have {jax.device_count()} "
            "(jax was imported before the fake devices could be set up)",
            file=sys.stderr,
        )
        return 2

    total = matched = 0
    for path in args.files:
        with open(path) as f:
            refs = json.load(f)
        fmt = refs.get("format")
        for case in refs["cases"]:
            if fmt == "magjax-loss-refs/1":
                from magjax.refcheck import loss_cases

                ok, detail = loss_cases.check_case(case, args.dtype, args.mesh, args.block or None)
            elif fmt == "magjax-eval-refs/1":
                from magjax.refcheck import eval_cases

                ok, detail = eval_cases.check_case(case, args.dtype)
            else:
                print(
                    f"{path}: unknown format {fmt!r}; expected magjax-loss-refs/1 or "
                    "magjax-eval-refs/1",
                    file=sys.stderr,
                )
                return 2
            total += 1
            matched += ok
            print(f"{'ok  ' if ok else 'FAIL'} {case['name']}: {detail}", flush=True)
    print(f"{matched}/{total} cases match")
    return 0 if matched == total else 1
