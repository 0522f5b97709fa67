"""``python -m magjax.bench capacity``: how many identities (or images) a recipe's train step fits
per chip.

    python -m magjax.bench capacity --topology v5p:4x4x4 --config configs/arcface.py:r100,pfc0.1
    python -m magjax.bench capacity --topology v5e:16x16 --config configs/arcface.py:r100 \\
        --classes 2000000 --max-probes 2     # two compiles per rate: the line's estimate
    python -m magjax.bench capacity --topology v100-32gb:8 --config configs/arcface.py:r50,pfc0.1 \\
        --classes 29000000 --per-chip-batch 64
    python -m magjax.bench capacity --topology a100-40gb:8 --config configs/arcface.py:r100 \\
        --of batch                           # the largest per-GPU batch at the recipe's classes

For the recipe's sample rate and for r = 1.0 (the full softmax), finds the largest number of
classes whose train step (``python -m magjax.bench compile``: the step ``magjax.main`` runs,
compiled ahead of time for the topology) fits in a chip's HBM, to within ``--tolerance``. Each
probe is one abstract compile; a chip's memory grows almost linearly with the class count
(centres, their momentum and gradient, the ``[C/D, B]`` logits), so the search steps to where
the line through the last probes meets the HBM, inside the bracket of the largest count that
fits and the smallest that does not (a bisection whose midpoint is the linear estimate). The
last line is JSON: per sample rate the capacity, the smallest count found not to fit, where the
line through the two largest probes meets the HBM (the estimate to use when ``--max-probes`` cut
the search short), the bytes per chip and every probe.

``--of batch`` searches instead the largest per-chip batch (a multiple of 8) at the recipe's
class count and sample rate, the same way (memory grows almost linearly with the batch too).
Topologies, ``--config.FIELD=VALUE`` overrides and the memory a chip offers (on GPUs the share
jax allocates, ``XLA_PYTHON_CLIENT_MEM_FRACTION``) are those of ``bench compile``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from magjax import cli
from magjax.bench import compile as compile_bench


def largest_fitting(
    bytes_at: Callable[[int], int],
    budget: int,
    start: int,
    multiple: int,
    tolerance: float = 0.01,
    max_probes: int = 12,
) -> tuple[int, dict[int, int]]:
    """The largest multiple of ``multiple`` whose ``bytes_at`` is at most ``budget``, to within
    a relative ``tolerance``, and every probe made (``{count: bytes}``).

    ``bytes_at`` must grow with the count; the search is fastest when it grows linearly. The
    answer ``n`` fits and a count at most ``n * (1 + tolerance)`` (or ``n + multiple``) was
    probed and does not, unless ``max_probes`` ran out first. 0 when ``multiple`` does not fit.
    """
    probes: dict[int, int] = {}
    fitting, failing = 0, None  # the bracket: largest count that fits, smallest that does not
    outcomes: list[bool] = []

    def round_down(count: float) -> int:
        return max(int(count) // multiple * multiple, multiple)

    def line_estimate(c0: int, c1: int) -> float | None:
        """Where the line through the probes at c0 and c1 meets the budget."""
        b0, b1 = probes[c0], probes[c1]
        return None if b1 == b0 else c0 + (budget - b0) * (c1 - c0) / (b1 - b0)

    count = round_down(start)
    while len(probes) < max_probes:
        probes[count] = bytes_at(count)
        fits = probes[count] <= budget
        outcomes.append(fits)
        if fits:
            fitting = max(fitting, count)
        else:
            failing = count if failing is None else min(failing, count)
        if failing == multiple:
            return 0, probes
        if failing is not None and failing - fitting <= max(tolerance * fitting, multiple):
            break
        if fitting and failing is not None:
            estimate = line_estimate(fitting, failing) or (fitting + failing) / 2
        else:
            others = [c for c in probes if c != count]
            estimate = line_estimate(others[-1], count) if others else None
            if estimate is None or (estimate <= count if fits else estimate >= count):
                estimate = 2 * count if fits else count / 2  # no usable line yet
        # Aim just past the estimate, on the side the last probe did not reach, so that with a
        # linear memory the next probe closes the bracket.
        aimed = estimate * (1 + tolerance / 2 if fits else 1 - tolerance / 2)
        if fitting and failing is not None:
            aimed = aimed if fitting < aimed < failing else estimate
            estimate = min(max(aimed, fitting + multiple), failing - multiple)
            if len(outcomes) >= 2 and outcomes[-1] == outcomes[-2] and count > start:
                estimate = (fitting + failing) / 2  # the line keeps missing: bisect
        else:
            estimate = aimed
        count = round_down(estimate)
        if count in probes:  # rounding landed on a probe: halve the bracket instead
            count = round_down((fitting + (failing or 2 * fitting)) / 2)
            if count in probes:
                break
    return fitting, probes


def line_estimate(probes: dict[int, int], budget: int) -> int | None:
    """Where the line through the two largest probed counts meets ``budget``: the capacity
    predicted when memory grows linearly with the count (the class centres, their momentum and
    gradient and the [C/D, B] logits all do), for a search cut short by ``--max-probes``."""
    if len(probes) < 2:
        return None
    c0, c1 = sorted(probes)[-2:]
    if probes[c1] == probes[c0]:
        return None
    return int(c0 + (budget - probes[c0]) * (c1 - c0) / (probes[c1] - probes[c0]))


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(
        prog="python -m magjax.bench capacity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compile_bench.add_common_options(parser)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="relative precision of the capacity (default 1%%)",
    )
    parser.add_argument(
        "--max-probes", type=cli.positive_int, default=8, help="compiles per sample rate"
    )
    parser.add_argument(
        "--classes",
        type=cli.positive_int,
        default=None,
        help="the first count probed (default: the recipe's dataset's); with "
        "--of batch, the class count",
    )
    parser.add_argument(
        "--of",
        choices=("classes", "batch"),
        default="classes",
        help="what to search: identities (default) or the per-chip batch",
    )
    args, overrides = compile_bench.parse_args(parser, argv)
    return cli.run(lambda: _capacity(args, overrides), verbose=args.verbose)


def _capacity(args: argparse.Namespace, overrides: list[str]) -> None:
    config = compile_bench.counted(compile_bench.load_config(args.config, overrides))
    if args.classes:
        config.data.num_classes = args.classes
    hbm, _ = compile_bench.chip_facts(args.topology)
    budget = compile_bench.memory_budget(args.topology)
    chips = len(compile_bench.topology_devices(args.topology))
    result = {
        "topology": args.topology,
        "chips": chips,
        "config": args.config,
        "overrides": overrides,
        "hbm_bytes_per_chip": hbm,
        "usable_bytes_per_chip": budget,
    }
    if args.of == "batch":
        result["largest_batch"] = _largest_batch(args, config, budget)
        print(json.dumps(result))
        return
    result["capacity"] = {}
    rates = sorted({config.head.sample_rate, 1.0})
    for rate in rates:
        config.head.sample_rate = rate
        runs: dict[int, dict] = {}

        def bytes_at(classes: int, config=config, runs=runs, rate=rate) -> int:
            runs[classes] = compile_bench.run(args.topology, config, args.per_chip_batch, classes)
            r = runs[classes]
            print(
                f"r = {rate}: {classes:,} classes -> {r['bytes_per_chip'] / 2**30:.2f} GiB "
                f"per chip ({'fits' if r['fits'] else 'does not fit'}, compiled in "
                f"{r['compile_s']:.0f} s)",
                flush=True,
            )
            return r["bytes_per_chip"]

        # Counts are multiples of the chips x 8 rows (a TPU tile) so that no probe pays padding.
        capacity, probes = largest_fitting(
            bytes_at,
            budget,
            config.data.num_classes,
            multiple=8 * chips,
            tolerance=args.tolerance,
            max_probes=args.max_probes,
        )
        bound = min((c for c, b in probes.items() if b > budget), default=None)
        predicted = line_estimate(probes, budget)
        result["capacity"][str(rate)] = {
            "classes": capacity,
            "first_failing": bound,
            "line_estimate": predicted,
            "bytes_per_chip": probes.get(capacity),
            "probes": {str(c): b for c, b in sorted(probes.items())},
            "per_chip_batch": next(iter(runs.values()))["per_chip_batch"],
        }
        print(
            f"r = {rate}: {capacity:,} identities fit on {args.topology} ({chips} chips)"
            + (f"; {bound:,} do not" if bound else "")
            + (
                f"; the line through the two largest probes meets the memory at {predicted:,}"
                if predicted
                else ""
            )
        )
        if capacity:  # the next sample rate starts where this one ended
            config.data.num_classes = capacity
    print(json.dumps(result))


# Per-chip batches are searched in steps of 8 images: finer than any recipe's batch choice, and
# what a TPU tile or a GPU's tensor-core fragment takes without padding.
BATCH_MULTIPLE = 8


def _largest_batch(args: argparse.Namespace, config, budget: int) -> dict:
    """The largest per-chip batch whose step fits ``budget``, at ``config``'s class count and
    sample rate, starting from ``--per-chip-batch`` (default the official per-GPU batch)."""
    from magjax import recipes

    start = args.per_chip_batch or recipes.official_per_device_batch(config)

    def bytes_at(batch: int) -> int:
        r = compile_bench.run(args.topology, config, batch, config.data.num_classes)
        print(
            f"{batch} images per chip -> {r['bytes_per_chip'] / 2**30:.2f} GiB per chip "
            f"({'fits' if r['fits'] else 'does not fit'}, compiled in {r['compile_s']:.0f} s)",
            flush=True,
        )
        return r["bytes_per_chip"]

    largest, probes = largest_fitting(
        bytes_at,
        budget,
        start,
        multiple=BATCH_MULTIPLE,
        tolerance=args.tolerance,
        max_probes=args.max_probes,
    )
    bound = min((b for b, used in probes.items() if used > budget), default=None)
    predicted = line_estimate(probes, budget)
    print(
        f"{largest} images per chip fit on {args.topology} at {config.data.num_classes:,} "
        f"classes, sample rate {config.head.sample_rate}" + (f"; {bound} do not" if bound else "")
    )
    return {
        "per_chip_batch": largest,
        "first_failing": bound,
        "line_estimate": predicted,
        "bytes_per_chip": probes.get(largest),
        "classes": config.data.num_classes,
        "sample_rate": config.head.sample_rate,
        "probes": {str(b): used for b, used in sorted(probes.items())},
    }
