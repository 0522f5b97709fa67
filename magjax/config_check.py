"""Checks of a training config before anything runs, and of a resumed run against its saved config.

* :func:`validate`: every field's range (``optim.lr > 0``, ``checkpoint.every_steps >= 1``,
  ``head.sample_rate`` in (0, 1] ...) and loss fields the chosen loss does not read but that
  differ from its default (``--config.loss.u_a=5`` on ArcFace). All problems are reported at
  once, in one :class:`~magjax.errors.UserError`.
* :func:`save_or_compare`: a fresh run saves its resolved config as ``WORKDIR/config.json``; a
  resumed run names every field that differs from it and stops unless the change is allowed.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
from collections.abc import Callable
from typing import Any

import ml_collections

from magjax import files, losses, models, optim, recipes, trees
from magjax.data import augment
from magjax.errors import UserError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# Fields a resumed run may change without changing what it trains: the device layout (a
# checkpoint restores on another device count), input workers, where the data lives, the
# evaluation batch size, whether the data's held-out sets are evaluated, the head's class block
# (the same loss, in less memory). The last two are also absent from the config.json of runs
# started before they existed, which must still resume.
RESUMABLE_FIELDS = frozenset(
    {
        "num_devices",
        "cpu_devices",
        "data.dir",
        "data.num_workers",
        "eval.batch_size",
        "eval.heldout_sets",
        "head.block_size",
    }
)
# Fields that change what a run trains, added after runs were saved without them: a saved config
# lacking one trained with its default (``recipes.base_config``; every run before AdamW was SGD),
# so it resumes as long as the field keeps that value, and a change is named like any other.
ADDED_FIELDS = (
    "optim.optimizer",
    "optim.adam_betas",
    "optim.adam_eps",
    "eval.sets",
    "eval.best_metric",
)


def _number(value: Any) -> bool:
    """A finite int or float: every range rule refuses NaN (comparisons with NaN are false) and,
    through this, infinity (``--config.optim.lr=inf`` is > 0 and would pass otherwise)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _at_least_one(value: Any) -> bool:
    return _number(value) and value >= 1 and float(value).is_integer()


def _non_negative(value: Any) -> bool:
    return _number(value) and value >= 0


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda value: value in choices


# (field, check, what is expected); None-valued optional fields are "not set".
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("num_devices", _optional(_at_least_one), "an integer >= 1 (or unset: every device)"),
    ("cpu_devices", _optional(_at_least_one), "an integer >= 1 (or unset)"),
    ("global_batch", _at_least_one, "an integer >= 1"),
    ("epochs", _positive, "> 0"),
    ("total_steps", _optional(_at_least_one), "an integer >= 1 (or unset: from epochs)"),
    ("log_every_steps", _at_least_one, "an integer >= 1"),
    ("nan_policy", _one_of("stop", "skip"), "'stop' or 'skip'"),
    ("data.num_classes", _optional(_at_least_one), "an integer >= 1 (or unset: from the data)"),
    ("data.num_examples", _optional(_at_least_one), "an integer >= 1 (or unset: from the data)"),
    ("data.augment", _one_of(*augment.AUGMENTATIONS), f"one of {augment.AUGMENTATIONS}"),
    ("data.num_workers", lambda v: _non_negative(v) and float(v).is_integer(), "an integer >= 0"),
    ("model.arch", _one_of(*models.ARCHS), f"one of the archs {', '.join(models.ARCHS)}"),
    (
        "model.dtype",
        _one_of("float32", "bfloat16", "float16"),
        "'float32', 'bfloat16' or 'float16'",
    ),
    ("model.dropout", _optional(lambda v: _number(v) and 0 <= v < 1), "in [0, 1) (or unset)"),
    ("model.embedding_dim", _at_least_one, "an integer >= 1"),
    ("model.batchnorm_stats", _one_of(*models.BATCHNORM_STATS), f"one of {models.BATCHNORM_STATS}"),
    ("loss.name", _one_of(*losses.registered()), f"one of {tuple(losses.registered())}"),
    ("loss.s", _positive, "> 0"),
    ("head.sample_rate", lambda v: _number(v) and 0 < v <= 1, "in (0, 1]"),
    (
        "head.block_size",
        _optional(lambda v: v == 0 or _at_least_one(v)),
        "an integer >= 1, 0 (the dense head) or unset (chosen from the memory)",
    ),
    ("optim.lr", _positive, "> 0"),
    ("optim.optimizer", _one_of(*optim.OPTIMIZERS), f"one of {optim.OPTIMIZERS}"),
    ("optim.momentum", lambda v: _number(v) and 0 <= v < 1, "in [0, 1)"),
    (
        "optim.adam_betas",
        lambda v: (
            isinstance(v, (tuple, list))
            and len(v) == 2
            and all(_number(b) and 0 <= b < 1 for b in v)
        ),
        "two numbers in [0, 1)",
    ),
    ("optim.adam_eps", _non_negative, ">= 0"),
    ("optim.weight_decay", _non_negative, ">= 0"),
    ("optim.schedule", _one_of("poly", "step"), "'poly' or 'step'"),
    ("optim.warmup_epochs", _non_negative, ">= 0"),
    (
        "optim.milestones",
        lambda v: all(_non_negative(e) for e in v) and list(v) == sorted(v),
        "increasing epochs >= 0",
    ),
    ("optim.grad_clip_norm", _optional(_positive), "> 0 (or unset: no clipping)"),
    ("optim.grad_clip_eps", _non_negative, ">= 0"),
    ("optim.warmup_style", _one_of(*optim.WARMUP_STYLES), f"one of {optim.WARMUP_STYLES}"),
    (
        "optim.grad_allreduce_dtype",
        _one_of(*optim.GRAD_ALLREDUCE_DTYPES),
        f"one of {optim.GRAD_ALLREDUCE_DTYPES}",
    ),
    ("optim.accumulate_steps", _at_least_one, "an integer >= 1"),
    ("eval.every_steps", _at_least_one, "an integer >= 1"),
    ("eval.batch_size", _at_least_one, "an integer >= 1"),
    (
        "eval.best_metric",
        lambda v: isinstance(v, str) and bool(v.strip()),
        "a metric's name as logged, '*' matching any part (e.g. 'verification/*/accuracy')",
    ),
    ("checkpoint.every_steps", _at_least_one, "an integer >= 1"),
    ("checkpoint.keep", _at_least_one, "an integer >= 1"),
)


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def problems(config: ml_collections.ConfigDict, device_count: int | None = None) -> list[str]:
    """Every problem of ``config``, one phrase each (empty when it is valid).

    ``device_count``: the devices available, against which ``num_devices`` and the divisibility
    of ``global_batch`` are checked (skipped when None).
    """
    found = []
    for field, check, expected in _RULES:
        value = _get(config, field)
        if not check(value):
            found.append(f"config.{field} must be {expected}, got {value!r}")
    # Every other float field too (loss margins, augmentation strengths ...): no field of a
    # config means anything by NaN or infinity.
    ruled = {field for field, _, _ in _RULES}
    for field, value in flatten(config.to_dict()).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if field not in ruled and any(
            isinstance(v, float) and not math.isfinite(v) for v in values
        ):
            found.append(f"config.{field} must be a finite number, got {value!r}")
    found += _foreign_loss_fields(config.loss)
    found += _evaluation_set_problems(config.eval.sets)
    if (
        config.head.freeze_unsampled
        and config.head.sample_rate < 1
        and config.optim.accumulate_steps > 1
    ):
        # Each micro-batch samples other classes, and keep_unsampled_rows would restore the
        # accumulated gradient and the update of every row the last micro-batch did not sample.
        found.append(
            "config.head.freeze_unsampled cannot be combined with "
            "config.optim.accumulate_steps > 1 (each micro-batch samples other classes); "
            "set head.freeze_unsampled=False, as arcface_torch"
        )
    if not found and device_count is not None:
        devices = config.num_devices or device_count
        if devices > device_count:
            found.append(
                f"config.num_devices is {devices} but only {device_count} devices are available"
            )
        elif config.global_batch % devices:
            found.append(
                f"config.global_batch {config.global_batch} must be a multiple of the "
                f"{devices} devices"
            )
    return found


def _foreign_loss_fields(loss_config: ml_collections.ConfigDict) -> list[str]:
    """Loss fields that are not hyper-parameters of ``loss.name`` (a loss switched by setting
    ``config.loss.name`` keeps the other loss's fields)."""
    name = loss_config.name
    loss_class = losses.registered().get(name)
    if loss_class is None:
        return []  # reported by the loss.name rule
    own = loss_class.field_names()
    return [
        f"config.loss.{field} is not a hyper-parameter of the {name} loss (it has "
        f"{', '.join(own)}); choose the loss by its config file, configs/{name}.py"
        for field in loss_config
        if field != "name" and field not in own
    ]


def _evaluation_set_problems(sets: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with each of ``config.eval.sets`` (a kind that is none of
    :data:`magjax.evaluators.KINDS`, an option the kind does not have, one it needs)."""
    from magjax import evaluators  # scikit-learn and the readers: only for a config with sets

    found = []
    for name, spec in sets.items():
        spec = spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else spec
        problem = evaluators.spec_problem(name, spec)
        if problem:
            found.append(problem)
    return found


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raises one :class:`UserError` naming every problem of ``config`` (see :func:`problems`)."""
    found = problems(config, device_count)
    if found:
        raise UserError("; ".join(found))


def flatten(config: dict) -> dict[str, Any]:
    """The fields of a config's dict by dotted name: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    return trees.flatten(config, ".", keep_empty=True)


def as_json_dict(config: ml_collections.ConfigDict) -> dict:
    """``config`` as plain JSON values (tuples become lists), as it is saved."""
    return json.loads(config.to_json(sort_keys=True))


def changed_fields(saved: dict, current: dict) -> list[str]:
    """``field: saved -> current`` for every field that differs, resumable ones excepted (a field
    of :data:`ADDED_FIELDS` absent from ``saved`` counts as its default)."""
    old, new = flatten(saved), flatten(current)
    defaults = flatten(as_json_dict(recipes.base_config()))
    for key in ADDED_FIELDS:
        old.setdefault(key, defaults[key])
    return [
        f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
        for key in sorted(old.keys() | new.keys())
        if key not in RESUMABLE_FIELDS
        and old.get(key) != new.get(key)
        # NaN (e.g. loss.s) compares unequal to itself
        and not (_is_nan(old.get(key)) and _is_nan(new.get(key)))
    ]


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def save_or_compare(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    *,
    resuming: bool,
    allow_change: bool,
    write: bool = True,
) -> None:
    """Saves ``config`` as ``workdir/config.json``, or, when ``resuming``, compares it first.

    A resumed run whose config differs from the saved one (other than in
    :data:`RESUMABLE_FIELDS`) raises a :class:`UserError` naming every changed field, unless
    ``allow_change``: then the changes are logged and the new config is saved. ``write``: False
    on processes other than 0, which only compare.
    """
    path = workdir / CONFIG_FILE
    current = as_json_dict(config)
    if resuming and path.exists():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path} is not valid JSON ({error}); it holds the config of the run "
                "being resumed: restore it or delete it to accept the current config"
            ) from None
        changes = changed_fields(saved, current)
        if changes and not allow_change:
            raise UserError(
                f"the config differs from the one {workdir} was started with ({path}): "
                + "; ".join(changes)
                + ". Rerun with the saved values, use another --workdir, or pass "
                "--allow-config-change to resume with the new ones"
            )
        if not changes:
            return
        log.warning("resuming with a changed config (allowed): %s", "; ".join(changes))
    if write:
        files.write_text_atomically(path, json.dumps(current, indent=2, sort_keys=True))
