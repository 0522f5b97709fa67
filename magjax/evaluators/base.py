"""The evaluator interface, the registry of kinds, the evaluation sets a config names, and what
training does with them (:class:`Suite`: run them on the current backbone, pick model_best).

Vocabulary, the same in every file: an *evaluation set* is a name and a *kind* with that kind's
options (``config.eval.sets = {"lfw": {"kind": "verification", "paths": "lfw.bin"}}``); the
*evaluator* is the object a kind's class makes of it; ``run(encoder)`` returns its *results*,
sections of the run's report (``{"verification": {"lfw": {...}}}``), whose numbers are named
by their path, ``verification/lfw/accuracy`` (the metrics log's names and ``best_metric``'s).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import pathlib
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from magjax import trees
from magjax.errors import UserError

log = logging.getLogger(__name__)

OFF = ("", "none", "None")  # what switches a set off in config.eval (a CLI gives strings)
# What the runner gives every evaluator that has such a field (not set in a config's sets): the
# set's name (a kind whose results are keyed by set), the batch, where pictures go, progress bars.
RUNTIME_OPTIONS = ("name", "batch_size", "out", "progress")
# The verification numbers training logs and summarises (evaluate writes them all).
TRAINING_FIELDS = ("accuracy", "std", "xnorm")
# What ``eval.best_metric`` was before it existed: the first verification set's accuracy.
DEFAULT_BEST_METRIC = "verification/*/accuracy"


@dataclasses.dataclass
class Evaluator:
    """One kind of evaluation; subclasses are dataclasses whose fields are the kind's options.

    A kind is a subclass in a module of this package, registered with :func:`register` under
    its ``kind``. Fields named in :data:`RUNTIME_OPTIONS` are given by the runner (training's
    ``eval.batch_size``, evaluate's ``--batch``, ``--out``), fields starting with ``_`` are
    internal, the others are the options an evaluation set sets; those in ``path_options`` are
    resolved against the data directory when relative. After :meth:`run`, ``magnitudes``
    (``{name: feature norms of the images embedded}``) and ``curve`` (``{name:
    error-versus-reject curve}``) feed ``python -m magjax.evaluate``'s plots across sets, for
    kinds that have them.
    """

    kind: ClassVar[str]
    path_options: ClassVar[tuple[str, ...]] = ()
    # True when :meth:`run`'s results are keyed by set (several sets of the kind in one report);
    # a kind whose results are not can appear once per run.
    results_by_set: ClassVar[bool] = False

    def __post_init__(self):
        self.magnitudes: dict[str, np.ndarray] = {}
        self.curve: dict[str, dict] = {}

    @classmethod
    def options(cls) -> tuple[str, ...]:
        """The options an evaluation set of this kind may set."""
        return tuple(
            f.name
            for f in dataclasses.fields(cls)
            if f.init and not f.name.startswith("_") and f.name not in RUNTIME_OPTIONS
        )

    def files(self) -> list[pathlib.Path]:
        """The files the evaluation reads, checked before training starts."""
        return [
            pathlib.Path(getattr(self, name))
            for name in self.path_options
            if getattr(self, name) is not None
        ]

    def prepare(self) -> None:
        """Reads what can be read once, before training (a corrupt file fails then)."""

    def run(self, encoder) -> dict:
        """The results of ``encoder`` (a :class:`magjax.encoder.FaceEncoder`) on this set."""
        raise NotImplementedError


KINDS: dict[str, type[Evaluator]] = {}


def register(kind_class: type[Evaluator]) -> type[Evaluator]:
    """Class decorator: makes an :class:`Evaluator` subclass a kind, by its ``kind``."""
    KINDS[kind_class.kind] = kind_class
    return kind_class


def create(
    name: str,
    spec: Mapping[str, Any],
    *,
    data_dir: pathlib.Path | None = None,
    where: str = "config.eval.sets",
    **runtime: Any,
) -> Evaluator:
    """The evaluator of the evaluation set ``name``: ``spec`` is ``{"kind": ..., **options}``;
    relative paths among the options are resolved against ``data_dir``; ``runtime``
    (:data:`RUNTIME_OPTIONS`, or an option's default for this runner) is given to the kinds
    that have such a field, where ``spec`` does not set it. ``where``: what errors name."""
    problem = spec_problem(name, spec, where)
    if problem:
        raise UserError(problem)
    kind_class = KINDS[spec["kind"]]
    options = {key: value for key, value in spec.items() if key != "kind"}
    for key in kind_class.path_options:
        if options.get(key) is not None:
            options[key] = _resolve(options[key], data_dir)
    fields = {f.name for f in dataclasses.fields(kind_class)}
    for key, value in {"name": name, **runtime}.items():
        if key in fields:
            options.setdefault(key, value)
    return kind_class(**options)


def spec_problem(name: str, spec: Any, where: str = "config.eval.sets") -> str | None:
    """What is wrong with the evaluation set ``name`` (``config.eval.sets.NAME``), or None."""
    where = f"{where}.{name}"
    if not isinstance(spec, Mapping) or spec.get("kind") not in KINDS:
        got = spec.get("kind") if isinstance(spec, Mapping) else spec
        return f"{where}.kind must be one of the evaluator kinds {sorted(KINDS)}, got {got!r}"
    kind_class = KINDS[spec["kind"]]
    unknown = sorted(set(spec) - {"kind", *kind_class.options()})
    if unknown:
        return (
            f"{where}: the {spec['kind']} evaluator has no option {', '.join(unknown)} "
            f"(its options: {', '.join(kind_class.options())})"
        )
    required = [
        f.name
        for f in dataclasses.fields(kind_class)
        if f.name in kind_class.options()
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    missing = [key for key in required if key not in spec]
    if missing:
        return f"{where}: the {spec['kind']} evaluator needs {', '.join(missing)}"
    return None


def _resolve(value: Any, data_dir: pathlib.Path | None) -> pathlib.Path | list[pathlib.Path]:
    """A path option as a path, relative to ``data_dir``; a list of them from a list or from a
    comma-separated string (``--config.eval.sets.x.paths=a.bin,b.bin`` gives one string)."""
    if isinstance(value, str) and "," in value:
        value = [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, (list, tuple)):
        return [_resolve(item, data_dir) for item in value]
    return (data_dir or pathlib.Path()) / value  # an absolute value stays itself


def configured_sets(
    eval_config, data_dir: pathlib.Path
) -> tuple[list[pathlib.Path], pathlib.Path | None]:
    """``(verification .bin paths, quality set or None)`` that ``eval_config``'s shorthand
    fields name (``config.eval``, or its saved JSON): the held-out sets the prepared data in
    ``data_dir`` holds (its manifest's, with ``heldout_sets``) and those of ``bins`` and
    ``quality_set``, relative ones resolved against ``data_dir``. ``--config.eval.bins=a.bin,
    b.bin`` arrives as one string and is split; empty and "none" entries are no set."""
    from magjax.data import prepared

    bins = [
        name.strip()
        for entry in eval_config["bins"]
        if entry is not None
        for name in str(entry).split(",")
        if name.strip() not in OFF
    ]
    quality_set = eval_config["quality_set"] if eval_config["quality_set"] not in OFF else None
    manifest_path = data_dir / prepared.MANIFEST
    if eval_config.get("heldout_sets", True) and manifest_path.is_file():
        manifest = prepared.read_manifest(manifest_path)
        bins = [*manifest.get("verification_bins", []), *bins]
        quality_set = quality_set or manifest.get("quality_set")
    paths = list(dict.fromkeys(data_dir / name for name in bins))
    return paths, (data_dir / quality_set) if quality_set else None


def set_specs(eval_config, data_dir: pathlib.Path) -> dict[str, dict]:
    """Every evaluation set ``eval_config`` names, ``{name: {"kind": ..., **options}}``: those
    of its shorthand fields first (:func:`configured_sets`: one ``verification`` set of every
    ``.bin``, one ``quality`` set), then ``eval_config["sets"]`` (absent from the config.json of
    runs saved before it existed)."""
    bins, quality_set = configured_sets(eval_config, data_dir)
    specs: dict[str, dict] = {}
    if bins:
        specs["verification"] = {"kind": "verification", "paths": [str(p) for p in bins]}
    if quality_set is not None:
        specs["quality"] = {"kind": "quality", "path": str(quality_set)}
    for name, spec in dict(eval_config.get("sets") or {}).items():
        if name in specs:
            raise UserError(
                f"config.eval.sets.{name}: the name of a set config.eval.bins / "
                "quality_set / heldout_sets already gives; choose another"
            )
        specs[name] = dict(spec)
    return specs


def from_specs(
    specs: Mapping[str, Mapping],
    *,
    data_dir: pathlib.Path | None = None,
    where: str = "config.eval.sets",
    **runtime: Any,
) -> dict[str, Evaluator]:
    """The evaluators of ``specs`` by set name (:func:`create`); a kind whose results are not
    keyed by set appears once."""
    built = {
        name: create(name, spec, data_dir=data_dir, where=where, **runtime)
        for name, spec in specs.items()
    }
    seen: dict[str, str] = {}
    for name, evaluator in built.items():
        if not evaluator.results_by_set and evaluator.kind in seen:
            raise UserError(
                f"{where}: {seen[evaluator.kind]} and {name} are both "
                f"{evaluator.kind} sets, whose results one run holds once; keep one"
            )
        seen.setdefault(evaluator.kind, name)
    return built


def from_config(config, data_dir: pathlib.Path) -> dict[str, Evaluator]:
    """The evaluators ``config.eval`` names (:func:`set_specs`), by set name. Fails now, not at
    the first evaluation, when a file one reads is missing, and says in one line what will be
    evaluated (or that nothing will)."""
    built = from_specs(
        set_specs(config.eval, data_dir),
        data_dir=data_dir,
        batch_size=config.eval.batch_size,
        fields=TRAINING_FIELDS,
    )
    paths = [path for evaluator in built.values() for path in evaluator.files()]
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise UserError(
            f"config.eval: {', '.join(missing)} not found; name existing files in "
            "--config.eval.bins / --config.eval.quality_set / config.eval.sets, or "
            "switch them off with =none"
        )
    if built:
        log.info(
            "evaluating every %d steps on %s",
            config.eval.every_steps,
            ", ".join(map(str, paths)) or ", ".join(built),
        )
    else:
        log.info(
            "no evaluation: %s holds no held-out set and config.eval names none (prepare "
            "with --holdout N, or pass --config.eval.bins=/path/to/lfw.bin)",
            data_dir,
        )
    return built


def merge(report: dict, results: Mapping) -> dict:
    """``results`` added to ``report``: a section both have (``verification``) is joined."""
    for key, value in results.items():
        if isinstance(value, Mapping) and isinstance(report.get(key), dict):
            report[key].update(value)
        else:
            report[key] = value
    return report


def flatten(results: Mapping, prefix: str = "") -> dict[str, Any]:
    """The numbers of ``results`` by path: ``{"verification/lfw/accuracy": 0.99, ...}``."""
    return trees.flatten(results, "/", prefix=prefix)


def chosen_metric(results: Mapping, best_metric: str) -> tuple[str, float] | None:
    """``(name, value)`` of the first number of ``results`` whose path matches the pattern
    ``best_metric`` (``fnmatch``: ``verification/*/accuracy`` is the first verification set's
    accuracy), or None when no number matches."""
    for name, value in flatten(results).items():
        if fnmatch.fnmatchcase(name, best_metric) and isinstance(value, (int, float)):
            return name, float(value)
    return None


def saved_best(best: Mapping | None) -> dict | None:
    """A checkpoint's ``best`` record as :class:`Suite` keeps it: runs saved before
    ``eval.best_metric`` existed recorded ``{"accuracy", "step"}``, their default metric's."""
    if not best:
        return None
    if "value" in best:
        return dict(best)
    if best.get("accuracy") is None:
        return None
    return {"metric": DEFAULT_BEST_METRIC, "value": best["accuracy"], "step": best["step"]}


class Suite:
    """What training evaluates (:func:`from_config`), run on the current backbone through one
    encoder built once (its variables are replaced before each evaluation, no recompilation),
    and the rule that picks model_best (``eval.best_metric``, higher is better)."""

    def __init__(self, evaluators: Mapping[str, Evaluator], config, input_spec: dict, dtype: Any):
        from magjax.encoder import FaceEncoder

        self.evaluators = dict(evaluators)
        self.best_metric = config.eval.get("best_metric", DEFAULT_BEST_METRIC)
        self.encoder = None
        for evaluator in self.evaluators.values():
            evaluator.prepare()
        if self.evaluators:
            abstract = {"params": None, "batch_stats": None}
            self.encoder = FaceEncoder(
                config.model.arch,
                abstract,
                input_spec,
                embedding_dim=config.model.embedding_dim,
                batch_size=config.eval.batch_size,
                dtype=dtype,
            )

    def __call__(self, variables: Any) -> dict:
        """The results of every set on the backbone ``variables`` (``{"params",
        "batch_stats"}`` on the host); {} when the run evaluates nothing."""
        if self.encoder is None:
            return {}
        self.encoder.variables = variables
        report: dict = {}
        for evaluator in self.evaluators.values():
            merge(report, evaluator.run(self.encoder))
        return report

    def improved(self, best: dict | None, results: Mapping, step: int) -> dict | None:
        """The new ``{"metric", "value", "step"}`` record when ``results`` beat ``best``
        on ``best_metric``, else None."""
        chosen = chosen_metric(results, self.best_metric)
        if chosen is None or (best is not None and not chosen[1] > best["value"]):
            return None
        return {"metric": chosen[0], "value": chosen[1], "step": step}
