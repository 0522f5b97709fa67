"""CPU settings that magjax's command-line entry points apply before JAX starts.

Both were measured on a 2-core x86 host (BENCHMARKS.md, "CPU settings"); neither changes what
is computed beyond float32 summation order. On a TPU or GPU host the flag only concerns XLA's
CPU client (host-side work) and the allocator setting only the host process's memory.

* Which work XLA:CPU gives to YNNPACK. jaxlib 0.10 hands it dots, convolutions, element-wise
  ops and reductions by default; its convolutions run a backbone's weight gradients 2-7x slower
  than XLA's own (Eigen) ones, so an iresnet18 training step took 11.2 s instead of 6.5 s.
  ``--xla_cpu_experimental_ynn_fusion_type=reduce`` keeps YNNPACK for reductions only: with
  those off as well, row norms run ~6x slower and XLA's own float32 sums (BatchNorm's
  statistics and bias gradients over batch x height x width) are less accurate, which is what
  made a one-device training run end 4e-5 to 1e-4 away from the same run on 8 devices. A
  ``--xla_cpu_experimental_ynn_fusion_type`` already in ``XLA_FLAGS`` is left as it is.
* glibc's allocator. XLA allocates every step's buffers afresh, and glibc maps blocks over
  32 MiB with ``mmap`` and unmaps them when freed, so each step page-faults its whole working
  set in again (110,000 faults per Partial FC head step). ``mallopt`` before the first large
  allocation keeps freed memory in the heap instead: the process keeps its peak footprint, and
  the faults go. Skipped off glibc, and when ``GLIBC_TUNABLES`` already sets malloc options.

Written by hand: no library sets these; ``ctypes`` calls glibc's documented ``mallopt``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FUSIONS = "reduce"

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def xla_flags(current: str) -> str:
    """``current`` (an ``XLA_FLAGS`` value) with magjax's YNNPACK choice added, unless the
    YNNPACK fusion flag is already there."""
    if YNN_FUSION_FLAG in current:
        return current
    return f"{current} {YNN_FUSION_FLAG}={YNN_FUSIONS}".strip()


def keep_freed_memory() -> bool:
    """Makes glibc serve large blocks from the heap and keep freed memory for reuse.

    Returns whether the setting was applied (False off glibc or when ``GLIBC_TUNABLES`` holds
    the user's own malloc settings).
    """
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    # mallopt(3): M_MMAP_MAX 0 serves every block from the heap, M_TRIM_THRESHOLD -1 never
    # returns freed heap memory to the system. It returns 1 on success.
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1))


def configure() -> None:
    """Applies both settings; call before JAX's backend starts (XLA reads ``XLA_FLAGS`` then)."""
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))
    keep_freed_memory()
