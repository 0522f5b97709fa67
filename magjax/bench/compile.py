"""``python -m magjax.bench compile``: a recipe's train step compiled for a Cloud TPU topology.

    python -m magjax.bench compile --topology v5p:4x4x4 --config configs/arcface.py:r100
    python -m magjax.bench compile --topology v5e:2x4 --config configs/magface.py:r100 --json
    python -m magjax.bench compile --topology v6e:16x16 \\
        --config configs/arcface.py:r100,webface42m,pfc0.2 --per-chip-batch 128

Compiles, ahead of time and on any host (``pip install -r requirements-tpu.txt`` brings the TPU
compiler), the train step that ``python -m magjax.main`` runs for the recipe: the same
``train.build_components`` / ``train.jit_train_step``, with the state and the batch given as
shapes and shardings over the topology's abstract devices. No dataset is needed: the class and
image counts come from the recipe (``--classes`` overrides the first).

Prints per chip XLA's memory analysis (arguments, outputs, aliases, temporaries) against the
chip's HBM and whether it fits, the FLOPs of one step, the time those FLOPs take at the chip's
peak bf16 rate (hence a ceiling in images per second per chip), and the compile time. The last
line is JSON. The cost model's own time estimate is not reported: on a CPU host it comes back
negative (jax-stack.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from magjax import cli
from magjax.errors import UserError

# Per chip, from the Cloud TPU system-architecture pages: HBM in GiB and peak bf16 TFLOP/s.
TPU_CHIPS = {
    "v4": (32, 275.0),
    "v5e": (16, 197.0),
    "v5p": (95, 459.0),
    "v6e": (32, 918.0),
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
    """(HBM bytes, peak bf16 FLOP/s) of one chip of ``topology`` (e.g. ``v5p:4x4x4``)."""
    generation = topology.split(":")[0]
    if generation not in TPU_CHIPS:
        raise UserError(f"unknown TPU generation {generation!r} in {topology!r}; known: "
                        f"{', '.join(TPU_CHIPS)}")
    hbm_gib, tflops = TPU_CHIPS[generation]
    return hbm_gib * GIB, tflops * 1e12


def topology_devices(topology: str) -> list:
    """The abstract devices of a Cloud TPU topology, for compiling on a host without them."""
    from jax.experimental import topologies

    # Describing a topology opens no chip, so it may run beside a process that holds libtpu's
    # one-process-per-host lock (a training run on a TPU VM, parallel tests on a CPU host).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as error:  # libtpu missing, or a name it does not know
        raise UserError(f"cannot describe TPU topology {topology!r} ({error}); install the "
                        "TPU compiler with `pip install -r requirements-tpu.txt` and use a "
                        "name such as v5e:2x4, v5p:4x4x4 or v6e:16x16") from error


def compile_train_step(config, devices: list, per_chip_batch: int) -> dict:
    """Compiles ``config``'s train step over ``devices`` at ``per_chip_batch`` images per chip
    and returns XLA's memory and FLOP figures per chip."""
    import jax

    from magjax import parallel, train

    chips = len(devices)
    config = config.copy_and_resolve_references()
    config.global_batch = per_chip_batch * chips
    mesh = parallel.make_mesh(devices=devices)
    steps_per_epoch = max(config.data.num_examples // config.global_batch, 1)
    total_steps = config.total_steps or max(int(config.epochs * steps_per_epoch), 1)
    components = train.build_components(config, mesh, config.data.num_classes, steps_per_epoch,
                                        total_steps)
    state = train.abstract_state(components)
    shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    step = train.jit_train_step(components, jax.random.key(0), shardings)
    start = time.perf_counter()
    compiled = step.lower(state, train.abstract_batch(mesh, config.global_batch)).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    figures = {
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
    }
    figures["bytes_per_chip"] = (figures["argument_bytes"] + figures["output_bytes"]
                                 - figures["alias_bytes"] + figures["temp_bytes"])
    figures.update(flops_per_step=float(cost["flops"]), compile_s=round(compile_s, 1))
    return figures


def run(topology: str, config, per_chip_batch: int | None = None,
        classes: int | None = None) -> dict:
    """Everything ``bench compile`` reports for one topology and recipe, as a dict."""
    from magjax import recipes

    devices = topology_devices(topology)
    hbm, peak = chip_facts(topology)
    per_chip_batch = per_chip_batch or recipes.official_per_device_batch(config)
    config = recipes.with_dataset_counts(config)
    if classes is not None:
        config.data.num_classes = classes
    figures = compile_train_step(config, devices, per_chip_batch)
    peak_s = figures["flops_per_step"] / peak
    return {
        "topology": topology, "chips": len(devices), "device_kind": devices[0].device_kind,
        "arch": config.model.arch, "loss": config.loss.name, "dtype": config.model.dtype,
        "classes": config.data.num_classes, "sample_rate": config.head.sample_rate,
        "per_chip_batch": per_chip_batch, **figures, "hbm_bytes_per_chip": hbm,
        "fits": figures["bytes_per_chip"] <= hbm, "peak_bf16_flops_per_s": peak,
        "step_s_at_peak": peak_s, "images_per_s_per_chip_at_peak": per_chip_batch / peak_s,
    }


def describe(result: dict) -> str:
    """The human-readable lines of one ``run`` result."""
    r = result
    return "\n".join([
        f"{r['loss']} {r['arch']} ({r['dtype']}), {r['classes']:,} classes, sample rate "
        f"{r['sample_rate']}, {r['per_chip_batch']} images per chip on {r['topology']} "
        f"({r['chips']} x {r['device_kind']}), compiled in {r['compile_s']:.0f} s",
        f"per chip: arguments {r['argument_bytes'] / GIB:.2f} GiB, outputs "
        f"{r['output_bytes'] / GIB:.2f}, aliased {r['alias_bytes'] / GIB:.2f}, temporaries "
        f"{r['temp_bytes'] / GIB:.2f}: {r['bytes_per_chip'] / GIB:.2f} of "
        f"{r['hbm_bytes_per_chip'] / GIB:.0f} GiB HBM, {'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"{r['flops_per_step']:.3e} FLOPs per chip and step: {1e3 * r['step_s_at_peak']:.1f} ms "
        f"at the peak bf16 rate, at most {r['images_per_s_per_chip_at_peak']:.0f} images/s "
        "per chip",
    ])


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topology", required=True,
                        help="Cloud TPU topology, e.g. v5e:2x4, v5p:4x4x4, v6e:16x16")
    parser.add_argument("--config", required=True,
                        help="recipe as for magjax.main, e.g. configs/arcface.py:r100,pfc0.2")
    parser.add_argument("--per-chip-batch", type=cli.positive_int, default=None,
                        help="images per chip (default: the official run's per-GPU batch)")
    parser.add_argument("--json", action="store_true",
                        help="print only the JSON line (otherwise it comes last)")
    cli.add_verbose_flag(parser)


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(prog="python -m magjax.bench compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser)
    parser.add_argument("--classes", type=cli.positive_int, default=None,
                        help="number of identities (default: the recipe's dataset)")
    args = parser.parse_args(argv)
    return cli.run(lambda: _compile(args), verbose=args.verbose)


def _compile(args: argparse.Namespace) -> None:
    from magjax import recipes

    result = run(args.topology, recipes.config_from_file(args.config), args.per_chip_batch,
                 args.classes)
    if not args.json:
        print(describe(result))
    print(json.dumps(result))
