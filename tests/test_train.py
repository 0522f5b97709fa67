"""The training program on a tiny synthetic dataset: every loss on 1 and 8 devices, exact
resume after SIGTERM, restore on another device count, config errors, and 2 processes."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from magjax import checkpoint, cli, parallel, recipes, train, train_step
from magjax.data import pipeline as data_pipeline

REPO = pathlib.Path(__file__).parent.parent
SYNTHETIC = dict(
    num_identities=12,
    images_per_identity=4,
    num_heldout=4,
    num_pairs=20,
    quality_images_per_level=1,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from magjax import data

    return data.prepare("synthetic", None, tmp_path_factory.mktemp("data") / "tiny", **SYNTHETIC)


def tiny_config(loss, dataset, **overrides):
    config = recipes.get_config(loss, "demo")
    config.data.dir = str(dataset)
    config.data.synthetic = False
    config.model.embedding_dim = 32
    config.global_batch = 16
    config.total_steps = 2
    config.log_every_steps = 1
    config.eval.every_steps = 1000  # evaluated once, at the end
    config.checkpoint.every_steps = 1000
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def exported_params(workdir):
    variables, _ = checkpoint.load_inference_model(pathlib.Path(workdir) / "model")
    return variables


@pytest.mark.parametrize("loss", ["arcface", "cosface", "magface", "adaface"])
def test_two_steps_on_one_and_eight_devices_agree(loss, dataset, tmp_path):
    summaries, params = {}, {}
    for devices in (1, 8):
        workdir = tmp_path / f"d{devices}"
        summaries[devices] = train.train_and_evaluate(
            tiny_config(loss, dataset, num_devices=devices), str(workdir)
        )
        params[devices] = exported_params(workdir)
    for s in summaries.values():
        assert s["steps"] == 2 and np.isfinite(s["final_loss"])
        assert 0.0 <= s["verification"]["verification"]["accuracy"] <= 1.0
        assert -1.0 <= s["quality"]["spearman_norm_vs_quality"] <= 1.0
        assert -1.0 <= s["quality"]["spearman_recognisability_vs_quality"] <= 1.0
    # The quality evaluation sees the same model on 1 and 8 devices.
    one, eight = summaries[1]["quality"], summaries[8]["quality"]
    for level, norm in one["mean_norm_per_level"].items():
        np.testing.assert_allclose(eight["mean_norm_per_level"][level], norm, rtol=2e-3)
    for key in ("spearman_norm_vs_quality", "spearman_recognisability_vs_quality"):
        np.testing.assert_allclose(eight[key], one[key], atol=0.02)
    # The same global batch on 8 devices (class-sharded head, global BatchNorm statistics)
    # gives the parameters of the single-device run, up to float32 reduction order.
    np.testing.assert_allclose(summaries[8]["final_loss"], summaries[1]["final_loss"], rtol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5), params[8], params[1]
    )
    records = [json.loads(line) for line in (tmp_path / "d8/metrics.jsonl").open()]
    assert {r["step"] for r in records if r["kind"] == "train"} == {1, 2}
    assert all("lr" in r and "images_per_s" in r for r in records if r["kind"] == "train")
    if loss == "adaface":
        assert {"adaface_batch_mean", "adaface_batch_std"} <= set(records[0])
    if loss == "magface":
        assert "lambda_g_loss_g" in records[0]


def _sigterm_at(monkeypatch, step):
    """Sends SIGTERM to this process when the input pipeline is about to yield batch ``step``."""
    original = data_pipeline.TrainPipeline.__next__

    def next_batch(self):
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(data_pipeline.TrainPipeline, "__next__", next_batch)


@pytest.fixture(scope="module")
def many_identities(tmp_path_factory):
    """144 identities: with a global batch of 8 on 8 devices each class shard holds 18 rows of
    which Partial FC at rate 0.5 samples 9, so the sampled classes depend on the step's key."""
    from magjax import data

    return data.prepare(
        "synthetic",
        None,
        tmp_path_factory.mktemp("data") / "many",
        **{**SYNTHETIC, "num_identities": 144, "images_per_identity": 2},
    )


@pytest.mark.parametrize("resume_devices", [8, 4])
def test_sigterm_then_resume_continues_exactly(
    resume_devices, dataset, many_identities, tmp_path, monkeypatch
):
    if resume_devices == 8:
        # The step's key matters: dropout and Partial FC sampling, both drawn from it. A resumed
        # run that drew other numbers than the straight one (a key not restored with the step)
        # ends with other parameters.
        config = tiny_config(
            "adaface",
            many_identities,
            total_steps=5,
            num_devices=8,
            global_batch=8,
            **{"checkpoint.every_steps": 2, "model.dropout": 0.4, "head.sample_rate": 0.5},
        )
    else:
        # Sampling depends on the class shards, which change with the device count.
        config = tiny_config(
            "adaface", dataset, total_steps=5, num_devices=8, **{"checkpoint.every_steps": 2}
        )
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"))

    workdir = str(tmp_path / "interrupted")
    with monkeypatch.context() as patch:
        _sigterm_at(patch, 3)
        assert train.train_and_evaluate(config, workdir) is None  # preempted: saved, stopped
    saved = checkpoint.TrainCheckpoints(workdir, every_steps=2, keep=3)
    assert saved.latest_step() == 4  # the signal arrived during step 4; it finished and saved
    saved.close()
    assert not (pathlib.Path(workdir) / "summary.json").exists()

    config.num_devices = resume_devices
    resumed = train.train_and_evaluate(config, workdir)
    assert resumed["steps"] == 5
    if resume_devices == 8:
        # Same devices: bit-identical parameters (input position, RNG and state all restored).
        assert resumed["params_sha256"] == straight["params_sha256"]
    else:
        # 8 -> 4 devices: class centres re-laid out (16 padded rows -> 12); equal up to the
        # order of float32 reductions.
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5),
            exported_params(workdir),
            exported_params(tmp_path / "straight"),
        )


def test_resume_refuses_a_different_run(dataset, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config("arcface", dataset), workdir)
    with pytest.raises(ValueError, match="loss='arcface'.*'cosface'|loss"):
        train.train_and_evaluate(tiny_config("cosface", dataset), workdir)


def test_nan_policy_stop_names_the_steps(dataset, tmp_path, monkeypatch):
    # An infinite scale makes every loss and gradient non-finite from the first step on. The
    # config check refuses it (rightly), so the loss gets it behind the check's back.
    from magjax import losses

    monkeypatch.setattr(
        train_step,
        "margin_loss_from_config",
        lambda loss: losses.MarginLoss.create(
            loss.name, **{**{k: v for k, v in loss.items() if k != "name"}, "s": float("inf")}
        ),
    )
    config = tiny_config("arcface", dataset)
    with pytest.raises(FloatingPointError) as raised:
        train.train_and_evaluate(config, str(tmp_path / "nan"))
    # One line, not a traceback (a user error: the recipe needs changing): the steps, what is
    # kept and the fix.
    assert cli.user_error_message(raised.value) == (
        "loss or gradients became NaN/Inf within steps [1, 1]: stopped without saving them; no "
        "checkpoint was saved before them: lower --config.optim.lr, or set "
        "--config.nan_policy=skip to drop such updates"
    )
    assert not (tmp_path / "nan" / "checkpoints" / "2").exists()
    config = tiny_config("arcface", dataset, nan_policy="skip")
    summary = train.train_and_evaluate(config, str(tmp_path / "skip"))
    assert summary["steps"] == 2  # every update dropped, parameters unchanged
    components = train_step.build_components(
        config,
        parallel.make_mesh(),
        num_classes=SYNTHETIC["num_identities"],
        steps_per_epoch=3,
        total_steps=2,
    )
    init_key, _ = jax.random.split(jax.random.key(config.seed))
    initial = train_step.init_state(components, init_key)
    assert summary["params_sha256"] == train_step.params_sha256(initial["params"])


def _run_main(args, env=None, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "magjax.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def test_unknown_config_key_is_named(tmp_path):
    result = _run_main(
        [
            "--config",
            "configs/magface.py:demo",
            "--workdir",
            str(tmp_path),
            "--config.optim.lerning_rate=0.1",
        ]
    )
    assert result.returncode != 0
    assert "lerning_rate" in result.stderr


def test_main_splits_the_cpu_into_config_cpu_devices(dataset, tmp_path):
    """The demo's ``cpu_devices=2`` gives 2 CPU devices when XLA_FLAGS forces no count."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = _run_main(
        [
            "--config",
            "configs/magface.py:demo",
            "--workdir",
            str(tmp_path),
            f"--config.data.dir={dataset}",
            "--config.data.synthetic=False",
            "--config.model.embedding_dim=32",
            "--config.global_batch=8",
            "--config.total_steps=1",
            "--config.eval.heldout_sets=False",
        ],
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["devices"] == 2 and summary["steps"] == 1
    # The console holds magjax's lines only (what it trains, progress); library messages
    # (absl/orbax INFO, jax's and libtpu's TPU probing) are in WORKDIR/train.log.
    console = result.stderr.splitlines()
    assert console[0] == "num_classes=12, num_examples=48 taken from the data in " + str(dataset)
    assert console[1].startswith(f"no evaluation: {dataset} holds no held-out set")
    assert console[2].startswith("training magface on magface_tiny (float32): 12 classes")
    assert "global batch 8 on 2 cpu devices" in console[2] and "; 1 step (" in console[2]
    assert console[3].startswith("compiling the train step")
    assert console[4].startswith("compiled and ran the first step in ")
    assert console[5].startswith("[1/1] loss ") and len(console) == 6, console
    # stdout: the results and the commands to run next.
    assert result.stdout.startswith("finished 1 steps; final loss ")
    assert f"python -m magjax.export --workdir {tmp_path} --out model.onnx" in result.stdout
    log = (tmp_path / "train.log").read_text()
    assert "INFO absl:" in log and "INFO magjax.train: training magface" in log


def test_missing_dataset_points_to_the_demo(tmp_path):
    with pytest.raises(ValueError, match="configs/<loss>.py:demo"):
        train.train_and_evaluate(recipes.get_config("magface"), str(tmp_path))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(dataset, tmp_path):
    """2 processes x 4 CPU devices through the real training step = 1 process x 8 devices."""
    overrides = [
        f"--config.data.dir={dataset}",
        "--config.data.synthetic=False",
        "--config.model.embedding_dim=32",
        "--config.global_batch=16",
        "--config.total_steps=2",
        "--config.eval.heldout_sets=False",
    ]
    single = _run_main(
        ["--config", "configs/arcface.py:demo", "--workdir", str(tmp_path / "single"), *overrides]
    )
    assert single.returncode == 0, single.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "magjax.main",
                "--config",
                "configs/arcface.py:demo",
                "--workdir",
                str(tmp_path / "multi"),
                *overrides,
                f"--coordinator-address=127.0.0.1:{port}",
                "--num-processes=2",
                f"--process-id={i}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    multi = json.loads((tmp_path / "multi/summary.json").read_text())
    one = json.loads((tmp_path / "single/summary.json").read_text())
    assert multi["processes"] == 2 and multi["devices"] == 8 and one["devices"] == 8
    np.testing.assert_allclose(multi["final_loss"], one["final_loss"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        exported_params(tmp_path / "multi"),
        exported_params(tmp_path / "single"),
    )


def test_resolve_data_dir_names_the_demo_data_without_building_it(tmp_path, monkeypatch):
    """Finding the data only reads; the demo's synthetic identities are built by the loop's
    explicit build_synthetic_data call."""
    monkeypatch.setenv("MAGJAX_CACHE", str(tmp_path))
    data_dir = train.resolve_data_dir(recipes.get_config("magface", "demo"))
    assert data_dir == tmp_path / "magjax" / "synthetic_300x50_nuisance0.25"
    assert not data_dir.exists()
