"""Nothing lost, nothing silent, round 3 (issue 29), the training-run side: the inference model
replaced so that a kill at any moment leaves one that loads, the workdir locked against a second
run, metrics.jsonl kept valid and free of repeated steps across resumes, one line (not a
traceback) for an unusable workdir, a full disk, a NaN loss and Ctrl-C."""

import errno
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.path import async_path
from test_encoder import random_variables
from test_train import REPO

from magjax import checkpoint, cli, models, train
from magjax import workdir as workdirs
from magjax.encoder import FaceEncoder
from magjax.errors import UserError

# ------------------------------------------------------------------------------------------------
# 3. The inference model is swapped in, never deleted before its replacement is complete.


class _KilledError(Exception):
    """Stands for a kill: raised where the process would have died."""


@pytest.fixture(scope="module")
def two_models():
    return random_variables(seed=0), random_variables(seed=1)


def _meta(step):
    return models.inference_meta("tiny", 32, trained_with="arcface", step=step)


def _kill_at(monkeypatch, point: int) -> list[str]:
    """Makes the ``point``-th file-system change of a model save raise :class:`_KilledError` instead
    of happening: magjax's own renames and deletions, and orbax's removal of a directory it
    overwrites (after which it would write the new one). Returns the list of points met."""
    met: list[str] = []

    def kill_point(name, function):
        def wrapper(*args, **kwargs):
            # only magjax's own calls are kill points here (orbax renames through os too)
            if sys._getframe(1).f_globals.get("__name__") != "magjax.checkpoint":
                return function(*args, **kwargs)
            met.append(f"{name} {args[0] if args else ''}")
            if len(met) == point:
                raise _KilledError(met[-1])
            return function(*args, **kwargs)

        return wrapper

    for module, name in (
        (os, "rename"),
        (shutil, "rmtree"),
        (pathlib.Path, "unlink"),
        (checkpoint.files, "write_text_atomically"),
    ):
        monkeypatch.setattr(module, name, kill_point(name, getattr(module, name)))
    original_rmtree = async_path.rmtree

    async def orbax_rmtree(path, **kwargs):
        met.append(f"orbax rmtree {path}")
        await original_rmtree(path, **kwargs)
        if len(met) == point:  # killed after the deletion, before the writing
            raise _KilledError(met[-1])

    monkeypatch.setattr(async_path, "rmtree", orbax_rmtree)
    return met


def _loaded_step(path) -> int:
    encoder = FaceEncoder.load(path)
    return encoder.meta["step"]


def test_a_kill_at_any_moment_of_a_model_export_leaves_one_that_loads(
    two_models, tmp_path, monkeypatch
):
    """The export of ``model_best`` replaces the previous best; killed at each file-system
    change of that replacement, the directory (through ``FaceEncoder.load`` and through the
    workdir's ``model``) still loads the previous model or the new one, and the next export
    finishes cleanly. Before: orbax removed ``variables/`` under the old ``model.json``."""
    first, second = two_models
    points = 0
    for point in range(1, 20):
        workdir = tmp_path / f"kill{point}"
        model = workdir / "model"
        checkpoint.save_inference_model(model, first, _meta(1))
        (model / "model.onnx").write_text("an export the user put there")
        with monkeypatch.context() as patch:
            met = _kill_at(patch, point)
            try:
                checkpoint.save_inference_model(model, second, _meta(2))
                killed = False
            except _KilledError:
                killed = True
        if not killed:
            points = len(met)
            assert _loaded_step(model) == 2
            break
        # the old model or the new one, complete, through either path a user gives
        assert _loaded_step(model) in (1, 2), met
        assert _loaded_step(workdir) == _loaded_step(model)
        # the next export (or a run's start) finishes what the killed one left
        checkpoint.save_inference_model(model, second, _meta(3))
        assert _loaded_step(model) == 3
        assert sorted(p.name for p in workdir.iterdir()) == ["model"]
        assert (model / "model.onnx").read_text() == "an export the user put there"
        variables, _ = checkpoint.load_inference_model(model)
        jax.tree.map(np.testing.assert_array_equal, variables, second)
    assert points >= 4, met  # write, model.json, two renames, the old one's removal


def test_a_killed_swap_is_finished_at_the_next_start(two_models, tmp_path):
    """Killed between its two renames: no ``model_best`` but two complete models beside it;
    the newer loads, and ``recover_inference_model`` (a run's start) puts it in place."""
    first, second = two_models
    best = tmp_path / "model_best"
    checkpoint.save_inference_model(best, first, _meta(1))
    checkpoint.save_inference_model(tmp_path / "model_best.new", second, _meta(2))
    os.rename(best, tmp_path / "model_best.old")
    assert _loaded_step(best) == 2
    checkpoint.recover_inference_model(best)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best"]
    assert _loaded_step(best) == 2
    # a model cut short while being written is removed, the model in place kept
    shutil.copytree(best, tmp_path / "model_best.new")
    (tmp_path / "model_best.new" / checkpoint.MODEL_META).unlink()
    checkpoint.recover_inference_model(best)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best"]
    assert _loaded_step(best) == 2


# ------------------------------------------------------------------------------------------------
# 6 and 8. The workdir: locked against a second run; one line when it cannot be used.

MAIN_FLAGS = [
    "--config",
    "configs/arcface.py:tiny",
    "--config.model.dtype=float32",
    "--config.model.embedding_dim=32",
    "--config.num_devices=1",
    "--config.global_batch=16",
    "--config.log_every_steps=1",
    "--config.eval.every_steps=1000",
    "--config.eval.heldout_sets=False",
    "--config.checkpoint.every_steps=1000",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from test_train import SYNTHETIC

    from magjax import data

    return data.prepare("synthetic", None, tmp_path_factory.mktemp("data") / "tiny", **SYNTHETIC)


def _main(workdir, *flags, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "magjax.main", *MAIN_FLAGS, f"--workdir={workdir}", *flags],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_a_second_run_on_a_workdir_in_use_is_refused_naming_the_holder(dataset, tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from magjax import workdir as w; "
            "w.prepare(sys.argv[1]); lock = w.lock(sys.argv[1]); print('locked', flush=True); "
            "time.sleep(120)",
            str(workdir),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            UserError,
            match=rf"in use by another run \(pid {holder.pid} on host "
            rf"{socket.gethostname()}, started 20",
        ):
            workdirs.lock(workdir)
        # The command: one line, exit 2, and nothing written (no log, no config.json).
        second = _main(workdir, f"--config.data.dir={dataset}", "--config.total_steps=2")
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err
        assert _lines(err) == [err.strip()] and err.startswith(
            f"error: --workdir {workdir} is in use by another run (pid {holder.pid} on host"
        ), err
        assert sorted(p.name for p in workdir.iterdir()) == [workdirs.LOCK_FILE]
    finally:
        holder.kill()  # a kill leaves no stale lock: the kernel drops it with the process
        holder.wait()
    lock = workdirs.lock(workdir)
    assert lock.held and f"pid {os.getpid()} " in (workdir / workdirs.LOCK_FILE).read_text()
    lock.release()


def test_an_unusable_workdir_is_one_line_naming_it(tmp_path, monkeypatch):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a directory")
    # a regular file: through the command (the log file was opened before the one-line errors)
    run = _main(a_file, "--config.total_steps=1")
    _, err = run.communicate(timeout=300)
    assert run.returncode == 2 and _lines(err) == [
        f"error: --workdir {a_file} is a file, not a directory: name a directory"
    ], err
    # under a regular file
    with pytest.raises(
        UserError, match=f"--workdir {a_file}/run: {a_file} is a file, not a directory"
    ):
        workdirs.prepare(a_file / "run")
    # read-only (as root, permissions do not stop this process: the file system's answer is
    # simulated)
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).startswith(str(tmp_path / "ro")) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(
        UserError, match=f"--workdir {tmp_path}/ro cannot be written: Read-only file system"
    ):
        workdirs.prepare(tmp_path / "ro")


# ------------------------------------------------------------------------------------------------
# 7 and 8. A full disk during a checkpoint, then a resume: metrics.jsonl stays valid, each step
# once.


def _config(dataset, **overrides):
    from test_reliability import own_data_config

    return own_data_config(dataset, **overrides)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax
def test_full_disk_at_a_checkpoint_then_resume(dataset, tmp_path, monkeypatch):
    """Orbax's write of checkpoint 4 fails with ENOSPC (in its background thread, as a real
    full disk does): one line saying the disk is full and that checkpoint 2 is kept, and
    step 4's partial files removed. A kill had also cut metrics.jsonl's last line short. The
    rerun resumes from 2: metrics.jsonl holds valid lines, steps 1-4 once each (3 and 4 as
    computed again, equal to the first time), and what was taken out is kept aside."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    workdir = tmp_path / "run"
    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def full_disk(self, x, directory):
        if isinstance(x, dict) and x.get("step") == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "meta"))
        return await original(self, x, directory)

    with monkeypatch.context() as patch:
        patch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)
        with pytest.raises(UserError) as raised:
            train.train_and_evaluate(_config(dataset), str(workdir))
    message = cli.user_error_message(raised.value)
    assert message == (
        f"the disk is full: checkpoint step 4 could not be written in {workdir}/"
        "checkpoints (its partial files are removed) and nothing else is lost: "
        "the checkpoint of step 2 is kept. Free space and rerun the same command "
        "to resume (orbax's error is in train.log)"
    )
    saved = checkpoint.TrainCheckpoints(workdir, every_steps=2, keep=3)
    assert saved.latest_step() == 2
    saved.close()
    first = _records(workdir / "metrics.jsonl")
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    with open(workdir / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 5, "kind": "train", "lo')  # a kill in the middle of a line

    summary = train.train_and_evaluate(_config(dataset), str(workdir))
    assert summary["steps"] == 4
    # orbax's writes still under way when the failure was reported may have left some of
    # step 4's partial files after they were removed: the next start removes them
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line valid
    assert [(r["kind"], r["step"]) for r in records] == [("train", s) for s in (1, 2, 3, 4)]
    for again, before in zip(records[2:], first[2:], strict=True):
        assert again["loss"] == before["loss"]  # the resumed run recomputed the same steps
    dropped = (workdir / "metrics.dropped.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in dropped[:2]] == [3, 4]
    assert dropped[2:] == ['{"step": 5, "kind": "train", "lo']


# ------------------------------------------------------------------------------------------------
# 10. Ctrl-C: saved and stopped in one line once training runs; at once before.


def _interrupt_when(process, line_start: str) -> list[str]:
    """Sends SIGINT to ``process`` when its stderr shows a line starting with ``line_start``;
    returns the stderr lines after it."""
    for line in process.stderr:
        if line.startswith(line_start):
            process.send_signal(signal.SIGINT)
            break
    else:
        pytest.fail(f"no line starting with {line_start!r}")
    rest = process.stderr.read()
    process.wait(timeout=300)
    return _lines(rest)


def test_ctrl_c_during_training_saves_and_stops_in_one_line_and_the_rerun_resumes(
    dataset, tmp_path
):
    """Before: a KeyboardInterrupt traceback, nothing saved."""
    # The persistent compilation cache spares the rerun its compilation (seconds, not 20).
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    workdir = tmp_path / "run"
    flags = (f"--config.data.dir={dataset}", "--config.total_steps=40")
    run = _main(workdir, *flags, env=env)
    after = _interrupt_when(run, "[1/40]")
    assert run.returncode == 130, after
    assert after[0].startswith(
        "Ctrl-C received: saving a checkpoint after this step and "
        "stopping (Ctrl-C again stops at once)"
    ), after
    stopped = next(line for line in after if line.startswith("stopped at step"))
    step = int(stopped.split()[3])
    assert stopped == (
        f"stopped at step {step} after Ctrl-C (checkpoint saved); rerun the same command to resume"
    )
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in after), after
    assert 1 <= step < 40
    saved = checkpoint.TrainCheckpoints(workdir, every_steps=1000, keep=3)
    assert saved.latest_step() == step
    saved.close()
    rerun = _main(workdir, *flags, env=env)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert f"resumed from step {step} " in err
    records = _records(workdir / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 41))


def test_ctrl_c_before_training_stops_at_once_in_one_line(dataset, tmp_path):
    """Before: a KeyboardInterrupt traceback from wherever start-up was."""
    run = _main(tmp_path / "run", f"--config.data.dir={dataset}", "--config.total_steps=40")
    started = time.time()
    after = _interrupt_when(run, "training arcface on tiny")
    assert run.returncode == 130
    assert after[-1:] == [
        "stopped by Ctrl-C: the newest checkpoint in the workdir (if any) is "
        "kept; rerun the same command to resume"
    ], after
    assert not any("Traceback" in line for line in after), after
    assert time.time() - started < 15  # at once, not after compiling and training
    assert not (tmp_path / "run" / "checkpoints" / "1").exists()


def test_metrics_trimmed_to_the_restored_step_nothing_deleted(tmp_path):
    """The rules of the resume above, each: records past the restored step, a repeated
    (kind, step) (a run resumed by an older magjax) and a cut-short line are moved to
    metrics.dropped.jsonl; a run that starts from step 0 over an old metrics.jsonl (its
    checkpoints gone) moves every record there rather than append to them or delete them."""
    from magjax import logs

    path = tmp_path / "metrics.jsonl"
    lines = [
        '{"step": 1, "kind": "train", "loss": 3.0}',
        '{"step": 2, "kind": "train", "loss": 2.5}',
        '{"step": 2, "kind": "eval", "acc": 0.5}',
        '{"step": 3, "kind": "train", "loss": 2.0}',
        '{"step": 2, "kind": "train", "loss": 2.4}',  # the later of two: kept
        '{"step": 4, "kind": "tra',
    ]
    path.write_text("\n".join(lines))
    assert logs.trim_metrics(path, restored_step=2) == (3, 3)
    assert path.read_text().splitlines() == [lines[0], lines[2], lines[4]]
    assert (tmp_path / "metrics.dropped.jsonl").read_text().splitlines() == [
        lines[3],
        lines[1],
        lines[5],
    ]
    assert logs.trim_metrics(path, restored_step=2) == (3, 0)  # nothing more to do
    assert logs.trim_metrics(path, restored_step=0) == (0, 3)
    assert path.read_text() == ""
    assert len((tmp_path / "metrics.dropped.jsonl").read_text().splitlines()) == 6


def test_ctrl_c_in_any_command_is_one_line(capsys):
    """python -m magjax.evaluate, extract, export, convert, data: Ctrl-C (a KeyboardInterrupt
    wherever it lands) is one line and exit status 130, not a traceback."""

    def work():
        raise KeyboardInterrupt

    assert cli.run(work) == 130
    assert capsys.readouterr().err == "stopped by Ctrl-C\n"
