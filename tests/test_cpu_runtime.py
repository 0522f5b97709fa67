"""magjax's CPU settings (magjax.cpu_runtime): what they add to XLA_FLAGS, that XLA then keeps
convolutions out of YNNPACK (and reductions in it), and that glibc then stops page-faulting
large blocks in again, from any thread. Each effect is checked in a fresh process with and
without the settings, so that each check is seen to fail without them."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from magjax import cpu_runtime

# Compiles a convolution's weight gradient and a row norm; prints which of the two XLA placed
# inside YNNPACK fusions.
_PLACEMENT = r"""
import json, re, sys
from magjax import cpu_runtime
if sys.argv[1] == "on":
    cpu_runtime.configure()
import jax, jax.numpy as jnp
from jax import lax

def ynn_ops(fn, *args):
    text = jax.jit(fn).lower(*args).compile().as_text()
    computations = re.finditer(r"\n(%[\w.-]+) \(.*?\{\n(.*?)\n\}", text, re.S)
    bodies = {m.group(1): m.group(2) for m in computations}
    called = re.findall(r"= \S+ fusion\(.*?calls=(%[\w.-]+).*?__ynn_fusion", text)
    return " ".join(bodies[c] for c in called)

x, w = jnp.ones((8, 28, 28, 32)), jnp.ones((3, 3, 32, 32))  # YNNPACK takes convs this size
conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
weight_gradient = jax.grad(lambda w, x: jnp.sum(conv(x, w) ** 2))
row_norms = lambda m: jnp.sqrt(jnp.sum(m * m, axis=1))
print(json.dumps({"convolution": "convolution(" in ynn_ops(weight_gradient, w, x),
                  "reduce": "reduce(" in ynn_ops(row_norms, jnp.ones((4096, 512)))}))
"""

# Allocates and frees a 64 MiB array five times; prints the minor page faults of each round.
_FAULTS = r"""
import json, resource, sys
import numpy as np
from magjax import cpu_runtime
applied = sys.argv[1] == "on" and cpu_runtime.keep_freed_memory()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(16 << 20, np.float32)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": bool(applied), "faults": faults}))
"""


# Allocates, fills and frees 96 MiB with glibc's malloc five times from a thread other than the
# main one (as XLA's worker threads allocate); prints the minor page faults of each round.
# "on": first starts again with magjax's malloc tunables, as the entry points do (run as
# ``python -m thread_faults``, the restart's condition).
_THREAD_FAULTS = r"""
import ctypes, ctypes.util, json, os, resource, sys, threading
from magjax import cpu_runtime
if sys.argv[1] == "on":
    cpu_runtime.restart_with_malloc_tunables("thread_faults")
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 96 << 20

def rounds(out):
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

faults = []
worker = threading.Thread(target=rounds, args=(faults,))
worker.start()
worker.join()
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "faults": faults}))
"""


def _without_settings(**extra):
    """This process's environment without magjax's settings (which the tests' conftest set),
    plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    return env | extra


def _run(script, setting):
    env = _without_settings()
    out = subprocess.run(
        [sys.executable, "-c", script, setting], env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_xla_flags_adds_the_ynnpack_choice_once_and_keeps_the_users():
    flag = "--xla_cpu_experimental_ynn_fusion_type=reduce"
    assert cpu_runtime.xla_flags("") == flag
    assert cpu_runtime.xla_flags("--xla_force_host_platform_device_count=8") == (
        "--xla_force_host_platform_device_count=8 " + flag
    )
    assert cpu_runtime.xla_flags(flag) == flag
    users = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
    assert cpu_runtime.xla_flags(users) == users


def test_convolutions_leave_ynnpack_and_reductions_stay():
    assert _run(_PLACEMENT, "off") == {"convolution": True, "reduce": True}
    assert _run(_PLACEMENT, "on") == {"convolution": False, "reduce": True}


def test_freed_large_blocks_are_reused_without_page_faults():
    off, on = _run(_FAULTS, "off"), _run(_FAULTS, "on")
    assert not off["applied"] and on["applied"]
    # A 64 MiB block is 16,384 pages of 4 KiB (fewer with transparent huge pages): glibc maps
    # it afresh each time, unless it keeps freed memory.
    assert min(off["faults"][1:]) > 100
    assert max(on["faults"][1:]) < 0.05 * off["faults"][0]


def _transparent_huge_pages() -> str:
    try:
        modes = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return modes.split("[")[1].split("]")[0]


def _glibc_version() -> tuple[int, ...]:
    try:  # "glibc 2.36"
        return tuple(int(part) for part in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split("."))
    except (ValueError, OSError, IndexError, AttributeError):
        return ()


@pytest.mark.skipif(
    _transparent_huge_pages() != "madvise",
    reason="huge pages on request only where the kernel's mode is 'madvise' "
    "(with 'always' every large block has them, with 'never' none)",
)
@pytest.mark.skipif(_glibc_version() < (2, 35), reason="glibc.malloc.hugetlb needs glibc 2.35")
def test_a_threads_large_blocks_come_in_huge_pages_after_the_restart(tmp_path):
    (tmp_path / "thread_faults.py").write_text(_THREAD_FAULTS)
    env = _without_settings(PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))

    def run(setting):
        out = subprocess.run(
            [sys.executable, "-m", "thread_faults", setting],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    off, on = run("off"), run("on")
    assert off["tunables"] == ""
    assert on["tunables"].split(":") == list(cpu_runtime.MALLOC_TUNABLES)
    # A thread's arena maps a block over 64 MiB afresh each time, whatever M_MMAP_MAX says:
    # 24,576 pages of 4 KiB, or 48 of 2 MiB with glibc.malloc.hugetlb.
    assert min(off["faults"][1:]) > 20_000
    assert max(on["faults"][1:]) < 1_000


def test_the_entry_points_restart_with_the_malloc_tunables():
    env = _without_settings()
    argv = [
        sys.executable,
        "-m",
        "magjax.bench",
        "head",
        "--abstract",
        "--batch",
        "8",
        "--classes",
        "64",
        "--dim",
        "8",
    ]
    users = "glibc.malloc.arena_max=2"
    cases = [
        ([], {}, ":".join(cpu_runtime.MALLOC_TUNABLES)),
        (["--cpu-defaults"], {}, ""),
        ([], {"GLIBC_TUNABLES": users}, users),
    ]  # the user's own: kept, no restart
    for extra, users_env, expected in cases:
        out = subprocess.run(
            argv + extra, env=env | users_env, check=True, capture_output=True, text=True
        ).stdout
        assert json.loads(out.strip().splitlines()[-1])["glibc_tunables"] == expected


def test_no_restart_outside_its_own_command_or_over_the_users_tunables():
    # In a process started otherwise (here `python -c`; a test calling an entry point, runpy)
    # the restart would start that other command again: it must return and change nothing.
    script = (
        "import os; from magjax import cpu_runtime; "
        "cpu_runtime.restart_with_malloc_tunables('magjax.bench'); "
        "print(repr(os.environ.get('GLIBC_TUNABLES')))"
    )
    for users in (None, "glibc.malloc.arena_max=2"):
        env = _without_settings(**({"GLIBC_TUNABLES": users} if users else {}))
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True
        ).stdout
        assert out.strip() == repr(users)


def test_the_users_glibc_tunables_are_left_alone(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert cpu_runtime.keep_freed_memory() is False
