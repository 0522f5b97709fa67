"""``python -m magjax.bench compile``: a recipe's train step compiled for TPUs or NVIDIA GPUs.

    python -m magjax.bench compile --topology v5p:4x4x4 --config configs/arcface.py:r100
    python -m magjax.bench compile --topology v5e:2x4 --config configs/magface.py:r100 --json
    python -m magjax.bench compile --topology v6e:16x16 \\
        --config configs/arcface.py:r100,webface42m,pfc0.2 --per-chip-batch 128
    python -m magjax.bench compile --topology h100:8 --config configs/arcface.py:r50 --json
    python -m magjax.bench compile --topology a100-40gb:8 --config configs/adaface.py:r100 \\
        --config.model.dtype=float32                      # any --config. override, as for main

Compiles, ahead of time and on any host, the train step that ``python -m magjax.main`` runs for the
recipe: the same ``train_step.build_components`` / ``train_step.jit_train_step``, with the state
and the batch given as shapes and shardings over the topology's abstract devices. ``--topology`` is
a Cloud TPU topology (v4, v5e, v5p, v6e: ``pip install -r requirements-tpu.txt`` brings the
compiler) or NVIDIA GPUs, ``NAME:COUNT`` with NAME one of a100-40gb, a100-80gb, h100, h200,
v100-32gb and COUNT 8 when left out (``pip install -r requirements-gpu.txt`` brings jax's CUDA
plugin and ptxas; no GPU, driver or CUDA install is needed, and the command sets the plugin's
environment itself). No dataset is needed: the class and image counts come from the recipe (the
demo's from its synthetic options; ``--classes`` overrides the first), and ``--config.FIELD=VALUE``
overrides any config field as ``magjax.main`` does.

Prints per chip XLA's memory analysis (arguments, outputs, aliases, temporaries) against the
chip's memory and whether it fits, the FLOPs and the bytes accessed of one step (XLA's cost
analysis of the compiled program), the time the FLOPs take at the chip's peak bf16 rate and the
time the bytes take at its HBM bandwidth, the larger of the two as the step's floor (hence a
ceiling in images per second per chip: a roofline bound, communication and overlap ignored),
and the compile time. The last line is JSON. The cost model's own time estimate is not
reported: on a CPU host it comes back negative (jax-stack.md).

The bytes are XLA's cost model of the traffic, not a measurement: for a TPU it counts a chain of
element-wise operations at exactly its operands and result, but a bf16 matrix product at 2-3
times them (BENCHMARKS.md), so a memory-bound floor may be pessimistic by up to that much.
XLA's cost analysis counts a loop's body once, whatever its trip count: a step with a
``while`` loop (``head.block_size``'s blocked head) is undercounted in FLOPs and bytes alike, so
its floor is too low and its ceiling too high. A conditional counts its costliest branch
(``optax.MultiSteps``' update, under gradient accumulation, is counted in every micro-step).

On GPUs, ``fits`` holds the step against the memory jax lets a process use: 75% of the GPU's
unless ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (read from the environment, as training would) says
otherwise. XLA's GPU compiler reports no cost analysis: ``--flops`` counts the FLOPs and the
bytes accessed by compiling the same step once more for this host's CPU over as many devices
(the same per-device program, as long again; the bytes are XLA:CPU's fusion of it, an estimate
of the GPU's), otherwise they, and the ceiling, are null.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import resource
import sys
import time

from magjax import cli, logs
from magjax.bench import gpu_targets
from magjax.errors import UserError

# Per chip, from the Cloud TPU system-architecture pages: HBM in GiB and peak bf16 TFLOP/s.
TPU_CHIPS = {
    "v4": (32, 275.0),
    "v5e": (16, 197.0),
    "v5p": (95, 459.0),
    "v6e": (32, 918.0),
}
# HBM bandwidth per chip in bytes/s, from the same pages (docs.cloud.google.com/tpu/docs/v4,
# /v5e, /v5p, /v6e, read 2026-12-07): v4 "HBM2 capacity and bandwidth 32 GiB, 1200 GBps" (not
# the 1228 GB/s some papers quote), v5e "16 GB, 819 GBps" (a newer revision of the page says
# "800 GiBps", 859 GB/s; 819 is kept, the figure the chip was announced with), v5p "95GB, 2765
# GBps", v6e "HBM bandwidth per chip 1638 GBps". The GPUs' are in gpu_targets.GPUS.
TPU_HBM_BANDWIDTH = {
    "v4": 1200e9,
    "v5e": 819e9,
    "v5p": 2765e9,
    "v6e": 1638e9,
}
GIB = 2**30


# libtpu's compiler recurses deeper than its worker threads' stacks allow for the 256-chip
# topologies and dies of SIGSEGV (seen on v6e:16x16 for iresnet50 and 100) unless the stack
# limit is unlimited (a finite one, even 512 MiB, still overflowed: the threads are then sized
# from it differently). The limit is read when the process starts, so the command lifts it and
# starts itself again (`ulimit -s unlimited` does the same by hand).
_RESTARTED = "MAGJAX_BENCH_DEEP_STACK"


def restart_with_deep_stack(argv: list[str]) -> None:
    """Re-executes ``python -m magjax.bench ARGV`` with the stack limit raised to the hard limit
    (unlimited where allowed), unless it is there already."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft == hard or os.environ.get(_RESTARTED):
        return
    resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))
    os.environ[_RESTARTED] = "1"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "magjax.bench", *argv])


def chip_facts(topology: str) -> tuple[int, float]:
    """(memory bytes, peak bf16 FLOP/s) of one chip of ``topology`` (``v5p:4x4x4``, ``h100:8``;
    V100: its fp16 rate, having no bf16)."""
    gpu = gpu_targets.parse_topology(topology)
    if gpu is not None:
        facts = gpu_targets.GPUS[gpu[0]]
        return facts.memory_bytes, facts.peak_dense_flops
    generation = topology.split(":")[0]
    if generation not in TPU_CHIPS:
        raise UserError(
            f"unknown TPU generation or GPU {generation!r} in {topology!r}; "
            f"TPUs: {', '.join(TPU_CHIPS)}; GPUs: {', '.join(gpu_targets.GPUS)}"
        )
    hbm_gib, tflops = TPU_CHIPS[generation]
    return hbm_gib * GIB, tflops * 1e12


def memory_bandwidth(topology: str) -> float:
    """Bytes/s one chip of ``topology`` reads and writes its memory (HBM) at, at most."""
    gpu = gpu_targets.parse_topology(topology)
    if gpu is not None:
        return gpu_targets.GPUS[gpu[0]].memory_bandwidth
    chip_facts(topology)  # an unknown generation: the one error, naming the known ones
    return TPU_HBM_BANDWIDTH[topology.split(":")[0]]


def roofline(
    flops: float | None,
    bytes_accessed: float | None,
    peak: float,
    bandwidth: float,
    per_chip_batch: int,
) -> dict:
    """The step's time floor per chip: the larger of its FLOPs at the ``peak`` rate and its bytes
    accessed at the memory ``bandwidth`` (a step cannot be faster than either), the bound that
    sets it, and the images per second per chip it allows. None where a count is missing: a
    floor from one of the two would overstate the ceiling."""
    compute_s = flops / peak if flops else None
    memory_s = bytes_accessed / bandwidth if bytes_accessed else None
    if compute_s is None or memory_s is None:
        return {
            "step_s_at_bandwidth": memory_s,
            "step_s_floor": None,
            "bound": None,
            "images_per_s_per_chip_ceiling": None,
        }
    floor = max(compute_s, memory_s)
    return {
        "step_s_at_bandwidth": memory_s,
        "step_s_floor": floor,
        "bound": "memory" if memory_s > compute_s else "compute",
        "images_per_s_per_chip_ceiling": per_chip_batch / floor,
    }


def prepare_gpu_environment() -> None:
    """What jax's CUDA plugin needs to describe GPUs on a host without CUDA: without
    ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK`` it refuses to load when the CUDA libraries it checks
    (cuDNN, cuBLAS, ...) are missing, and logs a traceback saying so. Must run before jax starts
    its backends; the check only concerns running on a GPU, which these compiles never do."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


def _missing_gpu_packages() -> list[str]:
    import importlib.util

    wanted = {
        "jax_plugins.xla_cuda12": "jax-cuda12-plugin",
        "jax_cuda12_plugin": "jax-cuda12-plugin",
        "nvidia.cuda_nvcc": "nvidia-cuda-nvcc-cu12 (ptxas)",
    }
    missing = []
    for module, package in wanted.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        if not found and package not in missing:
            missing.append(package)
    return missing


def gpu_devices(topology: str, name: str, count: int) -> list:
    """The abstract devices of ``count`` GPUs ``name`` (:mod:`magjax.bench.gpu_targets`)."""
    missing = _missing_gpu_packages()
    if missing:
        raise UserError(
            f"compiling for {topology!r} needs jax's CUDA plugin and ptxas "
            f"({', '.join(missing)} missing): pip install -r requirements-gpu.txt "
            '(or pip install "magjax[gpu]")'
        )
    prepare_gpu_environment()
    from jax.experimental import topologies

    config = gpu_targets.target_config(gpu_targets.GPUS[name])
    try:
        described = topologies.get_topology_desc(
            platform="cuda", target_config=config, topology=gpu_targets.pjrt_topology(count)
        )
    except NotImplementedError as error:
        # jax started its backends before the environment above was set, so the plugin
        # refused to load: only a fresh process (the command line) can describe GPUs then.
        raise UserError(
            f"cannot describe {topology!r}: jax's CUDA plugin did not load in this "
            "process (set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 before jax starts, as "
            "python -m magjax.bench compile does)"
        ) from error
    return list(described.devices)


def topology_devices(topology: str) -> list:
    """The abstract devices of a Cloud TPU topology or of NVIDIA GPUs (``h100:8``), for
    compiling on a host without them."""
    gpu = gpu_targets.parse_topology(topology)
    if gpu is not None:
        return gpu_devices(topology, *gpu)
    from jax.experimental import topologies

    # Describing a topology opens no chip, so it may run beside a process that holds libtpu's
    # one-process-per-host lock (a training run on a TPU VM, parallel tests on a CPU host).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as error:  # libtpu missing, or a name it does not know
        raise UserError(
            f"cannot describe TPU topology {topology!r} ({error}); install the "
            "TPU compiler with `pip install -r requirements-tpu.txt` and use a "
            "name such as v5e:2x4, v5p:4x4x4 or v6e:16x16"
        ) from error


# XLA's TPU compiler refuses a program larger than the chip's memory with, e.g.,
# "RESOURCE_EXHAUSTED: ... the total memory required for HLO temporaries (171.69G) exceeds
# available HBM (95.74G)": the first parenthesised size is what the program asked for (binary
# units, as XLA prints them); allocators say "... trying to allocate 123456 bytes".
_ASKED = re.compile(r"\((\d+(?:\.\d+)?)([KMGTP]?)i?B?\)")
_ASKED_BYTES = re.compile(r"allocate (\d+) bytes")


def exhausted_bytes(error: Exception) -> int | None:
    """The bytes a compile refused with RESOURCE_EXHAUSTED asked for (None: another error, or a
    message without a size)."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    match = _ASKED.search(text)
    if match is not None:
        return int(float(match[1]) * 1024 ** "_KMGTP".index(match[2] or "_"))
    match = _ASKED_BYTES.search(text)
    return int(match[1]) if match else None


def compile_train_step(
    config, devices: list, per_chip_batch: int, memory_bytes: int | None = None
) -> dict:
    """Compiles ``config``'s train step over ``devices`` at ``per_chip_batch`` images per chip
    and returns XLA's memory and FLOP figures per chip (FLOPs None where XLA's compiler for
    these devices counts none: GPUs). ``memory_bytes``: a chip's, for the head's class-block
    rule (``head.class_block_size``), which the step's ``head_block`` reports."""
    import jax

    from magjax import parallel, train_step

    chips = len(devices)
    config = config.copy_and_resolve_references()
    config.global_batch = per_chip_batch * chips
    mesh = parallel.make_mesh(devices=devices)
    steps_per_epoch = max(config.data.num_examples // config.global_batch, 1)
    total_steps = config.total_steps or max(int(config.epochs * steps_per_epoch), 1)
    components = train_step.build_components(
        config, mesh, config.data.num_classes, steps_per_epoch, total_steps, memory_bytes
    )
    state = train_step.abstract_state(components)
    shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    step = train_step.jit_train_step(components, jax.random.key(0), shardings)
    # The classes a shard's head visits at a time (None: dense), as training would pick them.
    head_block = components.head.block_for(config.global_batch)
    start = time.perf_counter()
    try:
        compiled = step.lower(state, train_step.abstract_batch(mesh, config.global_batch)).compile()
    except jax.errors.JaxRuntimeError as error:
        asked = exhausted_bytes(error)
        if asked is None:
            raise
        # Too large for the chip: what XLA asked for (a lower bound of the step's bytes, which
        # is how capacity's search counts it), not a traceback.
        return {
            "fits": False,
            "head_block": head_block,
            "temp_bytes_asked": asked,
            "bytes_per_chip": asked,
            "error": cli.one_line(str(error).splitlines()[0]),
            "flops_per_step": None,
            "bytes_accessed_per_step": None,
            "compile_s": round(time.perf_counter() - start, 1),
        }
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    figures = {
        "head_block": head_block,
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
    }
    figures["bytes_per_chip"] = (
        figures["argument_bytes"]
        + figures["output_bytes"]
        - figures["alias_bytes"]
        + figures["temp_bytes"]
    )
    # "bytes accessed": XLA's cost model of the step's memory traffic, the bytes the optimised
    # program's instructions read and write (libtpu 0.0.42 also returns its parts by operand,
    # "bytes accessed0{}", ..., and by output, "bytes accessedout{}"; "optimal_seconds" is
    # negative on this host).
    figures.update(
        flops_per_step=float(cost["flops"]) if cost else None,
        bytes_accessed_per_step=(
            float(cost["bytes accessed"]) if cost and "bytes accessed" in cost else None
        ),
        compile_s=round(compile_s, 1),
    )
    return figures


def host_cost(
    config, chips: int, per_chip_batch: int, memory_bytes: int
) -> tuple[float, float | None]:
    """FLOPs and bytes accessed per device of ``config``'s step compiled for this host's CPU over
    ``chips`` devices: the program each GPU runs, partitioned the same way (XLA's GPU compiler
    counts neither), its head blocked as on a GPU of ``memory_bytes``. The FLOPs are the GPU
    program's; the bytes are XLA:CPU's fusion of it, an estimate of the GPU's (XLA:GPU fuses
    more, so it moves fewer). The command line splits the CPU into that many devices before jax
    starts."""
    import jax

    from magjax import logs

    # libtpu, installed beside, probes for a TPU when the backends start and prints its
    # warnings from C++; nothing of it concerns a CPU compile.
    with logs.native_stderr_to(pathlib.Path(os.devnull)):
        cpus = jax.devices("cpu")
    if len(cpus) < chips:
        raise UserError(
            f"--flops needs {chips} CPU devices to compile the {chips}-device step "
            f"on this host, jax has {len(cpus)} (set before jax started)"
        )
    figures = compile_train_step(config, cpus[:chips], per_chip_batch, memory_bytes)
    return figures["flops_per_step"], figures["bytes_accessed_per_step"]


def counted(config):
    """``config`` with its class and image counts set: the recipe's dataset's published counts
    (:func:`magjax.recipes.with_dataset_counts`) or, for synthetic data (the demo), the counts
    its ``data.synthetic_options`` build; counts set in the config are kept."""
    from magjax import recipes

    if config.data.synthetic and (
        config.data.num_classes is None or config.data.num_examples is None
    ):
        from magjax.data import synthetic

        config = config.copy_and_resolve_references()
        try:
            options = synthetic.SyntheticConfig(**config.data.synthetic_options.to_dict())
        except TypeError as error:  # an option prepare does not know
            raise UserError(f"config.data.synthetic_options: {error}") from error
        if config.data.num_classes is None:
            config.data.num_classes = options.num_identities
        if config.data.num_examples is None:
            config.data.num_examples = options.num_identities * options.images_per_identity
    try:
        return recipes.with_dataset_counts(config)
    except UserError:
        raise
    except ValueError as error:  # a dataset without published counts
        raise UserError(
            f"{error} (with --config.data.num_classes=N --config.data.num_examples=M)"
        ) from error


def memory_budget(topology: str) -> int:
    """Bytes a chip of ``topology`` offers the step: a TPU chip's whole HBM; the share of a
    GPU's memory jax allocates (``XLA_PYTHON_CLIENT_MEM_FRACTION``, 75% by default)."""
    gpu = gpu_targets.parse_topology(topology)
    if gpu is None:
        return chip_facts(topology)[0]
    return gpu_targets.usable_memory(gpu_targets.GPUS[gpu[0]])


def run(
    topology: str,
    config,
    per_chip_batch: int | None = None,
    classes: int | None = None,
    flops: bool = False,
) -> dict:
    """Everything ``bench compile`` reports for one topology and recipe, as a dict."""
    from magjax import recipes

    devices = topology_devices(topology)
    hbm, peak = chip_facts(topology)
    gpu = gpu_targets.parse_topology(topology)
    per_chip_batch = per_chip_batch or recipes.official_per_device_batch(config)
    config = counted(config)
    if classes is not None:
        config.data.num_classes = classes
    usable = memory_budget(topology)
    figures = compile_train_step(config, devices, per_chip_batch, usable)
    if figures["flops_per_step"] is None and flops:
        figures["flops_per_step"], figures["bytes_accessed_per_step"] = host_cost(
            config, len(devices), per_chip_batch, usable
        )
    peak_s = figures["flops_per_step"] / peak if figures["flops_per_step"] else None
    bandwidth = memory_bandwidth(topology)
    result = {
        "topology": topology,
        "chips": len(devices),
        "device_kind": devices[0].device_kind,
        "arch": config.model.arch,
        "loss": config.loss.name,
        "dtype": config.model.dtype,
        "classes": config.data.num_classes,
        "sample_rate": config.head.sample_rate,
        "per_chip_batch": per_chip_batch,
        **figures,
        "hbm_bytes_per_chip": hbm,
        "usable_bytes_per_chip": usable,
        "fits": figures.get("fits", figures["bytes_per_chip"] <= usable),
        "peak_bf16_flops_per_s": peak,
        "step_s_at_peak": peak_s,
        # The FLOPs alone: kept for comparison; the ceiling is images_per_s_per_chip_ceiling.
        "images_per_s_per_chip_at_peak": per_chip_batch / peak_s if peak_s else None,
        "memory_bandwidth_bytes_per_s": bandwidth,
        **roofline(
            figures["flops_per_step"],
            figures.get("bytes_accessed_per_step"),
            peak,
            bandwidth,
            per_chip_batch,
        ),
    }
    if gpu:
        facts = gpu_targets.GPUS[gpu[0]]
        result.update(
            memory_fraction=gpu_targets.memory_fraction(),
            peak_dtype=facts.peak_dtype,
            flops_source="host CPU compile" if flops else None,
        )
    return result


def describe(result: dict) -> str:
    """The human-readable lines of one ``run`` result."""
    r = result
    gpu = "memory_fraction" in r
    if gpu:
        budget = (
            f"{r['usable_bytes_per_chip'] / GIB:.2f} GiB jax may use "
            f"({r['memory_fraction']:.0%} of {r['hbm_bytes_per_chip'] / GIB:.2f} GiB; "
            f"{gpu_targets.MEMORY_FRACTION_VARIABLE})"
        )
    else:
        budget = f"{r['hbm_bytes_per_chip'] / GIB:.0f} GiB HBM"
    if "temp_bytes_asked" in r:
        return (
            f"{r['loss']} {r['arch']} ({r['dtype']}), {r['classes']:,} classes, "
            f"{r['per_chip_batch']} images per chip on {r['topology']}: DOES NOT FIT: XLA "
            f"asked for {r['temp_bytes_asked'] / GIB:.2f} GiB of temporaries per chip, "
            f"{budget} ({r['error']})"
        )
    lines = [
        f"{r['loss']} {r['arch']} ({r['dtype']}), {r['classes']:,} classes, sample rate "
        f"{r['sample_rate']}, {r['per_chip_batch']} images per chip on {r['topology']} "
        f"({r['chips']} x {r['device_kind']}), compiled in {r['compile_s']:.0f} s; head "
        + (f"{r['head_block']:,} classes at a time" if r.get("head_block") else "dense"),
        f"per chip: arguments {r['argument_bytes'] / GIB:.2f} GiB, outputs "
        f"{r['output_bytes'] / GIB:.2f}, aliased {r['alias_bytes'] / GIB:.2f}, temporaries "
        f"{r['temp_bytes'] / GIB:.2f}: {r['bytes_per_chip'] / GIB:.2f} of {budget}, "
        f"{'fits' if r['fits'] else 'DOES NOT FIT'}",
    ]
    rate = "fp16 (no bf16)" if r.get("peak_dtype") == "float16" else "bf16"
    if r["flops_per_step"] is not None:
        lines.append(
            f"{r['flops_per_step']:.3e} FLOPs per chip and step"
            + (" (counted on this host's CPU compile)" if gpu else "")
            + f": {1e3 * r['step_s_at_peak']:.1f} ms at the peak {rate} rate"
        )
        if r.get("step_s_floor") is not None:
            lines.append(
                f"{r['bytes_accessed_per_step']:.3e} bytes accessed per chip and step"
                + (" (this host's CPU compile: XLA:GPU fuses more)" if gpu else "")
                + f": {1e3 * r['step_s_at_bandwidth']:.1f} ms at "
                f"{r['memory_bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s; {r['bound']}-bound, "
                f"at most {r['images_per_s_per_chip_ceiling']:.0f} images/s per chip "
                "(XLA's cost model)"
            )
        else:
            lines.append(
                f"no bytes accessed counted: at most "
                f"{r['images_per_s_per_chip_at_peak']:.0f} images/s per chip from "
                "the FLOPs alone"
            )
    else:
        lines.append(
            "FLOPs: XLA's GPU compiler counts none; --flops counts them on this "
            "host's CPU compile of the same step (as long again)"
        )
    return "\n".join(lines)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--topology",
        required=True,
        help="Cloud TPU topology (v5e:2x4, v5p:4x4x4, v6e:16x16) or NVIDIA GPUs "
        f"NAME:COUNT, NAME one of {', '.join(gpu_targets.GPUS)} (h100:8)",
    )
    parser.add_argument(
        "--config",
        required=True,
        help="recipe as for magjax.main, e.g. configs/arcface.py:r100,pfc0.2; "
        "--config.FIELD=VALUE overrides a field as there",
    )
    parser.add_argument(
        "--per-chip-batch",
        type=cli.positive_int,
        default=None,
        help="images per chip (default: the official run's per-GPU batch)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print only the JSON line (otherwise it comes last)"
    )
    cli.add_verbose_flag(parser)


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(
        prog="python -m magjax.bench compile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_options(parser)
    parser.add_argument(
        "--classes",
        type=cli.positive_int,
        default=None,
        help="number of identities (default: the recipe's dataset)",
    )
    parser.add_argument(
        "--flops",
        action="store_true",
        help="GPUs: count the FLOPs and bytes accessed on this host's CPU compile of the step",
    )
    args, overrides = parse_args(parser, argv)
    return cli.run(lambda: _compile(args, overrides), verbose=args.verbose)


def parse_args(
    parser: argparse.ArgumentParser, argv: list[str]
) -> tuple[argparse.Namespace, list[str]]:
    """The options, and the ``--config.FIELD[=VALUE]`` overrides (with a value given as the next
    argument) apart; anything else unknown is one line, as any bad flag. For GPU topologies,
    sets the plugin's environment (:func:`prepare_gpu_environment`) and, with ``--flops``,
    splits this host's CPU into as many devices, both before jax starts."""
    args, rest = parser.parse_known_args(argv)
    overrides, index = [], 0
    while index < len(rest):
        arg = rest[index]
        if not arg.startswith("--config."):
            parser.error(f"unrecognized arguments: {' '.join(rest[index:])}")
        overrides.append(arg)
        if "=" not in arg and index + 1 < len(rest) and not rest[index + 1].startswith("--"):
            overrides.append(rest[index + 1])
            index += 1
        index += 1
    try:
        gpu = gpu_targets.parse_topology(args.topology)
    except UserError as error:
        parser.error(str(error))
    if gpu is not None:
        prepare_gpu_environment()
        forced = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
        if getattr(args, "flops", False) and not forced:
            import jax

            # Refused once jax has started in this process: host_cost uses what it has.
            with contextlib.suppress(RuntimeError):
                jax.config.update("jax_num_cpu_devices", gpu[1])
    # Once the compilers' environment is set: libtpu's and the CUDA plugin's probing off the
    # console (a TPU or GPU compile on this host is what they are installed for).
    logs.start_jax(verbose=args.verbose)
    return args, overrides


def load_config(spec: str, overrides: list[str]):
    """The recipe ``spec`` (``configs/arcface.py:r100``, ``magjax:arcface:r100``) with the
    ``--config.`` overrides applied: ml_collections' config flag on a private flag set, as
    ``magjax.main`` parses its own (the fields keep their types; a misspelt or ill-typed field is
    a :class:`UserError` naming it, in ``magjax.main``'s words)."""
    from absl import flags
    from ml_collections import config_flags

    from magjax import main as train_main
    from magjax import recipes

    argv = train_main.expand_recipe_names(["magjax.bench", f"--config={spec}", *overrides])
    # The recipe alone first: a missing file or an unknown variant said as for every bench
    # command ("--config SPEC: ..."); ml_collections' flag would report only the last line.
    recipes.config_from_file(argv[1].removeprefix("--config="))
    try:
        values = flags.FlagValues()
        # sys_argv: the flag reads the overrides from these, not from the process's own argv.
        holder = config_flags.DEFINE_config_file(
            "config", None, "recipe", flag_values=values, lock_config=True, sys_argv=argv
        )
        values(argv)
        return holder.value.copy_and_resolve_references()
    except UserError:
        raise
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as error:
        raise UserError(train_main._flag_error_message(error, argv)) from error


def _compile(args: argparse.Namespace, overrides: list[str]) -> None:
    result = run(
        args.topology,
        load_config(args.config, overrides),
        args.per_chip_batch,
        args.classes,
        flops=args.flops,
    )
    result["overrides"] = overrides
    if not args.json:
        print(describe(result))
    print(json.dumps(result))
