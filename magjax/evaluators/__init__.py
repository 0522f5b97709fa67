"""Evaluation of a face encoder: one module per kind of evaluation set, each registering its
:class:`Evaluator` in :data:`KINDS`, shared by training and ``python -m magjax.evaluate``.

* ``verification``: 10-fold accuracy of ``.bin`` pair sets (:class:`Verification`);
* ``quality``: the feature norm against known quality levels (:class:`QualitySet`);
* ``ijb``: IJB-B/C 1:1 TAR@FAR of every aggregation mode (:class:`IJB`);
* ``clustering``: BCubed and NMI of several clusterings (:class:`Clustering`).

The metric computations themselves are in :mod:`magjax.eval`. A config names its evaluation
sets in ``config.eval.sets = {name: {"kind": KIND, **options}}`` (besides the shorthand
``eval.bins``, ``eval.quality_set`` and the data's held-out sets) and which result picks
model_best in ``config.eval.best_metric``; training runs them through :class:`Suite`,
``python -m magjax.evaluate`` through :func:`from_specs` (its flags, or ``--sets``). Every module
of this package is imported here, so a new kind is one new module.
"""

import importlib
import pkgutil

from magjax.evaluators.base import (
    DEFAULT_BEST_METRIC,
    KINDS,
    OFF,
    Evaluator,
    Suite,
    chosen_metric,
    configured_sets,
    create,
    flatten,
    from_config,
    from_specs,
    merge,
    register,
    saved_best,
    set_specs,
    spec_problem,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from magjax.evaluators.clustering import Clustering  # noqa: E402
from magjax.evaluators.ijb import IJB  # noqa: E402
from magjax.evaluators.quality import QualitySet  # noqa: E402
from magjax.evaluators.verification import Verification, bin_name  # noqa: E402

__all__ = [
    "DEFAULT_BEST_METRIC",
    "IJB",
    "KINDS",
    "OFF",
    "Clustering",
    "Evaluator",
    "QualitySet",
    "Suite",
    "Verification",
    "bin_name",
    "chosen_metric",
    "configured_sets",
    "create",
    "flatten",
    "from_config",
    "from_specs",
    "merge",
    "register",
    "saved_best",
    "set_specs",
    "spec_problem",
]
