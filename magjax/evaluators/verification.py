"""The ``verification`` kind: 10-fold accuracy of ``.bin`` pair sets, insightface's protocol
(:mod:`magjax.eval.verification`); with an output directory also each set's error-versus-reject
curve and mean faces per magnitude bin (:mod:`magjax.eval.quality`)."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from magjax.eval import quality, verification
from magjax.evaluators.base import Evaluator, register


def bin_name(path: pathlib.Path) -> str:
    return path.name[: -len(".bin")] if path.name.endswith(".bin") else path.stem


@register
@dataclasses.dataclass
class Verification(Evaluator):
    """``.bin`` verification sets (``paths``: one or several; the results are keyed by each
    file's name). ``out``: where each set's ERC CSV and mean-face picture go (none: numbers
    only); ``fields``: the summary's fields :meth:`run` keeps (None: all)."""

    kind = "verification"
    path_options = ("paths",)
    results_by_set = True

    paths: list[pathlib.Path]
    batch_size: int = 64
    out: pathlib.Path | None = None
    progress: bool = False
    fields: tuple[str, ...] | None = None
    _loaded: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        super().__post_init__()
        paths = self.paths if isinstance(self.paths, (list, tuple)) else [self.paths]
        self.paths = [pathlib.Path(path) for path in paths]

    def files(self) -> list[pathlib.Path]:
        return list(self.paths)

    def prepare(self) -> None:
        for path in self.paths:
            self.load(path)

    def load(self, path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
        """The set's images and labels, read once (training evaluates the same sets often); a
        set the 10-fold protocol cannot run on is refused here, before any embedding."""
        from magjax.data.verification_bin import load_bin, protocol_problem
        from magjax.errors import UserError

        if path not in self._loaded:
            images, issame = load_bin(path)
            problem = protocol_problem(path, issame)
            if problem:
                raise UserError(problem)
            self._loaded[path] = images, issame
        return self._loaded[path]

    def run_set(self, encoder, path: pathlib.Path) -> dict:
        """One set: accuracy ± std, VAL@FAR=1e-3, XNorm, magnitudes and the ERC."""
        name = bin_name(path)
        images, issame = self.load(path)
        plain, flipped = verification.embed_with_flip(
            encoder.embed_raw, images, self.batch_size, progress=name if self.progress else None
        )
        result = verification.evaluate_embedded(plain, flipped, issame)
        mags = quality.magnitudes(plain)
        fused = verification.l2_normalize(plain.astype(np.float64) + flipped)
        scores = np.sum(fused[0::2] * fused[1::2], axis=1)
        pairs = np.stack([np.arange(0, len(images), 2), np.arange(1, len(images), 2)], axis=1)
        curve = quality.error_versus_reject(mags, pairs, scores, issame)
        if self.out is not None:
            quality.write_erc_csv(curve, self.out / f"erc_{name}.csv")
            faces, edges, counts = quality.mean_faces(images, mags)
            quality.plot_mean_faces(faces, edges, counts, self.out / f"mean_faces_{name}.png")
        self.magnitudes[name], self.curve[name] = mags, curve
        return {
            "name": name,
            "summary": {
                "accuracy": float(result["accuracy"]),
                "std": float(result["std"]),
                "val": float(result["val"]),
                "val_std": float(result["val_std"]),
                "far": float(result["far"]),
                "xnorm": float(result["xnorm"]),
                "best_thresholds": result["best_thresholds"].tolist(),
                "num_pairs": int(len(issame)),
                "magnitude_mean": float(mags.mean()),
                "magnitude_std": float(mags.std()),
                "erc_fnmr": {
                    f"{r:.2f}": float(f)
                    for r, f in zip(curve["reject_fraction"], curve["fnmr"], strict=True)
                },
            },
            "curve": curve,
            "magnitudes": mags,
        }

    def run(self, encoder) -> dict:
        results = {}
        for path in self.paths:
            summary = self.run_set(encoder, path)
            results[summary["name"]] = {
                k: v
                for k, v in summary["summary"].items()
                if self.fields is None or k in self.fields
            }
        return {"verification": results}
