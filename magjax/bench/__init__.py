"""Benchmarks that print figures: ``python -m magjax.bench {head,backbone,input,export,train,
compile,capacity} ...``.

Each sub-command is a module of this package with a ``main(argv)``; its last printed line is JSON.
"""

import statistics
import time
from collections.abc import Callable


def median_seconds(call: Callable[[], object], steps: int, warmup: int = 1) -> float:
    """The median wall time of ``steps`` calls of ``call`` after ``warmup`` untimed ones
    (compilation, allocation); ``call`` must block until its work is done."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
