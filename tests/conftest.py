"""Test set-up: 8 fake CPU devices and magjax's CPU settings, which XLA reads once, before jax is
first imported."""

import os

from magjax import cpu_runtime  # imports no jax

# libtpu (requirements-tpu.txt, for the ahead-of-time TPU compiles) would otherwise be tried as
# a backend, and hold its lock file, in every test process; its topology API needs no backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# The CPU settings of magjax's entry points (YNNPACK for reductions only, glibc keeping freed
# memory), so that the tests run what users run.
cpu_runtime.configure()

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def x64():
    """Enables float64 for one test and restores the previous setting afterwards."""
    import jax

    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
