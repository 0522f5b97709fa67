"""magjax: margin-loss face recognition in JAX/Flax, data-parallel with a class-sharded head."""

import os as _os

# jax's CUDA plugin (requirements-gpu.txt: compiling for GPUs on any host) checks the CUDA
# libraries when jax starts its backends and, where they are missing, logs a traceback ("Unable
# to load cuDNN") before running on the CPU. Where no NVIDIA GPU is visible (jax's own test: the
# driver's device files) there is nothing to run on and nothing to check, so every magjax command
# skips the check as jax allows; on a GPU host it stays.
if not any(_os.path.exists(device) for device in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")):
    _os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def __getattr__(name):
    # FaceEncoder is imported on first use so that `import magjax` stays light.
    if name == "FaceEncoder":
        from magjax.encoder import FaceEncoder

        return FaceEncoder
    raise AttributeError(f"module 'magjax' has no attribute {name!r}")
