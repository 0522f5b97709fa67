"""``python -m magjax.evaluate``: verification, IJB, quality and clustering of one model, with the
evaluators of :mod:`magjax.evaluators` (the kinds training runs too).

    python -m magjax.evaluate --workdir runs/demo --bins lfw.bin,cfp_fp.bin,agedb_30.bin
    python -m magjax.evaluate --workdir runs/r100 --ijb /data/IJB_release --target IJBC
    python -m magjax.evaluate --workdir runs/r100 \
        --cluster /data/IJB-B/clustering_protocol/cs3.csv --cluster-root /data/IJB-B
    python -m magjax.evaluate --workdir runs/r100 \
        --sets '{"cfp": {"kind": "verification", "paths": ["/data/cfp_fp.bin"]}}'

Each flag names evaluation sets of one kind of :data:`magjax.evaluators.KINDS`; ``--sets``
names any, as ``config.eval.sets`` does. Without any, a training workdir's own sets are
evaluated (those its ``config.json`` names: the data's held-out sets, ``config.eval``'s).

Writes to ``--out`` (default ``WORKDIR/eval``):

* ``eval.json``: every number below, rewritten (atomically) as each part completes; a ``.bin``
  set that fails is recorded under ``failed`` with its error, the other sets are still
  evaluated, and the command exits with status 2;
* per ``.bin`` set NAME: 10-fold accuracy +- std, VAL@FAR=1e-3, XNorm
  (:mod:`magjax.eval.verification`), ``erc_NAME.csv`` and the quality plots
  ``mean_faces_NAME.png``;
* ``erc.png`` (error-versus-reject of all sets) and ``magnitude_hist.png``
  (:mod:`magjax.eval.quality`);
* ``--quality-set``: Spearman of the feature norm and the known quality level, the mean norm
  per level (:class:`magjax.evaluators.QualitySet`);
* IJB: TAR@FAR 1e-6 ... 1e-1 for the aggregation modes of :func:`magjax.eval.ijb.default_modes`
  and ``roc_IJBC.png``;
* clustering: BCubed precision / recall / F and NMI of K-means, agglomerative and DBSCAN
  (:mod:`magjax.eval.cluster`). ``--cluster`` is an image folder ``root/<identity>/<img>`` or an
  IJB-B protocol CSV (``TEMPLATE_ID,SUBJECT_ID,FILENAME[,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT]``,
  files relative to ``--cluster-root``): the face box is cropped (the protocol has no
  landmarks, so this is a box crop resized to 112, not a 5-point alignment) and templates are
  the mean of their unit image embeddings.

A table of the results is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

from magjax import cpu_runtime

if __name__ == "__main__":  # before the imports below, which take a second
    cpu_runtime.restart_with_malloc_tunables("magjax.evaluate")

import numpy as np  # noqa: E402

from magjax import cli, evaluators, files, logs  # noqa: E402
from magjax.errors import UserError  # noqa: E402
from magjax.eval import cluster, ijb, quality  # noqa: E402

log = logging.getLogger("magjax.evaluate")


def format_table(report: dict) -> str:
    """The printed summary: one line per set / mode / clustering method."""
    lines = []
    if report.get("verification"):
        lines.append(
            f"{'set':16s} {'acc':>8s} {'std':>8s} {'VAL@1e-3':>9s} {'XNorm':>8s} "
            f"{'FNMR@0%':>8s} {'FNMR@20%':>9s}"
        )
        for name, r in report["verification"].items():
            erc = r["erc_fnmr"]
            lines.append(
                f"{name:16s} {100 * r['accuracy']:8.2f} {100 * r['std']:8.2f} "
                f"{100 * r['val']:9.2f} {r['xnorm']:8.3f} {erc.get('0.00', np.nan):8.4f} "
                f"{erc.get('0.20', np.nan):9.4f}"
            )
    if report.get("quality"):
        q = report["quality"]
        lines.append(
            f"quality set: Spearman(feature norm, quality level) "
            f"{q['spearman_norm_vs_quality']:.4f}; recognisability vs level "
            f"{q['spearman_recognisability_vs_quality']:.4f}; mean norm per level "
            + " ".join(f"{level}: {norm:.2f}" for level, norm in q["mean_norm_per_level"].items())
        )
    if report.get("ijb"):
        target = report["ijb_target"]
        fars = [repr(x) for x in ijb.FAR_TARGETS]
        lines.append(f"{target + ' TAR@FAR':22s} " + " ".join(f"{f:>7s}" for f in fars))
        for mode, r in report["ijb"].items():
            lines.append(
                f"{mode:22s} " + " ".join(f"{100 * r['tar_at_far'][f]:7.2f}" for f in fars)
            )
    if report.get("cluster"):
        lines.append(f"{'clustering':16s} {'P':>7s} {'R':>7s} {'F':>7s} {'NMI':>7s} {'#cl':>6s}")
        for method, r in report["cluster"].items():
            lines.append(
                f"{method:16s} {r['precision']:7.4f} {r['recall']:7.4f} "
                f"{r['fmeasure']:7.4f} {r['nmi']:7.4f} {r['num_clusters']:6d}"
            )
    # The results of any other kind (magjax.evaluators.KINDS): one line per number.
    for name, value in evaluators.flatten(
        {key: value for key, value in report.items() if key not in _TABULATED}
    ).items():
        lines.append(f"{name:40s} {value}")
    return "\n".join(lines)


# The report's entries format_table shows in its own way (or not: the run's, the failures).
_TABULATED = (
    "workdir",
    "arch",
    "failed",
    "verification",
    "quality",
    "ijb",
    "ijb_target",
    "cluster",
    "cluster_items",
)


def run_sets(workdir: pathlib.Path, **runtime) -> dict[str, evaluators.Evaluator]:
    """The evaluators of the sets the training run in ``workdir`` evaluated (its
    ``config.json``: the prepared data's held-out sets and ``config.eval``'s) whose files are
    still there, or {} when it is no training workdir or names none."""
    saved = workdir / "config.json"
    try:
        config = json.loads(saved.read_text())
        data_dir = pathlib.Path(config["data"]["dir"])
        specs = evaluators.set_specs(config["eval"], data_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    found = {}
    for name, evaluator in evaluators.from_specs(specs, data_dir=data_dir, **runtime).items():
        if isinstance(evaluator, evaluators.Verification):  # the .bin files still there
            evaluator.paths = [path for path in evaluator.paths if path.is_file()]
            if not evaluator.paths:
                continue
        if all(path.exists() for path in evaluator.files()):
            found[name] = evaluator
    if found:
        log.info(
            "evaluating the sets of the run in %s: %s",
            workdir,
            ", ".join(str(path) for evaluator in found.values() for path in evaluator.files()),
        )
    return found


def flag_specs(args: argparse.Namespace) -> dict[str, dict]:
    """The evaluation sets the flags name, ``{name: {"kind": ..., **options}}``, in the order
    they are evaluated: the ``.bin`` sets, IJB, the quality set, clustering, ``--sets``."""
    specs: dict[str, dict] = {}
    paths = [item.strip() for item in args.bins.split(",") if item.strip()]
    if paths:
        specs["verification"] = {"kind": "verification", "paths": paths}
    if args.ijb:
        specs[args.target] = {"kind": "ijb", "root": args.ijb, "target": args.target}
    if args.quality_set:
        specs["quality"] = {"kind": "quality", "path": args.quality_set}
    if args.cluster:
        specs["cluster"] = {
            "kind": "clustering",
            "spec": args.cluster,
            "root": args.cluster_root,
            "methods": tuple(m.strip() for m in args.cluster_methods.split(",") if m.strip()),
            "eps": args.dbscan_eps,
            "min_samples": args.dbscan_min_samples,
        }
    if args.sets:
        try:
            named = json.loads(args.sets)
        except ValueError as error:
            raise UserError(
                f"--sets is not JSON ({error}): give an object such as "
                '\'{"lfw": {"kind": "verification", "paths": ["lfw.bin"]}}\''
            ) from None
        if not isinstance(named, dict):
            raise UserError(f"--sets must be a JSON object of sets by name, got {args.sets!r}")
        for name, spec in named.items():
            if name in specs:
                raise UserError(f"--sets: {name!r} is the name of a set another flag gives")
            specs[name] = spec
    return specs


def write_report(report: dict, path: pathlib.Path) -> None:
    """Writes ``report`` as JSON to ``path`` through a rename: never a half-written file."""
    files.write_text_atomically(path, json.dumps(report, indent=2, sort_keys=True))


def _without_path(path, message: str) -> str:
    """``message`` without a leading ``path:`` (most errors name their file), for lines that
    name the set themselves: the path is then printed once."""
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def evaluate_bins(
    verifier: evaluators.Verification, encoder, out: pathlib.Path, report: dict
) -> None:
    """Evaluates each ``.bin`` set in turn, saving ``eval.json`` after each one.

    A set that fails with a user error (missing or corrupt file) is recorded in
    ``report["failed"]`` and the next set is evaluated; any other error is recorded, the report
    saved, and the error raised.
    """
    report.setdefault("verification", {})
    for path in verifier.paths:
        try:
            r = verifier.run_set(encoder, path)
        except Exception as error:
            message = cli.user_error_message(error)
            report.setdefault("failed", {})[str(path)] = message or (
                f"{type(error).__name__}: {cli.one_line(str(error))}"
            )
            write_report(report, out / "eval.json")
            if message is None:
                raise
            log.warning("%s failed: %s", path, _without_path(path, message))
            continue
        report["verification"][r["name"]] = r["summary"]
        write_report(report, out / "eval.json")


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m magjax.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir", required=True, help="training workdir or inference-model directory"
    )
    parser.add_argument("--bins", default="", help="comma-separated verification .bin files")
    parser.add_argument("--ijb", default=None, help="IJB root (holding meta/ and loose_crop/)")
    parser.add_argument("--target", default="IJBC", choices=("IJBB", "IJBC"))
    parser.add_argument(
        "--quality-set",
        default=None,
        help=".npz of images with quality levels and identities (the synthetic "
        "data's quality.npz): Spearman of the feature norm and the level",
    )
    parser.add_argument(
        "--cluster", default=None, help="image folder root/<identity>/<img> or IJB-B clustering CSV"
    )
    parser.add_argument(
        "--cluster-root",
        default=None,
        help="directory the FILENAME column of --cluster CSV is relative to",
    )
    parser.add_argument("--cluster-methods", default=",".join(cluster.METHODS))
    parser.add_argument(
        "--dbscan-eps", type=float, default=0.5, help="DBSCAN radius in cosine distance"
    )
    parser.add_argument("--dbscan-min-samples", type=int, default=2)
    parser.add_argument(
        "--sets",
        default=None,
        help="evaluation sets of any kind as JSON, as config.eval.sets: "
        '\'{"NAME": {"kind": "KIND", OPTION: VALUE, ...}}\'',
    )
    parser.add_argument("--out", default=None, help="output directory (default WORKDIR/eval)")
    cli.add_image_batch_argument(parser)
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (.bin sets, IJB images)"
    )
    cli.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.workdir) / "eval"
    # The log goes beside the results, unless --out's folder is not there (a mistyped workdir
    # is not created to hold it).
    log_file = out / "evaluate.log" if out.parent.is_dir() else None
    logs.route_logging(log_file, verbose=args.verbose)
    runtime = {"batch_size": args.batch, "out": out, "progress": not args.no_progress}
    try:
        specs = flag_specs(args)
        chosen = evaluators.from_specs(specs, where="--sets", **runtime)
        if not specs:
            # A training workdir: the sets its run evaluated (the data's held-out set, its
            # config.eval).
            chosen = run_sets(pathlib.Path(args.workdir), **runtime)
    except UserError as error:  # a set naming no kind, or an option its kind lacks
        return cli.report_user_error(str(error))
    if not chosen:
        parser.error(
            f"nothing to evaluate: {args.workdir} names no evaluation set of its "
            "own; give --bins, --ijb, --quality-set, --cluster and/or --sets"
        )
    cpu_runtime.configure()
    return cli.run(
        lambda: _evaluate(args, chosen, out, log_file), verbose=args.verbose, log_file=log_file
    )


def _evaluate(
    args: argparse.Namespace,
    chosen: dict[str, evaluators.Evaluator],
    out: pathlib.Path,
    log_file: pathlib.Path | None,
) -> int:
    from magjax.encoder import FaceEncoder

    logs.start_jax(log_file, verbose=args.verbose)
    encoder = FaceEncoder.load(args.workdir, batch_size=args.batch)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"workdir": str(args.workdir), "arch": encoder.arch}

    for evaluator in chosen.values():
        if isinstance(evaluator, evaluators.Verification):
            evaluate_bins(evaluator, encoder, out, report)  # a failed .bin: the others still run
            curves = {name: curve for e in chosen.values() for name, curve in e.curve.items()}
            if curves:
                quality.plot_erc(curves, out / "erc.png")
        else:
            evaluators.merge(report, evaluator.run(encoder))
        write_report(report, out / "eval.json")
    mags = {name: m for e in chosen.values() for name, m in e.magnitudes.items()}
    if mags:
        quality.plot_magnitude_histograms(mags, out / "magnitude_hist.png")

    print(format_table(report))
    log.info("wrote %s", out / "eval.json")
    if report.get("failed"):
        return cli.report_user_error(
            f"{len(report['failed'])} of {len(report['failed']) + len(report['verification'])}"
            f" .bin sets failed, the others are in "
            f"{out / 'eval.json'}: "
            + "; ".join(
                f"{path}: {_without_path(path, message)}"
                for path, message in report["failed"].items()
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
