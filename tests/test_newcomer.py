"""A newcomer's first hour: own faces from a folder to a trained, evaluated model with the demo
recipe and only ``--config.data.dir`` added; every command's console free of libtpu's and absl's
lines; result files readable by others; the small mistakes a first try makes."""

import json
import os
import pathlib
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from magjax import evaluators, files, logs, recipes
from magjax.data import builders, verification_bin

REPO = pathlib.Path(__file__).parent.parent
# What libtpu and the CUDA plugin print when a command starts JAX on a host without them, and
# what absl and orbax log at INFO.
NOISE = (
    "Failed to find host bounds",
    "E0000",
    "INVALID_ARGUMENT",
    "INFO absl",
    "Unable to load",
    "Downloading and preparing",
    "Traceback",
)


def write_face_folder(root: pathlib.Path, identities: int, images: int) -> pathlib.Path:
    """``root/<identity>/<n>.jpg``: 112x112 faces, each identity a colour pattern of its own
    plus noise (enough for a few training steps to mean something)."""
    rng = np.random.default_rng(0)
    for identity in range(identities):
        base = rng.integers(0, 256, (14, 14, 3))
        folder = root / f"person_{identity:02d}"
        folder.mkdir(parents=True)
        for n in range(images):
            face = np.kron(base, np.ones((8, 8, 1))) + rng.normal(0, 20, (112, 112, 3))
            Image.fromarray(np.clip(face, 0, 255).astype(np.uint8)).save(folder / f"{n}.jpg")
    return root


def command_env() -> dict:
    """The environment of a user's shell: no JAX_PLATFORMS (conftest sets it for the tests), so
    that JAX probes libtpu as it does for a user who installed requirements-tpu.txt; a cache
    directory of the test's own."""
    return {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}


def run(*args, cwd=REPO, env=None):
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env or command_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def quiet(result) -> bool:
    return not any(noise in result.stderr + result.stdout for noise in NOISE)


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """README's "Train on your own faces", as typed: prepare with --holdout, then the demo
    recipe with only --config.data.dir added (26 identities x 6 faces: 22 train, 132 images,
    one global batch of 128, so the demo's 1.2 epochs are 1 step)."""
    root = tmp_path_factory.mktemp("own")
    faces = write_face_folder(root / "faces", identities=26, images=6)
    prepared = run(
        "magjax.data",
        "prepare",
        "--format",
        "folder",
        "--src",
        str(faces),
        "--out",
        str(root / "data"),
        "--holdout",
        "4",
    )
    trained = run(
        "magjax.main",
        "--config",
        "configs/arcface.py:demo",
        "--workdir",
        str(root / "run"),
        f"--config.data.dir={root / 'data'}",
    )
    return root, prepared, trained


def test_own_faces_train_with_only_the_data_dir_added(own_run):
    root, prepared, trained = own_run
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    data = root / "data"
    held = (data / "heldout.txt").read_text().split()
    classes = (data / "classes.txt").read_text().split()
    assert len(held) == 4 and len(classes) == 22 and not set(held) & set(classes)
    images, issame = verification_bin.load_bin(data / "verification.bin")
    # Every same-identity pair of 4 identities x 6 images (4 x 15), as many different ones.
    assert len(issame) == 120 and issame.sum() == 60 and images.shape[1:] == (112, 112, 3)

    assert trained.returncode == 0, trained.stderr[-3000:]
    assert quiet(trained), trained.stderr
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["steps"] == 1
    assert set(summary["verification"]) == {"verification"}  # the held-out identities
    assert 0.0 <= summary["verification"]["verification"]["accuracy"] <= 1.0
    assert summary["best"]["step"] == 1
    config = json.loads((root / "run" / "config.json").read_text())
    assert config["data"]["dir"] == str(data) and config["data"]["num_classes"] == 22
    # The demo's synthetic identities were not built into the user's data.
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == ["face_folder"]
    assert "classes, 132 images in" in trained.stderr
    assert f"evaluating every 70 steps on {data / 'verification.bin'}" in trained.stderr
    assert "python -m magjax.export --workdir" in trained.stdout


def test_evaluate_alone_uses_the_runs_own_sets(own_run):
    root, _, trained = own_run
    assert trained.returncode == 0
    result = run("magjax.evaluate", "--workdir", str(root / "run"), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert quiet(result), result.stderr
    report = json.loads((root / "run" / "eval" / "eval.json").read_text())
    assert set(report["verification"]) == {"verification"}
    assert report["verification"]["verification"]["num_pairs"] == 120
    assert result.stdout.splitlines()[1].startswith("verification ")


def test_every_command_keeps_library_lines_off_the_console(own_run, tmp_path):
    root, _, trained = own_run
    assert trained.returncode == 0
    workdir = str(root / "run")
    commands = [
        (
            "magjax.extract",
            "--workdir",
            workdir,
            "--images",
            str(root / "faces" / "person_00"),
            "--out",
            str(tmp_path / "feats.npz"),
            "--no-progress",
        ),
        ("magjax.export", "--workdir", workdir, "--out", str(tmp_path / "model.onnx")),
        ("magjax.models", "summary", "tiny"),
        ("magjax.data", "inspect", str(root / "data")),
        (
            "magjax.bench",
            "head",
            "--batch",
            "8",
            "--classes",
            "64",
            "--dim",
            "16",
            "--repeats",
            "1",
        ),
    ]
    for command in commands:
        result = run(*command)
        assert result.returncode == 0, (command, result.stderr[-3000:])
        assert quiet(result), (command, result.stderr)
    # --verbose shows what was kept off (orbax's INFO lines on loading the model).
    verbose = run(
        "magjax.export", "--workdir", workdir, "--out", str(tmp_path / "v.onnx"), "--verbose"
    )
    assert verbose.returncode == 0 and "INFO absl" in verbose.stderr


def test_result_files_follow_the_umask(own_run, tmp_path):
    root, _, trained = own_run
    assert trained.returncode == 0
    expected = 0o666 & ~_current_umask()
    for name in ("summary.json", "config.json", "model/model.json"):
        assert stat.S_IMODE((root / "run" / name).stat().st_mode) == expected, name
    previous = os.umask(0o027)
    try:
        written = files.write_text_atomically(tmp_path / "x.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == 0o640


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_batch_larger_than_the_data_is_one_line(own_run):
    root, _, _ = own_run
    result = run(
        "magjax.main",
        "--config",
        "configs/arcface.py:demo",
        "--workdir",
        str(root / "big"),
        f"--config.data.dir={root / 'data'}",
        "--config.global_batch=1024",
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: config.global_batch 1024 is more than the 132 images in {root / 'data'}: "
        "pass a smaller --config.global_batch (a multiple of the device count)"
    )


def test_a_data_dir_without_a_dataset_is_named_before_anything_is_built(tmp_path):
    empty = tmp_path / "not_prepared"
    empty.mkdir()
    result = run(
        "magjax.main",
        "--config",
        "configs/magface.py:demo",
        "--workdir",
        str(tmp_path / "run"),
        f"--config.data.dir={empty}",
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {empty}: no prepared dataset")
    assert list(empty.iterdir()) == []  # nothing built into it


def test_prepare_without_src_is_one_line_and_writes_nothing(tmp_path):
    result = run("magjax.data", "prepare", "--format", "folder", "--out", str(tmp_path / "d"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --src is required for --format folder: the image folder to read"
    )
    assert not (tmp_path / "d").exists()


def test_help_of_prepare_and_inspect_shows_examples():
    for command, example in (
        ("prepare", "--format folder --src faces/ --out data/"),
        ("inspect", "python -m magjax.data inspect lfw.bin --json"),
    ):
        result = run("magjax.data", command, "--help")
        assert result.returncode == 0 and example in result.stdout


@pytest.mark.parametrize(
    "given, expected",
    [
        ({"bins": (None,), "quality_set": "None"}, ([], None)),
        ({"bins": ("none",), "quality_set": ""}, ([], None)),
        ({"bins": ("a.bin,b.bin",), "quality_set": "q.npz"}, (["a.bin", "b.bin"], "q.npz")),
        ({"bins": ("/abs/lfw.bin", "a.bin"), "quality_set": ""}, (["/abs/lfw.bin", "a.bin"], None)),
    ],
)
def test_eval_sets_switched_off_or_listed_as_a_cli_gives_them(given, expected, tmp_path):
    bins, quality_set = evaluators.configured_sets({**given, "heldout_sets": True}, tmp_path)
    assert bins == [tmp_path / name for name in expected[0]]
    assert quality_set == (tmp_path / expected[1] if expected[1] else None)


def test_heldout_sets_come_from_the_manifest_first(tmp_path):
    (tmp_path / builders.MANIFEST).write_text(
        json.dumps(
            {
                "dataset_dir": "x",
                "verification_bins": ["verification.bin"],
                "quality_set": "quality.npz",
            }
        )
    )
    config = {"bins": ("lfw.bin", "verification.bin"), "quality_set": "", "heldout_sets": True}
    bins, quality_set = evaluators.configured_sets(config, tmp_path)
    assert bins == [tmp_path / "verification.bin", tmp_path / "lfw.bin"]
    assert quality_set == tmp_path / "quality.npz"
    off = evaluators.configured_sets({**config, "heldout_sets": False}, tmp_path)
    assert off == ([tmp_path / "lfw.bin", tmp_path / "verification.bin"], None)


def test_the_demo_builds_its_data_only_without_a_data_dir():
    config = recipes.get_config("magface", "demo")
    assert config.data.dir is None and config.data.synthetic
    assert recipes.synthetic_data_dir(dict(config.data.synthetic_options)) == os.path.join(
        recipes.default_cache_dir(), "synthetic_300x50_nuisance0.25"
    )


def test_the_evaluation_line_is_short_and_names_each_set_once():
    line = logs.format_evaluation(
        {
            "verification/lfw/accuracy": 0.995,
            "verification/lfw/std": 0.0022,
            "verification/lfw/xnorm": 20.75,
            "quality/spearman_norm_vs_quality": 0.5227,
            "quality/spearman_recognisability_vs_quality": 0.5314,
            "quality/mean_norm_per_level/0": 14.56,
            "quality/mean_norm_per_level/1": 17.34,
        }
    )
    assert line == (
        "lfw accuracy 0.9950 ± 0.0022 (XNorm 20.75) | quality: Spearman(norm, "
        "level) 0.523, recognisability vs level 0.531; mean norm per level 14.6 17.3"
    )


def test_export_to_an_official_layout_names_the_demo_net_before_asking_for_torch(
    own_run, tmp_path, monkeypatch
):
    from magjax import convert, export
    from magjax.errors import UserError

    root, _, trained = own_run
    assert trained.returncode == 0

    def no_torch():
        raise RuntimeError("PyTorch is not installed")

    monkeypatch.setattr(convert, "_import_torch", no_torch)
    with pytest.raises(UserError, match="tiny is magjax's demo net; no official repository"):
        export.export_torch(root / "run", "magface", tmp_path / "x.pth")


def test_extract_with_every_image_unreadable_is_one_line(own_run, tmp_path):
    root, _, trained = own_run
    assert trained.returncode == 0
    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / "broken.jpg").write_bytes(b"not a jpeg")
    result = run(
        "magjax.extract",
        "--workdir",
        str(root / "run"),
        "--images",
        str(tmp_path / "faces"),
        "--out",
        str(tmp_path / "f.npz"),
        "--skip-unreadable",
        "--no-progress",
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: none of the 1 images could be read (all skipped as unreadable, named above)"
    )


def test_a_missing_evaluation_set_is_named_before_training_starts(tmp_path):
    from test_reliability import own_data_config
    from test_train import SYNTHETIC

    from magjax import data, train
    from magjax.errors import UserError

    dataset = data.prepare("synthetic", None, tmp_path / "data", progress=False, **SYNTHETIC)
    config = own_data_config(dataset, **{"eval.bins": ("lfw.bin",)})
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match=r"^config.eval: .*/data/lfw.bin not found; name "):
        train.train_and_evaluate(config, str(workdir))
    assert not (workdir / "checkpoints").exists()  # refused before anything was built


def test_a_run_saved_before_the_new_fields_still_resumes():
    """config.json of a run started before eval.heldout_sets and head.block_size existed: the
    resumed run's config differs only in those, which change nothing that is trained."""
    from magjax import config_check

    current = config_check.as_json_dict(recipes.get_config("arcface", "r50"))
    saved = json.loads(json.dumps(current))
    del saved["eval"]["heldout_sets"], saved["head"]["block_size"]
    assert config_check.changed_fields(saved, current) == []
    saved["eval"]["every_steps"] = 1
    assert config_check.changed_fields(saved, current) == ["eval.every_steps: 1 -> 2000"]
