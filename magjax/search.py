"""``python -m magjax.search``: who is in these photos? 1:N identification against a gallery.

    # gallery: photos of known people, one folder per person (the folder name is the identity)
    python -m magjax.extract --workdir runs/r100 --images people/ --detect --one-face \\
        --out gallery.npz
    # probes: every face of the photos to search
    python -m magjax.extract --workdir runs/r100 --images holiday/ --detect --out probes.npz
    python -m magjax.search --gallery gallery.npz --probes probes.npz --threshold 0.3
    # the threshold chosen for a false-accept rate of 1e-4 on labelled faces of other people
    python -m magjax.search --gallery gallery.npz --probes probes.npz \\
        --verification others.npz --far 1e-4 --out matches.csv
    # an IJB-C 1:N style report: probes whose identity is known, some of them not in the gallery
    python -m magjax.search --gallery gallery.npz --probes test.npz --probe-ids folders \\
        --fpir 0.01,0.1 --json

Feature files are ``python -m magjax.extract`` outputs (``embeddings``, ``paths``, and with
``--detect`` ``boxes``). Identities (``--gallery-ids``, ``--probe-ids``, ``--verification-ids``)
are ``folders`` (the name of each row's image folder), ``files`` (the image's file name without
its suffix) or a text file with one identity per row of the feature file.

Each gallery identity is one template: the mean of its L2-normalised embeddings, normalised
again (IJB-C's template aggregation). A probe is compared with every template by cosine
similarity; the output lists its ``--top-k`` identities with their scores and a decision: the
best identity when its score reaches the threshold, else ``unknown``. Without a threshold the
search is closed-set (the best identity is always the answer).

``--verification FEATURES --far F``: the threshold is the smallest score at which at most a
fraction F of the verification set's impostor pairs (all pairs of rows of different identities)
are accepted (score >= threshold): the usual way to pick an operating point on data the gallery
does not contain.

With ``--probe-ids`` the probes' true identities are known: a probe whose identity is in the
gallery is mated, any other non-mated, and the report gives, as the IJB-C 1:N protocol does, the
rank-1 / rank-5 identification rates of the mated probes (CMC) and TPIR@FPIR: at the threshold
at which a fraction FPIR of the non-mated probes' best scores is accepted, the fraction of mated
probes found at rank 1 with a score at or above it.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import pathlib
import sys

import numpy as np

from magjax import cli, files, logs
from magjax.errors import UserError

log = logging.getLogger("magjax.search")

# ----------------------------------------------------------------------------- inputs


def load_features(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The arrays of a feature file (``python -m magjax.extract`` output), ``embeddings``
    L2-normalised again (in float32); errors name the file."""
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            fields = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise UserError(f"{path}: no such feature file") from None
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path}: not a feature file (.npz from python -m magjax.extract): {e}"
        ) from None
    emb = fields.get("embeddings")
    if emb is None or emb.ndim != 2 or emb.shape[0] == 0:
        raise UserError(
            f"{path}: expected 'embeddings' [N, d] with N >= 1 (python -m "
            f"magjax.extract output), got {None if emb is None else emb.shape}"
        )
    emb = emb.astype(np.float32)
    if not np.all(np.isfinite(emb)):
        raise UserError(f"{path}: embeddings hold NaN or infinite values")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    fields["embeddings"] = emb / np.maximum(norms, np.finfo(np.float32).tiny)
    return fields


def identities(features: dict, spec: str, what: str) -> np.ndarray:
    """The identity of each row: ``spec`` ``folders``, ``files`` or a list file (one a row)."""
    rows = len(features["embeddings"])
    if spec in ("folders", "files"):
        if "paths" not in features:
            raise UserError(
                f"{what}: no 'paths' in the feature file to take {spec} from; give "
                "a list file with one identity per row"
            )
        paths = [pathlib.PurePath(str(p)) for p in features["paths"]]
        return np.asarray([p.parent.name if spec == "folders" else p.stem for p in paths])
    path = pathlib.Path(spec)
    try:
        names = [line.strip() for line in path.read_text().splitlines()]
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such identity list (or say folders or files)") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: identity list is not UTF-8 text: {e}") from None
    while names and not names[-1]:
        names.pop()
    if len(names) != rows:
        raise UserError(
            f"{path}: {len(names)} identities for the {rows} rows of the "
            f"{what} features (one line per row expected)"
        )
    if "" in names:
        raise UserError(f"{path} line {names.index('') + 1}: empty identity")
    return np.asarray(names)


# ----------------------------------------------------------------------------- scoring


def templates(embeddings: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(names [G] sorted, templates [G, d])``: per identity the mean of its L2-normalised
    ``embeddings``, normalised again."""
    names, inverse = np.unique(ids, return_inverse=True)
    sums = np.zeros((len(names), embeddings.shape[1]), np.float64)
    np.add.at(sums, inverse, embeddings.astype(np.float64))
    sums /= np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    return names, sums.astype(np.float32)


def search(
    probes: np.ndarray, gallery: np.ndarray, top_k: int, true_index: np.ndarray | None = None
):
    """Cosine similarities of L2-normalised ``probes`` [P, d] with ``gallery`` [G, d].

    Returns ``(index [P, k], score [P, k])``, best first (ties: lower gallery index first), and
    with ``true_index`` ([P], -1 where the probe's identity is not in the gallery) also
    ``rank [P]``: 1 + the number of gallery entries scoring strictly above the true one (0 for
    the -1 rows).
    """
    k = min(top_k, gallery.shape[0])
    index = np.zeros((len(probes), k), np.int64)
    score = np.zeros((len(probes), k), np.float32)
    rank = np.zeros(len(probes), np.int64)
    block = _block_rows(len(gallery))
    for start in range(0, len(probes), block):
        s = probes[start : start + block] @ gallery.T
        part = (
            np.argpartition(-s, k - 1, axis=1)[:, :k]
            if k < s.shape[1]
            else np.broadcast_to(np.arange(s.shape[1]), s.shape)
        )
        part_scores = np.take_along_axis(s, part, axis=1)
        order = np.lexsort((part, -part_scores), axis=1)  # score, then index
        index[start : start + len(s)] = np.take_along_axis(part, order, axis=1)
        score[start : start + len(s)] = np.take_along_axis(part_scores, order, axis=1)
        if true_index is not None:
            t = true_index[start : start + len(s)]
            mated = t >= 0
            true_score = s[np.flatnonzero(mated), t[mated]]
            rank[start + np.flatnonzero(mated)] = (s[mated] > true_score[:, None]).sum(1) + 1
    return (index, score, rank) if true_index is not None else (index, score)


def threshold_at_rate(negative_scores: np.ndarray, rate: float, total: int | None = None) -> float:
    """The smallest threshold ``t`` (a float32) at which at most a fraction ``rate`` of the
    negatives are accepted (score >= t).

    ``negative_scores`` may hold only the largest scores of ``total`` negatives (at least the
    ``floor(rate * total) + 1`` largest). With ``k = floor(rate * total)`` and ``s`` the scores
    in decreasing order, ``t`` is the next float32 above ``s[k]``: exactly the ``k`` scores above
    ``s[k]`` pass (fewer when some tie with it).
    """
    scores = np.sort(np.asarray(negative_scores, np.float32))[::-1]
    total = len(scores) if total is None else total
    if total == 0:
        raise ValueError("no negative score to choose a threshold from")
    k = _allowed(rate, total)
    if k >= total:
        return float("-inf")  # every negative may pass
    if k >= len(scores):
        raise ValueError(f"{len(scores)} scores given, the {k + 1} largest are needed")
    return float(np.nextafter(scores[k], np.float32(np.inf)))


def _allowed(rate: float, total: int) -> int:
    """``floor(rate * total)``, the number of negatives that may pass: with a relative margin,
    since ``0.29 * 100`` is 28.999999999999996 in floating point."""
    return int(np.floor(rate * total * (1 + 1e-12)))


def _block_rows(columns: int) -> int:
    """Rows of a score block: at most 1024, and at most 16 M scores (64 MB) at once."""
    return max(1, min(1024, (1 << 24) // max(1, columns)))


def impostor_top(
    embeddings: np.ndarray, ids: np.ndarray, keep: int
) -> tuple[np.ndarray, int, np.ndarray]:
    """Scores of the verification pairs: ``(the keep largest impostor scores, the number of
    impostor pairs, every genuine score)``. All pairs ``i < j`` of rows; impostor when the
    identities differ. Computed in blocks: the impostor scores are never all held."""
    _, labels = np.unique(ids, return_inverse=True)
    top = np.zeros(0, np.float32)
    genuine = []
    count = 0
    n = len(embeddings)
    block = _block_rows(n)
    for start in range(0, n, block):
        rows = np.arange(start, min(n, start + block))
        s = embeddings[rows] @ embeddings.T
        upper = np.arange(n)[None, :] > rows[:, None]
        same = labels[rows][:, None] == labels[None, :]
        genuine.append(s[upper & same])
        impostor = s[upper & ~same]
        count += len(impostor)
        top = np.concatenate([top, impostor])
        if len(top) > keep:
            top = np.partition(top, len(top) - keep)[len(top) - keep :]
    return top, count, np.concatenate(genuine) if genuine else np.zeros(0, np.float32)


def verification_threshold(embeddings: np.ndarray, ids: np.ndarray, far: float) -> dict:
    """The threshold for a false-accept rate ``far`` on a labelled verification set, with the
    rates reached there: ``{"threshold", "far", "tar", "impostor_pairs", "genuine_pairs"}``."""
    n = len(embeddings)
    counts = np.unique(ids, return_counts=True)[1].astype(np.int64)
    impostors = n * (n - 1) // 2 - int(np.sum(counts * (counts - 1) // 2))
    if impostors == 0:
        raise UserError("the verification set has no pair of different identities")
    keep = _allowed(far, impostors) + 1
    top, count, genuine = impostor_top(embeddings, ids, keep)
    assert count == impostors
    t = threshold_at_rate(top, far, impostors)
    return {
        "threshold": t,
        "far": float(np.sum(top >= t) / impostors),
        "tar": float(np.mean(genuine >= t)) if len(genuine) else None,
        "impostor_pairs": int(impostors),
        "genuine_pairs": int(len(genuine)),
    }


def identification_report(
    top1_score: np.ndarray, rank: np.ndarray, mated: np.ndarray, fpirs: tuple[float, ...]
) -> dict:
    """IJB-C 1:N style figures from each probe's best score, its mate's rank (mated probes) and
    whether it is mated: ``rank1``, ``rank5`` (CMC, mated probes), and ``tpir_at_fpir``
    (``{fpir: {"tpir", "threshold", "fpir_reached"}}``, from the non-mated probes' best
    scores)."""
    report: dict = {"mated": int(mated.sum()), "non_mated": int((~mated).sum())}
    if mated.any():
        report["rank1"] = float(np.mean(rank[mated] == 1))
        report["rank5"] = float(np.mean(rank[mated] <= 5))
    if mated.any() and (~mated).any():
        negatives = top1_score[~mated]
        report["tpir_at_fpir"] = {}
        for fpir in fpirs:
            t = threshold_at_rate(negatives, fpir)
            report["tpir_at_fpir"][str(fpir)] = {
                "tpir": float(np.mean((rank[mated] == 1) & (top1_score[mated] >= t))),
                "threshold": t,
                "fpir_reached": float(np.mean(negatives >= t)),
            }
    return report


# ----------------------------------------------------------------------------- command line


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a rate in (0, 1), got {text}")
    return value


def _rates(text: str) -> tuple[float, ...]:
    return tuple(_rate(v) for v in text.split(","))


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m magjax.search",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--gallery", required=True, help="feature file of the known faces")
    p.add_argument(
        "--gallery-ids",
        default="folders",
        metavar="folders|files|LIST",
        help="identities of the gallery rows (default: folder names)",
    )
    p.add_argument("--probes", required=True, help="feature file of the faces to identify")
    p.add_argument(
        "--probe-ids",
        metavar="folders|files|LIST",
        help="the probes' true identities: report rank-1 and TPIR@FPIR",
    )
    p.add_argument(
        "--top-k", type=cli.positive_int, default=5, help="candidates listed per probe (default 5)"
    )
    p.add_argument(
        "--threshold", type=float, help="cosine score from which the best candidate is accepted"
    )
    p.add_argument(
        "--verification",
        metavar="FEATURES",
        help="labelled faces (not in the gallery) to choose the threshold on",
    )
    p.add_argument(
        "--verification-ids",
        default="folders",
        metavar="folders|files|LIST",
        help="identities of the verification rows (default: folder names)",
    )
    p.add_argument("--far", type=_rate, help="with --verification: the false-accept rate")
    p.add_argument(
        "--fpir",
        type=_rates,
        default=(0.01, 0.1),
        metavar="R,R",
        help="with --probe-ids: the FPIRs of the report (default 0.01,0.1)",
    )
    p.add_argument("--out", help="write one CSV row per probe (decision and candidates)")
    p.add_argument("--json", action="store_true", help="last line: the summary as JSON")
    cli.add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threshold is not None and (args.verification or args.far is not None):
        parser.error("give --threshold, or --verification with --far, not both")
    if bool(args.verification) != (args.far is not None):
        parser.error("--verification and --far go together")
    if args.threshold is not None and not -1.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold is a cosine similarity in [-1, 1], got {args.threshold}")
    logs.route_logging(None, verbose=args.verbose)
    return cli.run(lambda: _search(args), verbose=args.verbose)


def _search(args: argparse.Namespace) -> int:
    gallery = load_features(args.gallery)
    probes = load_features(args.probes)
    g_dim, p_dim = gallery["embeddings"].shape[1], probes["embeddings"].shape[1]
    if g_dim != p_dim:
        raise UserError(
            f"{args.probes}: embeddings of dimension {p_dim}, the gallery's "
            f"({args.gallery}) are {g_dim}: extract both with the same model"
        )
    names, gallery_templates = templates(
        gallery["embeddings"], identities(gallery, args.gallery_ids, "gallery")
    )
    summary: dict = {
        "probes": len(probes["embeddings"]),
        "gallery_identities": len(names),
        "gallery_rows": len(gallery["embeddings"]),
    }

    threshold = args.threshold
    if args.verification:
        ver = load_features(args.verification)
        if ver["embeddings"].shape[1] != g_dim:
            raise UserError(
                f"{args.verification}: embeddings of dimension "
                f"{ver['embeddings'].shape[1]}, the gallery's are {g_dim}"
            )
        chosen = verification_threshold(
            ver["embeddings"], identities(ver, args.verification_ids, "verification"), args.far
        )
        threshold = chosen["threshold"]
        summary["verification"] = {"file": str(args.verification), "target_far": args.far, **chosen}
        log.info(
            "threshold %.4f: FAR %.2e on %d impostor pairs, TAR %s on %d genuine pairs",
            threshold,
            chosen["far"],
            chosen["impostor_pairs"],
            "n/a" if chosen["tar"] is None else f"{chosen['tar']:.4f}",
            chosen["genuine_pairs"],
        )
    summary["threshold"] = threshold

    true_index = None
    if args.probe_ids:
        truth = identities(probes, args.probe_ids, "probe")
        position = {name: i for i, name in enumerate(names)}
        true_index = np.asarray([position.get(name, -1) for name in truth], np.int64)
        index, score, rank = search(probes["embeddings"], gallery_templates, args.top_k, true_index)
    else:
        index, score = search(probes["embeddings"], gallery_templates, args.top_k)
    accepted = score[:, 0] >= threshold if threshold is not None else np.ones(len(score), bool)
    summary["identified"] = int(accepted.sum())
    summary["unknown"] = int((~accepted).sum())

    rows = _result_rows(probes, names, index, score, accepted)
    if args.out:
        _write_csv(pathlib.Path(args.out), rows, index.shape[1])
        log.info("wrote %s: %d probes", args.out, len(rows))
    else:
        for row in rows:
            print(_format_row(row))
    if true_index is not None:
        report = identification_report(score[:, 0], rank, true_index >= 0, args.fpir)
        summary["report"] = report
        _print_report(report)
    print(
        f"{summary['probes']} probes against {len(names)} identities: "
        f"{summary['identified']} identified, {summary['unknown']} unknown"
        + (f" (threshold {threshold:.4f})" if threshold is not None else " (closed set)")
    )
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


def _result_rows(
    probes: dict, names: np.ndarray, index: np.ndarray, score: np.ndarray, accepted: np.ndarray
) -> list[dict]:
    paths = probes.get("paths")
    boxes = probes.get("boxes")
    rows = []
    for i in range(len(index)):
        rows.append(
            {
                "probe": i,
                "path": str(paths[i]) if paths is not None else "",
                "box": [float(v) for v in boxes[i]] if boxes is not None else None,
                "decision": str(names[index[i, 0]]) if accepted[i] else "unknown",
                "candidates": [
                    (str(names[j]), float(s)) for j, s in zip(index[i], score[i], strict=True)
                ],
            }
        )
    return rows


def _format_row(row: dict) -> str:
    where = row["path"] or f"probe {row['probe']}"
    if row["box"] is not None:
        where += " [" + ",".join(f"{v:.0f}" for v in row["box"]) + "]"
    top = ", ".join(f"{name} {s:.3f}" for name, s in row["candidates"])
    return f"{where}: {row['decision']}  ({top})"


def _write_csv(path: pathlib.Path, rows: list[dict], k: int) -> None:
    header = ["probe", "path", "x1", "y1", "x2", "y2", "decision"]
    for r in range(1, k + 1):
        header += [f"identity_{r}", f"score_{r}"]

    def write(f) -> None:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            box = [f"{v:.1f}" for v in row["box"]] if row["box"] is not None else [""] * 4
            line = [row["probe"], row["path"], *box, row["decision"]]
            for name, s in row["candidates"]:
                line += [name, f"{s:.6f}"]
            writer.writerow(line)

    files.write_stream_atomically(path, write, newline="")


def _print_report(report: dict) -> None:
    print(f"mated probes {report['mated']}, non-mated {report['non_mated']}")
    if "rank1" in report:
        print(f"rank-1 {report['rank1']:.4f}  rank-5 {report['rank5']:.4f}")
    for fpir, r in report.get("tpir_at_fpir", {}).items():
        print(
            f"TPIR@FPIR={fpir}: {r['tpir']:.4f} (threshold {r['threshold']:.4f}, FPIR reached "
            f"{r['fpir_reached']:.4f})"
        )


if __name__ == "__main__":
    sys.exit(main())
