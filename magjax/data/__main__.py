"""Command line for face data sets.

  python -m magjax.data prepare --format rec|folder|synthetic [--src PATH] --out DIR [options]
  python -m magjax.data inspect DIR [--json]
  python -m magjax.data inspect FILE.bin [--json]

``prepare`` builds a TFDS (array_record) dataset; synthetic knobs: --num-identities,
--images-per-identity, --num-heldout, --num-pairs, --nuisance, --quality-mix, --seed ...
``inspect`` prints a summary; with --json the last line is one JSON object
(``num_examples``, ``num_classes``, ``skipped`` ... for a dataset; ``num_pairs``, ``num_same`` ...
for a verification .bin).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from magjax import cli
from magjax.data import synthetic


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m magjax.data", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="build a TFDS dataset")
    prep.add_argument("--format", required=True, choices=("rec", "folder", "synthetic"))
    prep.add_argument("--src", help="RecordIO directory or image folder (not for synthetic)")
    prep.add_argument("--out", required=True, help="output dataset root")
    prep.add_argument("--on-size-mismatch", choices=("resize", "error"), default="resize",
                      help="images that are not 112x112: resize (warn once) or fail")
    prep.add_argument("--layout", choices=("auto", "flat", "split"), default="auto",
                      help="folder: identity dirs at the top, or split into parts (WebFace42M)")
    defaults = synthetic.SyntheticConfig()
    for field in dataclasses.fields(synthetic.SyntheticConfig):
        value = getattr(defaults, field.name)
        kind = _floats if isinstance(value, tuple) else type(value)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        prep.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None,
                          help=f"synthetic: {field.name} (default {shown})")
    prep.add_argument("--json", action="store_true", help="print the summary as JSON")
    ins = sub.add_parser("inspect", help="summarise a prepared dataset or a .bin file")
    ins.add_argument("path")
    ins.add_argument("--json", action="store_true")
    for command in (prep, ins):
        cli.add_verbose_flag(command)
    return p


def _print(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, sort_keys=True))
    else:
        for k, v in summary.items():
            print(f"{k}: {v}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return cli.run(lambda: _run(args), verbose=args.verbose)


def _run(args: argparse.Namespace) -> int:
    from magjax.data import builders, verification_bin

    if args.command == "inspect":
        if args.path.endswith(".bin"):
            summary = verification_bin.inspect_bin(args.path)
        else:
            summary = builders.inspect_dataset(args.path)
        _print(summary, args.json)
        return 0

    options: dict = {}
    if args.on_size_mismatch != "resize":
        options["on_size_mismatch"] = args.on_size_mismatch
    synthetic_opts = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(synthetic.SyntheticConfig)
        if getattr(args, f.name) is not None
    }
    if args.format == "synthetic":
        options.update(synthetic_opts)
    else:
        if synthetic_opts:
            return cli.report_user_error(
                f"{sorted(synthetic_opts)} only apply to --format synthetic")
        if args.format == "folder" and args.layout != "auto":
            options["layout"] = args.layout
    root = builders.prepare(args.format, args.src, args.out, **options)
    summary = builders.inspect_dataset(root)
    summary.pop("metadata", None)
    _print(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
