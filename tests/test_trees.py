"""magjax.trees.flatten: the one flattener of configs and evaluation results."""

from magjax import config_check, trees
from magjax.evaluators import base


def test_flatten_names_leaves_by_path_and_keeps_empty_fields_only_when_asked():
    tree = {"data": {"dir": None, "synthetic_options": {}}, "optim": {"lr": 0.1}, "seed": 0}
    assert trees.flatten(tree, "/") == {"data/dir": None, "optim/lr": 0.1, "seed": 0}
    # A config's empty field is a field: resuming compares it like any other.
    assert config_check.flatten(tree) == {
        "data.dir": None,
        "data.synthetic_options": {},
        "optim.lr": 0.1,
        "seed": 0,
    }
    assert list(
        base.flatten({"verification": {"lfw": {"accuracy": 0.9, "val": 0.5}}, "quality": {}})
    ) == ["verification/lfw/accuracy", "verification/lfw/val"]
