"""``python -m magjax.models summary ARCH [--json]``: parameter count and shapes of a backbone.

Shapes come from ``jax.eval_shape``, so even iresnet200 costs no memory. With ``--json`` the
last line is ``{"arch", "params", "embedding_dim", "input_shape", ...}``.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from magjax import cli, logs, models


def _summary(arch: str) -> dict:
    variables = models.abstract_variables(arch)

    def size(tree) -> int:
        return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(tree)))

    params = variables["params"]
    return {
        "arch": arch,
        "family": models.family(arch),
        "params": size(params),
        "batch_stats": size(variables.get("batch_stats", {})),
        "embedding_dim": 512,
        "input_shape": list(models.INPUT_SHAPE),
        "input_spec": models.input_spec(arch),
        "params_by_module": {name: size(sub) for name, sub in params.items()},
    }


def main(argv: list[str]) -> int:
    parser = cli.ArgumentParser(prog="python -m magjax.models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    summary = sub.add_parser("summary", help="parameter count of an architecture")
    cli.add_arch_argument(summary, models.ARCHS, "arch")
    summary.add_argument("--json", action="store_true", help="last line is JSON")
    args = parser.parse_args(argv)
    logs.route_logging(None)
    logs.start_jax()
    info = _summary(args.arch)
    if args.json:
        compact = {k: info[k] for k in ("arch", "family", "params", "embedding_dim", "input_shape")}
        compact["input_spec"] = info["input_spec"]
        print(json.dumps(compact))
    else:
        print(
            f"{info['arch']} ({info['family']}): {info['params']:,} parameters, "
            f"{info['batch_stats']:,} BatchNorm statistics"
        )
        print(
            f"input {info['input_shape']} {info['input_spec']} -> raw embedding "
            f"[{info['embedding_dim']}]"
        )
        for name, count in info["params_by_module"].items():
            print(f"  {name:24s} {count:>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
