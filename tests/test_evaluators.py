"""The registry of evaluation kinds: one registration serves training (``config.eval.sets``) and
``python -m magjax.evaluate``; ``config.eval.best_metric`` picks model_best; bad sets are named."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from magjax import checkpoint, cli, config_check, evaluate, evaluators, recipes, train
from magjax.errors import UserError

SYNTHETIC = dict(
    num_identities=12,
    images_per_identity=4,
    num_heldout=4,
    num_pairs=20,
    quality_images_per_level=1,
)


@dataclasses.dataclass
class MeanNorm(evaluators.Evaluator):
    """A kind as the next person would add one (a module of magjax/evaluators with @register):
    the mean feature norm of an ``.npz``'s ``images``, keyed by the set's name."""

    kind = "mean_norm"
    path_options = ("path",)
    results_by_set = True

    path: pathlib.Path
    name: str = ""

    def run(self, encoder) -> dict:
        with np.load(self.path) as data:
            norms = encoder.encode(data["images"])[1]
        return {"mean_norm": {self.name: {"mean": float(norms.mean())}}}


@pytest.fixture
def mean_norm_kind():
    evaluators.register(MeanNorm)  # the one registration
    yield MeanNorm
    del evaluators.KINDS[MeanNorm.kind]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from magjax import data

    return data.prepare("synthetic", None, tmp_path_factory.mktemp("data") / "tiny", **SYNTHETIC)


def test_a_kind_registered_once_serves_training_and_evaluate(
    mean_norm_kind, dataset, tmp_path, capsys
):
    from magjax.encoder import FaceEncoder

    config = recipes.get_config("arcface", "demo")
    config.data.update(dir=str(dataset), synthetic=False)
    config.model.embedding_dim = 32
    config.update(global_batch=16, total_steps=2, log_every_steps=1, num_devices=1)
    config.checkpoint.every_steps = 1000
    # Only the new kind's set (relative to the data), evaluated at every step; it picks
    # model_best, which the default (a verification accuracy) could not: there is none.
    config.eval.update(every_steps=1, heldout_sets=False, best_metric="mean_norm/*/mean")
    config.eval.sets = {"faces": {"kind": "mean_norm", "path": "quality.npz"}}
    workdir = tmp_path / "run"
    summary = train.train_and_evaluate(config, str(workdir))

    images = np.load(dataset / "quality.npz")["images"]
    final = FaceEncoder.load(workdir).encode(images)[1].mean()
    assert summary["mean_norm"]["faces"]["mean"] == pytest.approx(final, rel=1e-5)
    assert "verification" not in summary or not summary["verification"]
    logged = {
        r["step"]: r["mean_norm/faces/mean"]
        for r in map(json.loads, (workdir / "metrics.jsonl").open())
        if r["kind"] == "eval"
    }
    assert sorted(logged) == [1, 2]
    best_step = max(logged, key=logged.get)
    assert summary["best"] == {
        "metric": "mean_norm/faces/mean",
        "value": logged[best_step],
        "step": best_step,
    }
    _, meta = checkpoint.load_inference_model(workdir / "model_best")
    assert meta["step"] == best_step

    # evaluate: the run's own sets (its config.json), then the kind named on the command line.
    assert (
        evaluate.main(["--workdir", str(workdir), "--out", str(tmp_path / "own"), "--no-progress"])
        == 0
    )
    own = json.loads((tmp_path / "own" / "eval.json").read_text())
    assert own["mean_norm"]["faces"]["mean"] == pytest.approx(final, rel=1e-5)
    assert "mean_norm/faces/mean" in capsys.readouterr().out  # in the printed table too
    named = json.dumps({"again": {"kind": "mean_norm", "path": str(dataset / "quality.npz")}})
    assert (
        evaluate.main(
            [
                "--workdir",
                str(workdir),
                "--sets",
                named,
                "--out",
                str(tmp_path / "named"),
                "--no-progress",
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "named" / "eval.json").read_text())
    assert again["mean_norm"] == {"again": {"mean": pytest.approx(final, rel=1e-5)}}


def test_best_metric_is_the_first_match_and_only_a_higher_value_replaces_it():
    results = {
        "verification": {
            "lfw": {"accuracy": 0.9, "std": 0.01},
            "cfp": {"accuracy": 0.95, "std": 0.02},
        },
        "quality": {"spearman_norm_vs_quality": 0.4},
    }
    config = recipes.get_config("arcface", "demo")
    suite = evaluators.Suite({}, config, {}, np.float32)
    # The default: the first verification set's accuracy, as before best_metric existed.
    assert suite.improved(None, results, 7) == {
        "metric": "verification/lfw/accuracy",
        "value": 0.9,
        "step": 7,
    }
    config.eval.best_metric = "quality/spearman_norm_vs_quality"
    suite = evaluators.Suite({}, config, {}, np.float32)
    best = {"metric": "quality/spearman_norm_vs_quality", "value": 0.4, "step": 3}
    assert suite.improved(best, results, 7) is None  # equal: the earlier model stays
    assert suite.improved({**best, "value": 0.3}, results, 7) == {**best, "step": 7}
    assert evaluators.chosen_metric(results, "verification/cfp/*") == (
        "verification/cfp/accuracy",
        0.95,
    )
    assert evaluators.chosen_metric(results, "ijb/*") is None


def test_a_checkpoints_best_record_of_an_earlier_version_is_read():
    assert evaluators.saved_best({"accuracy": 0.8, "step": 4}) == {
        "metric": "verification/*/accuracy",
        "value": 0.8,
        "step": 4,
    }
    assert evaluators.saved_best({"accuracy": None, "step": None}) is None
    assert evaluators.saved_best(None) is None


def test_a_run_saved_before_eval_sets_and_best_metric_resumes():
    current = config_check.as_json_dict(recipes.get_config("magface", "demo"))
    saved = json.loads(json.dumps(current))
    del saved["eval"]["sets"], saved["eval"]["best_metric"]
    assert config_check.changed_fields(saved, current) == []
    current["eval"]["best_metric"] = "quality/*"
    assert config_check.changed_fields(saved, current) == [
        "eval.best_metric: 'verification/*/accuracy' -> 'quality/*'"
    ]


def test_the_shorthand_fields_become_sets_of_their_kinds(tmp_path):
    config = recipes.get_config("arcface", "demo")
    config.eval.update(bins=("a.bin,b.bin",), quality_set="q.npz")
    config.eval.sets = {"ijbc": {"kind": "ijb", "root": "/data/IJB", "target": "IJBC"}}
    assert evaluators.set_specs(config.eval, tmp_path) == {
        "verification": {
            "kind": "verification",
            "paths": [str(tmp_path / "a.bin"), str(tmp_path / "b.bin")],
        },
        "quality": {"kind": "quality", "path": str(tmp_path / "q.npz")},
        "ijbc": {"kind": "ijb", "root": "/data/IJB", "target": "IJBC"},
    }
    built = evaluators.from_specs(
        evaluators.set_specs(config.eval, tmp_path), data_dir=tmp_path, batch_size=8
    )
    assert [type(e) for e in built.values()] == [
        evaluators.Verification,
        evaluators.QualitySet,
        evaluators.IJB,
    ]
    assert built["ijbc"].root == pathlib.Path("/data/IJB") and built["ijbc"].batch_size == 8


@pytest.mark.parametrize(
    "spec, expected",
    [
        (
            {"kind": "lfw"},
            "config.eval.sets.x.kind must be one of the evaluator kinds "
            "['clustering', 'ijb', 'quality', 'verification'], got 'lfw'",
        ),
        (
            {"kind": "quality", "paths": "q.npz"},
            "config.eval.sets.x: the quality evaluator has no option paths (its options: path)",
        ),
        ({"kind": "ijb", "target": "IJBB"}, "config.eval.sets.x: the ijb evaluator needs root"),
    ],
)
def test_a_bad_evaluation_set_is_named_before_anything_runs(spec, expected):
    config = recipes.get_config("arcface", "demo")
    config.eval.sets = {"x": spec}
    assert config_check.problems(config) == [expected]


def test_evaluate_names_a_bad_sets_argument_in_one_line(tmp_path, capsys):
    for sets, expected in (
        ("{lfw", "error: --sets is not JSON"),
        (
            '{"a": {"kind": "quality", "path": "a.npz"}, "b": {"kind": "quality", "path": '
            '"b.npz"}}',
            "error: --sets: a and b are both quality sets",
        ),
        ('{"a": {"kind": "nope"}}', "error: --sets.a.kind must be one of"),
    ):
        assert evaluate.main(["--workdir", str(tmp_path), "--sets", sets]) == (cli.EXIT_USER_ERROR)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(expected), err


def test_two_sets_of_a_kind_held_once_per_run_are_refused(tmp_path):
    specs = {"q1": {"kind": "quality", "path": "a.npz"}, "q2": {"kind": "quality", "path": "b"}}
    with pytest.raises(UserError, match="q1 and q2 are both quality sets"):
        evaluators.from_specs(specs, data_dir=tmp_path)


def test_a_set_named_like_a_shorthand_one_or_an_empty_best_metric_is_refused(tmp_path):
    config = recipes.get_config("arcface", "demo")
    config.eval.bins = ("lfw.bin",)
    config.eval.sets = {"verification": {"kind": "verification", "paths": "cfp_fp.bin"}}
    with pytest.raises(UserError, match=r"^config.eval.sets.verification: the name of a set "):
        evaluators.set_specs(config.eval, tmp_path)
    config.eval.sets = {}
    config.eval.best_metric = " "
    assert config_check.problems(config) == [
        "config.eval.best_metric must be a metric's name as logged, '*' matching any part "
        "(e.g. 'verification/*/accuracy'), got ' '"
    ]
