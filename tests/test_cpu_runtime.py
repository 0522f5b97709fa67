"""magjax's CPU settings (magjax.cpu_runtime): what they add to XLA_FLAGS, that XLA then keeps
convolutions out of YNNPACK (and reductions in it), and that glibc then stops page-faulting
large blocks in again. Each effect is checked in a fresh process with and without the
settings, so that each check is seen to fail without them."""

import json
import os
import subprocess
import sys

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


def _run(script, setting):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", script, setting], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_xla_flags_adds_the_ynnpack_choice_once_and_keeps_the_users():
    flag = "--xla_cpu_experimental_ynn_fusion_type=reduce"
    assert cpu_runtime.xla_flags("") == flag
    assert cpu_runtime.xla_flags("--xla_force_host_platform_device_count=8") == (
        "--xla_force_host_platform_device_count=8 " + flag)
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


def test_the_users_glibc_tunables_are_left_alone(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert cpu_runtime.keep_freed_memory() is False
