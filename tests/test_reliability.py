"""Nothing lost, nothing silent (issue 15, the run side): a finished run left as it is, a damaged
checkpoint skipped for the newest intact one, config checks and the saved config, dataset
counts from the data, library chatter kept off the console."""

import io
import json
import logging
import pathlib
import shutil
from contextlib import redirect_stderr

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import SYNTHETIC

from magjax import checkpoint, config_check, logs, losses, parallel, recipes, train
from magjax.errors import UserError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from magjax import data

    return data.prepare("synthetic", None, tmp_path_factory.mktemp("data") / "tiny", **SYNTHETIC)


def own_data_config(dataset, variant="tiny", **overrides):
    """The ArcFace recipe on the tiny synthetic set as a user's own data (no dataset named):
    4 steps on one device, checkpoints at steps 2 and 4, no evaluation."""
    config = recipes.get_config("arcface", variant)
    config.data.dir = str(dataset)
    config.model.update(dtype="float32", embedding_dim=32)
    config.update(num_devices=1, global_batch=16, total_steps=4, log_every_steps=1)
    config.eval.update(every_steps=1000, heldout_sets=False)
    config.checkpoint.update(every_steps=2, keep=3)
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    return config


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def magjax_log():
    """The messages magjax logs (INFO and up) during a test."""
    handler, logger = _Collect(), logging.getLogger("magjax")
    previous = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(previous)


@pytest.fixture(scope="module")
def finished_run(dataset, tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4), its console output and log messages."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    handler, logger = _Collect(), logging.getLogger("magjax")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    console = io.StringIO()
    try:
        with redirect_stderr(console):
            summary = train.train_and_evaluate(own_data_config(dataset), str(workdir))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    return workdir, summary, console.getvalue(), handler.messages


def copy_of(finished_run, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    return workdir


def test_own_data_takes_its_counts_and_says_what_it_trains(finished_run):
    # Before: the recipe's MS1MV2 counts (85742 classes) failed against the 12-identity data.
    workdir, summary, console, messages = finished_run
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
    assert any("num_classes=12, num_examples=48 taken from the data" in m for m in messages)
    facts = next(m for m in messages if m.startswith("training "))
    assert "arcface on tiny (float32): 12 classes, 48 images" in facts
    assert "global batch 16 on 1 cpu device" in facts and "4 steps" in facts
    saved = json.loads((workdir / config_check.CONFIG_FILE).read_text())
    assert (saved["data"]["num_classes"], saved["data"]["num_examples"]) == (12, 48)
    # one progress line per step; an ETA once a step past the compiled first one is timed
    progress = [line for line in console.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in progress] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert all(" eta " in line for line in progress[1:])


def test_named_dataset_that_disagrees_names_both_counts(dataset, tmp_path):
    config = own_data_config(dataset, "tiny,ms1mv3")
    with pytest.raises(UserError) as info:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    message = str(info.value)
    assert "config.data.num_classes is 93431 but the data has 12" in message
    assert "config.data.num_examples is 5179510 but the data has 48" in message
    assert "(dataset 'ms1mv3')" in message and "--config.data.num_classes=12" in message


def test_rerunning_a_finished_run_leaves_its_results(finished_run, dataset, tmp_path, magjax_log):
    # Before: summary.json rewritten with wall_s ~0, final_loss NaN and no results.
    workdir = copy_of(finished_run, tmp_path)
    files = {name: (workdir / name).read_bytes() for name in ("summary.json", "metrics.jsonl")}
    again = train.train_and_evaluate(own_data_config(dataset), str(workdir))
    assert again == json.loads(files["summary.json"])
    assert again["final_loss"] == pytest.approx(finished_run[1]["final_loss"])
    for name, content in files.items():
        assert (workdir / name).read_bytes() == content, name
    assert any("is finished (step 4 of 4)" in m for m in magjax_log)


def test_summary_lost_after_the_last_checkpoint_is_recomputed(finished_run, dataset, tmp_path):
    # A run stopped between its final checkpoint and its summary: rerunning it writes the
    # summary of the saved state (its loss from the checkpoint, never NaN) and trains nothing.
    workdir = copy_of(finished_run, tmp_path)
    (workdir / "summary.json").unlink()
    summary = train.train_and_evaluate(own_data_config(dataset), str(workdir))
    written = json.loads(
        (workdir / "summary.json").read_text(),
        parse_constant=lambda name: pytest.fail(f"{name} in summary.json"),
    )
    assert written["steps"] == 4 and summary["steps"] == 4
    assert written["params_sha256"] == finished_run[1]["params_sha256"]
    assert written["final_loss"] == pytest.approx(finished_run[1]["final_loss"])


def test_summary_json_writes_non_finite_numbers_as_null():
    text = train.summary_json(
        {
            "final_loss": float("nan"),
            "best": {"accuracy": float("inf")},
            "steps": 3,
            "verification": {},
        }
    )
    assert json.loads(text, parse_constant=lambda name: pytest.fail(name)) == {
        "final_loss": None,
        "best": {"accuracy": None},
        "steps": 3,
        "verification": {},
    }


def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    finished_run, dataset, tmp_path, magjax_log
):
    """Training resumes from step 2 when step 4's array data is truncated, and ends with the
    parameters of the undamaged run (exact resume from the older checkpoint)."""
    workdir = copy_of(finished_run, tmp_path)
    (workdir / "summary.json").unlink()  # interrupted after its last checkpoint
    _damage(workdir / "checkpoints" / "4", "truncated array file")
    summary = train.train_and_evaluate(own_data_config(dataset), str(workdir))
    assert summary["params_sha256"] == finished_run[1]["params_sha256"]
    warning = next(m for m in magjax_log if "damaged" in m)
    assert "checkpoint step 4" in warning and "OUT_OF_RANGE" in warning
    assert any("resumed from step 2" in m for m in magjax_log)
    assert (workdir / "checkpoints_damaged" / "4").is_dir()  # kept aside, not deleted
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


DAMAGES = (
    "truncated array file",
    "deleted meta/",
    "deleted _METADATA",
    "deleted manifest",
    "empty step directory",
)


def _damage(step_dir: pathlib.Path, kind: str) -> None:
    if kind == "truncated array file":
        biggest = max((step_dir / "state" / "d").iterdir(), key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    elif kind == "deleted meta/":
        shutil.rmtree(step_dir / "meta")
    elif kind == "deleted _METADATA":
        (step_dir / "state" / "_METADATA").unlink()
    elif kind == "deleted manifest":
        (step_dir / "state" / "manifest.ocdbt").unlink()
    elif kind == "empty step directory":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
    else:
        raise AssertionError(kind)


def _small_state(value: float) -> dict:
    """A train-state-shaped pytree: class rows sharded over 8 devices, an empty margin state
    and an optax state (whose structure orbax can only rebuild from _METADATA)."""
    mesh = parallel.make_mesh(8)
    rows = jax.device_put(
        jnp.full((16, 4), value),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.DATA_AXIS)),
    )
    return {
        "params": {"head": {"weight": rows}, "bias": jnp.full((3,), value)},
        "margin_state": {},
        "opt_state": (optax.EmptyState(), {"mu": jnp.full((3,), value)}),
        "step": jnp.asarray(int(value), jnp.int32),
    }


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    saver = checkpoint.TrainCheckpoints(root, every_steps=1, keep=3)
    for step in (1, 2):
        saver.save(step, _small_state(step), {"run": {}, "step": step})
    saver.wait()
    saver.close()
    return root


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


@pytest.mark.parametrize("kind", DAMAGES)
def test_each_damage_of_the_newest_checkpoint_is_skipped(
    kind, two_checkpoints, tmp_path, magjax_log
):
    workdir = tmp_path / "w"
    shutil.copytree(two_checkpoints, workdir)
    _damage(workdir / "checkpoints" / "2", kind)
    saver = checkpoint.TrainCheckpoints(workdir, every_steps=1, keep=3)
    try:
        step, state, meta = saver.restore_newest_intact(_abstract(_small_state(0)))
        assert (step, meta["step"], int(state["step"])) == (1, 1, 1)
        np.testing.assert_array_equal(state["params"]["head"]["weight"], np.ones((16, 4)))
        assert any("checkpoint step 2" in m and "damaged" in m for m in magjax_log)
        # the damaged step is set aside, so that the resumed run can save that step again
        assert saver.save(2, _small_state(2), {"run": {}, "step": 2}, force=True)
        saver.wait()
        assert saver.latest_step() == 2 and (workdir / "checkpoints_damaged" / "2").is_dir()
    finally:
        saver.close()


def test_every_checkpoint_damaged_is_an_error_naming_them(two_checkpoints, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(two_checkpoints, workdir)
    _damage(workdir / "checkpoints" / "2", "deleted meta/")
    _damage(workdir / "checkpoints" / "1", "truncated array file")
    saver = checkpoint.TrainCheckpoints(workdir, every_steps=1, keep=3)
    try:
        with pytest.raises(
            UserError,
            match=r"no intact checkpoint .*step 2: KeyError.*"
            r"step 1: ValueError: OUT_OF_RANGE",
        ):
            saver.restore_newest_intact(_abstract(_small_state(0)))
    finally:
        saver.close()


def test_a_different_run_is_not_taken_for_damage(two_checkpoints, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(two_checkpoints, workdir)

    def refuse(meta):
        raise UserError("another run")

    saver = checkpoint.TrainCheckpoints(workdir, every_steps=1, keep=3)
    try:
        with pytest.raises(UserError, match="another run"):
            saver.restore_newest_intact(_abstract(_small_state(0)), check_meta=refuse)
    finally:
        saver.close()
    assert not (workdir / "checkpoints_damaged").exists()


def test_resume_with_a_changed_config_names_every_change(finished_run, dataset, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    changed = own_data_config(dataset, **{"optim.lr": 0.2, "loss.m": 0.3, "num_devices": 2})
    with pytest.raises(UserError) as info:
        train.train_and_evaluate(changed, str(workdir))
    message = str(info.value)
    assert "optim.lr: 0.1 -> 0.2" in message and "loss.m: 0.5 -> 0.3" in message
    assert "num_devices" not in message  # a checkpoint restores on another device count
    assert "--allow-config-change" in message
    summary = train.train_and_evaluate(changed, str(workdir), allow_config_change=True)
    assert summary["params_sha256"] == finished_run[1]["params_sha256"]  # finished: unchanged
    saved = json.loads((workdir / config_check.CONFIG_FILE).read_text())
    assert (saved["optim"]["lr"], saved["loss"]["m"]) == (0.2, 0.3)


BAD_FIELDS = [
    ("optim.lr", -0.1, "config.optim.lr must be > 0"),
    ("total_steps", -5, "config.total_steps must be an integer >= 1"),
    ("total_steps", 0, "config.total_steps must be an integer >= 1"),
    ("epochs", 0.0, "config.epochs must be > 0"),
    ("global_batch", 0, "config.global_batch must be an integer >= 1"),
    ("num_devices", 0, "config.num_devices must be an integer >= 1"),
    ("checkpoint.every_steps", 0, "config.checkpoint.every_steps must be an integer >= 1"),
    ("checkpoint.keep", 0, "config.checkpoint.keep must be an integer >= 1"),
    ("eval.every_steps", 0, "config.eval.every_steps must be an integer >= 1"),
    ("log_every_steps", 0, "config.log_every_steps must be an integer >= 1"),
    ("head.sample_rate", 0.0, "config.head.sample_rate must be in (0, 1]"),
    ("head.sample_rate", 1.5, "config.head.sample_rate must be in (0, 1]"),
    ("optim.momentum", 1.0, "config.optim.momentum must be in [0, 1)"),
    ("optim.weight_decay", -1e-4, "config.optim.weight_decay must be >= 0"),
    ("optim.accumulate_steps", 0, "config.optim.accumulate_steps must be an integer >= 1"),
    ("optim.schedule", "cosine", "config.optim.schedule must be 'poly' or 'step'"),
    ("optim.milestones", (18, 10), "config.optim.milestones must be increasing epochs"),
    ("model.arch", "resnet9", "config.model.arch must be one of the archs iresnet18, "),
    ("loss.s", -64.0, "config.loss.s must be > 0"),
    ("loss.u_a", 5.0, "config.loss.u_a is not a hyper-parameter of the arcface loss"),
    ("loss.name", "magface", "config.loss.m is not a hyper-parameter of the magface loss"),
    ("nan_policy", "ignore", "config.nan_policy must be 'stop' or 'skip'"),
    ("data.augment", "rotate", "config.data.augment must be one of"),
    ("model.batchnorm_stats", "sync", "config.model.batchnorm_stats must be one of"),
    ("optim.warmup_style", "linear", "config.optim.warmup_style must be one of"),
    ("optim.grad_allreduce_dtype", "int8", "config.optim.grad_allreduce_dtype must be one of"),
    ("optim.grad_clip_eps", -1e-6, "config.optim.grad_clip_eps must be >= 0"),
    ("head.block_size", -1, "config.head.block_size must be an integer >= 1"),
    ("optim.optimizer", "adam", "config.optim.optimizer must be one of ('sgd', 'adamw')"),
    ("optim.adam_betas", (0.9, 1.0), "config.optim.adam_betas must be two numbers in [0, 1)"),
    ("optim.adam_eps", -1e-8, "config.optim.adam_eps must be >= 0"),
]


@pytest.mark.parametrize(
    "field,value,expected", BAD_FIELDS, ids=[f"{f}={v}" for f, v, _ in BAD_FIELDS]
)
def test_bad_config_field_is_named_before_anything_runs(field, value, expected, dataset, tmp_path):
    config = own_data_config(dataset, **{field: value})
    workdir = tmp_path / "run"
    with pytest.raises(UserError) as info:
        train.train_and_evaluate(config, str(workdir))
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not workdir.exists()


def test_all_problems_reported_at_once_and_device_checks():
    config = recipes.get_config("arcface", "tiny")
    config.optim.lr, config.checkpoint.every_steps, config.loss.u_a = -0.1, 0, 5.0
    assert len(config_check.problems(config)) == 3
    config = recipes.get_config("arcface", "tiny")
    config.num_devices = 16
    assert config_check.problems(config, device_count=8) == [
        "config.num_devices is 16 but only 8 devices are available"
    ]
    config.num_devices, config.global_batch = 8, 1020
    assert config_check.problems(config, device_count=8) == [
        "config.global_batch 1020 must be a multiple of the 8 devices"
    ]


@pytest.mark.parametrize("loss", ["arcface", "cosface", "magface", "adaface", "curricularface"])
def test_every_recipe_is_valid_and_its_loss_fields_accepted(loss):
    for variant in ("", "demo", "r100,webface42m,pfc0.2", "tiny"):
        assert config_check.problems(recipes.get_config(loss, variant)) == [], variant
    config = recipes.get_config(loss)
    assert set(config.loss) == {"name", *losses.registered()[loss].field_names()}
    for field in losses.registered()[loss].field_names():
        value = config.loss[field]
        if isinstance(value, float) and field != "probability_floor":
            config.loss[field] = value * 0.5 + 0.01
    assert config_check.problems(config) == []


def test_library_chatter_goes_to_the_log_file_only(tmp_path, capsys):
    root, absl_logger = logging.getLogger(), logging.getLogger("absl")
    saved = root.handlers[:], root.level, absl_logger.level
    absl_logger.setLevel(logging.WARNING)  # as absl leaves it after parsing magjax.main's flags
    try:
        logs.route_logging(tmp_path / "train.log")
        logging.getLogger("absl").info("Finished saving checkpoint")
        logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
        logging.getLogger("orbax.checkpoint").warning("disk almost full")
        logging.getLogger("magjax.train").info("training arcface on tiny")
        for handler in root.handlers:
            handler.flush()
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        absl_logger.setLevel(saved[2])
    assert capsys.readouterr().err.splitlines() == ["disk almost full", "training arcface on tiny"]
    logged = (tmp_path / "train.log").read_text()
    for message in (
        "Finished saving checkpoint",
        "backend 'tpu'",
        "disk almost full",
        "training arcface on tiny",
    ):
        assert message in logged
