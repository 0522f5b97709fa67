"""NVIDIA GPUs as XLA's GPU compiler needs to know them, to compile for them on a host without one.

``python -m magjax.bench compile --topology h100:8`` describes eight such GPUs to the CUDA PJRT
plugin (``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=TEXT)``)
and compiles the train step for them ahead of time. ``TEXT`` is a
``stream_executor.GpuTargetConfigProto`` in text form (openxla/xla
``xla/stream_executor/device_description.proto``); :func:`target_config` writes it from the
figures below, each from NVIDIA's published specifications:

* datasheets: NVIDIA A100 Tensor Core GPU (SXM4 40GB and 80GB), H100 Tensor Core GPU (SXM5),
  H200 Tensor Core GPU (SXM), Tesla V100 (SXM2 32GB): memory bandwidth, peak dense Tensor Core
  rate (the datasheets' bf16 figures are "with sparsity", twice the dense rate given here; V100
  has no bf16: its fp16 Tensor Core rate, 125 TFLOP/s, stands in), boost clock;
* architecture whitepapers (NVIDIA A100 Tensor Core GPU Architecture, NVIDIA H100 Tensor Core
  GPU Architecture, NVIDIA Tesla V100 GPU Architecture) and the CUDA C++ Programming Guide's
  table of compute-capability limits: SMs, FP32 units per SM, L2, shared memory per SM and per
  block, registers, threads;
* memory: the total ``nvidia-smi`` reports for each card (40,960 MiB, 81,920 MiB, 81,559 MiB,
  143,771 MiB, 32,510 MiB), what the vendor's "40GB", "80GB", "141GB" and "32GB" amount to on
  the device; arcface_torch's benchmark logs show the V100's (``docs/speed_benchmark.md``).

XLA uses these to choose kernels and tilings (compute capability above all), and the memory size
for its scheduler's memory limit. ``jax`` itself lets a process use only a fraction of a GPU's
memory: 75% unless ``XLA_PYTHON_CLIENT_MEM_FRACTION`` says otherwise (JAX's "GPU memory
allocation" documentation), which :func:`usable_memory` applies.
"""

from __future__ import annotations

import dataclasses
import os

from magjax.errors import UserError

MIB = 2**20
# jax's GPU client preallocates, and can use, this fraction of each GPU's memory by default.
DEFAULT_MEMORY_FRACTION = 0.75
MEMORY_FRACTION_VARIABLE = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# cuDNN and CUDA as jax-cuda12-plugin 0.10.2 requires them (nvidia-cudnn-cu12>=9.8, CUDA 12.9
# wheels): the versions a GPU machine running this jax would have.
DNN_VERSION = (9, 8, 0)
CUDA_RUNTIME_VERSION = (12, 9, 0)


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU's figures (sources: the module docstring)."""

    name: str  # as CUDA names the device: jax's device_kind
    compute_capability: tuple[int, int]
    sms: int
    fp32_units_per_sm: int
    memory_mib: int  # nvidia-smi's total
    memory_bandwidth: float  # bytes/s
    l2_bytes: int
    shared_memory_per_sm: int  # bytes, the most an SM can configure as shared memory
    shared_memory_per_block_optin: int  # bytes, the most one block may opt in to
    boost_clock_ghz: float
    peak_dense_flops: float  # FLOP/s, Tensor Cores, dense
    peak_dtype: str  # the dtype of that rate

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB


# memory_bandwidth, the datasheets' "GPU memory bandwidth" (bench compile's time floor for the
# bytes a step moves): A100 SXM 40GB 1,555 GB/s and 80GB 2,039 GB/s (NVIDIA A100 datasheet,
# nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), H100 SXM 3.35 TB/s, H200 SXM 4.8 TB/s
# (H100 and H200 Tensor Core GPU datasheets), V100 SXM2 900 GB/s (Tesla V100 datasheet).
GPUS = {
    "a100-40gb": Gpu(
        "NVIDIA A100-SXM4-40GB",
        (8, 0),
        108,
        64,
        40_960,
        1_555e9,
        40 * MIB,
        164 * 1024,
        163 * 1024,
        1.41,
        312e12,
        "bfloat16",
    ),
    "a100-80gb": Gpu(
        "NVIDIA A100-SXM4-80GB",
        (8, 0),
        108,
        64,
        81_920,
        2_039e9,
        40 * MIB,
        164 * 1024,
        163 * 1024,
        1.41,
        312e12,
        "bfloat16",
    ),
    "h100": Gpu(
        "NVIDIA H100 80GB HBM3",
        (9, 0),
        132,
        128,
        81_559,
        3_350e9,
        50 * MIB,
        228 * 1024,
        227 * 1024,
        1.98,
        989.5e12,
        "bfloat16",
    ),
    "h200": Gpu(
        "NVIDIA H200",
        (9, 0),
        132,
        128,
        143_771,
        4_800e9,
        50 * MIB,
        228 * 1024,
        227 * 1024,
        1.98,
        989.5e12,
        "bfloat16",
    ),
    "v100-32gb": Gpu(
        "Tesla V100-SXM2-32GB",
        (7, 0),
        80,
        64,
        32_510,
        900e9,
        6 * MIB,
        96 * 1024,
        96 * 1024,
        1.53,
        125e12,
        "float16",
    ),
}
# A server's usual GPU count, for a name given without one (``h100`` is ``h100:8``).
DEFAULT_GPUS_PER_SERVER = 8


def parse_topology(topology: str) -> tuple[str, int] | None:
    """``(GPU name, count)`` of a GPU topology such as ``h100:8`` or ``a100-40gb`` (8 GPUs), or
    None when ``topology`` names no known GPU (a TPU topology, or a misspelling)."""
    name, _, count = topology.lower().partition(":")
    if name not in GPUS:
        return None
    if not count:
        return name, DEFAULT_GPUS_PER_SERVER
    if not count.isdigit() or int(count) < 1:
        raise UserError(
            f"GPU count {count!r} in {topology!r} is not a positive integer (e.g. {name}:8)"
        )
    return name, int(count)


def pjrt_topology(count: int) -> str:
    """The plugin's ``SLICESxHOSTSxGPUS`` topology for ``count`` GPUs: one host up to 8, else
    servers of 8."""
    if count <= DEFAULT_GPUS_PER_SERVER:
        return f"1x1x{count}"
    if count % DEFAULT_GPUS_PER_SERVER:
        raise UserError(
            f"{count} GPUs: more than one server's must be a multiple of {DEFAULT_GPUS_PER_SERVER}"
        )
    return f"1x{count // DEFAULT_GPUS_PER_SERVER}x{DEFAULT_GPUS_PER_SERVER}"


def target_config(gpu: Gpu) -> str:
    """``gpu`` as a ``GpuTargetConfigProto`` in protobuf text form."""
    major, minor = gpu.compute_capability
    dnn, runtime = DNN_VERSION, CUDA_RUNTIME_VERSION
    fields = {
        # Limits common to every CUDA GPU since Volta (CUDA C++ Programming Guide).
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024,
        "threads_per_core_limit": 2048,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "shared_memory_per_core": gpu.shared_memory_per_sm,
        "shared_memory_per_block_optin": gpu.shared_memory_per_block_optin,
        "core_count": gpu.sms,
        "fpus_per_core": gpu.fp32_units_per_sm,
        "memory_bandwidth": int(gpu.memory_bandwidth),
        "l2_cache_size": gpu.l2_bytes,
        "clock_rate_ghz": gpu.boost_clock_ghz,
        "device_memory_size": gpu.memory_bytes,
    }
    info = "\n".join(f"  {key}: {value}" for key, value in fields.items())
    return (
        f"gpu_device_info {{\n{info}\n"
        f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
        'platform_name: "CUDA"\n'
        f"dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} patch: {dnn[2]} }}\n"
        f"runtime_version {{ major: {runtime[0]} minor: {runtime[1]} "
        f"patch: {runtime[2]} }}\n"
        f'device_description_str: "{gpu.name}"\n'
    )


def memory_fraction() -> float:
    """The fraction of each GPU's memory jax lets a process use: ``XLA_PYTHON_CLIENT_MEM_FRACTION``
    when set (as the user would set it for training), else jax's default 0.75."""
    value = os.environ.get(MEMORY_FRACTION_VARIABLE)
    if value is None:
        return DEFAULT_MEMORY_FRACTION
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise UserError(f"{MEMORY_FRACTION_VARIABLE}={value!r} is not a fraction in (0, 1]")
    return fraction


def usable_memory(gpu: Gpu) -> int:
    """Bytes of ``gpu`` a jax process can allocate (:func:`memory_fraction` of its memory)."""
    return int(gpu.memory_bytes * memory_fraction())
