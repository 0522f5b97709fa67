"""CPU settings that magjax's command-line entry points apply before JAX starts.

All were measured on a 2-core x86 host (BENCHMARKS.md, "CPU settings"); none changes what
is computed beyond float32 summation order. On a TPU or GPU host the flag only concerns XLA's
CPU client (host-side work) and the allocator settings only the host process's memory.

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
* Transparent huge pages for glibc's blocks. XLA also allocates from its worker threads (each
  device's, with several CPU devices), whose glibc arenas map any block over 64 MiB afresh and
  unmap it when freed whatever ``M_MMAP_MAX`` says: 680,000 page faults of 4 KiB per iresnet18
  train step at batch 32. ``glibc.malloc.hugetlb=1`` has glibc ask for 2 MiB pages there (and
  on its heap): 20,000 faults. One arena for all threads (``M_ARENA_MAX`` 1) removed the faults
  too, but its lock made a threaded process (the CPU demo: compilation, the input pipeline)
  slower (BENCHMARKS.md, "Huge pages for XLA's buffers"). glibc reads that setting only from
  ``GLIBC_TUNABLES`` when a process starts, so the command-line entry points start themselves
  again with it (:func:`restart_with_malloc_tunables`), together with the two settings above;
  code that imports magjax gets ``mallopt``'s two only.

Written by hand: no library sets these; ``ctypes`` calls glibc's documented ``mallopt``, and
the restart sets its documented tunables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FUSIONS = "reduce"

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# The same two as tunables (trim threshold: 1 TiB, never reached), and huge pages.
MALLOC_TUNABLES = (
    "glibc.malloc.hugetlb=1",
    "glibc.malloc.mmap_max=0",
    f"glibc.malloc.trim_threshold={1 << 40}",
)


def xla_flags(current: str) -> str:
    """``current`` (an ``XLA_FLAGS`` value) with magjax's YNNPACK choice added, unless the
    YNNPACK fusion flag is already there."""
    if YNN_FUSION_FLAG in current:
        return current
    return f"{current} {YNN_FUSION_FLAG}={YNN_FUSIONS}".strip()


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    return libc


def restart_with_malloc_tunables(module: str) -> None:
    """Starts this process's command line (``sys.orig_argv``) again with
    :data:`MALLOC_TUNABLES` added to ``GLIBC_TUNABLES``, and does not return, when the process
    was started as ``python -m MODULE``; returns at once otherwise (the entry point run inside
    another command: a test, ``runpy``), when ``GLIBC_TUNABLES`` already holds malloc settings
    (the user's own, or after the restart), or when the C library is not glibc. For the
    command-line entry points, first thing."""
    current = os.environ.get("GLIBC_TUNABLES", "")
    argv = sys.orig_argv
    started_as_module = any(
        arg == "-m" and argv[i + 1 : i + 2] == [module] for i, arg in enumerate(argv)
    )
    if "glibc.malloc" in current or not started_as_module or _glibc() is None:
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(part for part in (current, *MALLOC_TUNABLES) if part)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def keep_freed_memory() -> bool:
    """Makes glibc serve large blocks from the heap and keep freed memory for reuse.

    Returns whether the setting was applied (False off glibc or when ``GLIBC_TUNABLES`` holds
    malloc settings: the user's own, or :data:`MALLOC_TUNABLES` after a restart).
    """
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = _glibc()
    if libc is None:
        return False
    # mallopt(3): M_MMAP_MAX 0 serves every block from the heap, M_TRIM_THRESHOLD -1 never
    # returns freed heap memory to the system. It returns 1 on success.
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1))


def configure() -> None:
    """Applies the XLA flag and ``mallopt``'s two settings (after the restart the tunables hold
    them); call before JAX's backend starts (XLA reads ``XLA_FLAGS`` then)."""
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))
    keep_freed_memory()
