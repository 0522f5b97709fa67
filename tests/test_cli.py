"""The command-line entry points: a user's mistake is one line on stderr and exit status 2, the
traceback behind --verbose (and in the workdir's log file); results are never lost."""

import importlib
import json
import logging
import pathlib
import sys

import numpy as np
import pytest
from absl import flags
from PIL import Image
from test_encoder import faces, random_variables

from magjax import checkpoint, cli, convert, evaluate, evaluators, extract, models
from magjax import main as train_main
from magjax.data import __main__ as data_main
from magjax.data import verification_bin
from magjax.errors import UserError

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 'tiny' inference model (as convert or training would write it)."""
    root = tmp_path_factory.mktemp("model")
    checkpoint.save_inference_model(
        root, random_variables(), {"arch": "tiny", "input_spec": models.input_spec("tiny")}
    )
    return root


def write_toy_bin(path, seed=0, pairs=10):
    rng = np.random.default_rng(seed)
    images = faces(seed, 2 * pairs)
    issame = rng.random(pairs) < 0.5
    images[1::2][issame] = images[0::2][issame]
    verification_bin.write_bin(path, images, issame.tolist())


def test_run_turns_user_errors_into_one_line_and_keeps_bugs(tmp_path, capsys):
    def missing():
        (tmp_path / "nope.txt").read_text()

    assert cli.run(missing) == cli.EXIT_USER_ERROR
    assert one_error_line(capsys.readouterr().err) == (
        f"error: No such file or directory: {tmp_path / 'nope.txt'}"
    )

    def bad_value():
        raise UserError("config.x must be > 0,\n got -1")

    log_file = tmp_path / "tool.log"
    assert cli.run(bad_value, verbose=True, log_file=log_file) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == (
        "error: config.x must be > 0, got -1"
    )
    assert "Traceback" in log_file.read_text() and "bad_value" in log_file.read_text()

    def bug():
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        cli.run(bug)


@pytest.fixture
def parse_main_flags(monkeypatch):
    """``magjax.main``'s flag parsing of an argv; absl's global flags are unparsed (and the root
    logger restored) after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def parse(argv):
        monkeypatch.setattr(sys, "argv", argv)  # ml_collections finds overrides in sys.argv
        return train_main.parse_flags(argv)

    yield parse
    flags.FLAGS.unparse_flags()
    for name in list(flags.FLAGS):  # the override flags ml_collections defined while parsing
        if name.startswith("config."):
            delattr(flags.FLAGS, name)
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.mark.parametrize(
    "override,expected",
    [
        (
            "--config.optim.lrr=0.1",
            "error: --config.optim.lrr: no such config field 'lrr' "
            'Did you mean "lr" instead of "lrr"?',
        ),
        (
            "--config.optim.lr=fast",
            "error: flag --config.optim.lr=fast: could not convert string to float: 'fast'",
        ),
        ("--config.nope=1", "error: --config.nope: no such config field 'nope'"),
    ],
    ids=["misspelt", "ill-typed", "unknown"],
)
def test_main_bad_config_override_is_one_line(
    override, expected, parse_main_flags, tmp_path, capsys
):
    # Before: 58 lines of traceback ending in AttributeError: '\'lrr\'\nDid you mean ...'
    argv = [
        "magjax.main",
        "--config",
        f"{CONFIGS}/arcface.py:demo",
        "--workdir",
        str(tmp_path),
        override,
    ]
    with pytest.raises(SystemExit) as info:
        parse_main_flags(argv)
    assert info.value.code == cli.EXIT_USER_ERROR
    assert one_error_line(capsys.readouterr().err) == expected


@pytest.mark.parametrize(
    "config,expected",
    [
        ("missing.py", "No such file or directory: "),
        ("arcface.py:r101", "unknown config variant 'r101'"),
    ],
    ids=["missing", "bad-variant"],
)
def test_main_bad_config_file_is_one_line(config, expected, parse_main_flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        parse_main_flags(
            ["magjax.main", "--config", f"{CONFIGS}/{config}", "--workdir", str(tmp_path)]
        )
    assert info.value.code == cli.EXIT_USER_ERROR
    assert expected in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("tool", ["compile", "capacity"])
def test_bench_bad_config_variant_is_one_line(tool, capsys):
    # Before: a ValueError traceback from the recipe (magjax.main already said it in one line).
    # The tool's own main: `python -m magjax.bench` may re-execute itself (a deeper stack).
    module = importlib.import_module(f"magjax.bench.{tool}")
    config = f"{CONFIGS}/adaface.py:ir101"
    status = module.main(["--topology", "v5e:2x2", "--config", config])
    assert status == cli.EXIT_USER_ERROR
    assert one_error_line(capsys.readouterr().err) == (
        f"error: --config {config}: unknown config variant 'ir101' in 'ir101'; "
        "see magjax/recipes.py for the list"
    )


@pytest.mark.parametrize(
    "override,field",
    [
        ("--config.num_devices=0", "config.num_devices"),  # was IndexError
        ("--config.checkpoint.every_steps=0", "config.checkpoint.every_steps"),  # ZeroDivisionError
        ("--config.optim.lr=-0.1", "config.optim.lr"),  # trained by gradient ascent
        # Another loss's name with ArcFace's fields (the loss is chosen by its config file).
        ("--config.loss.name=magface", "config.loss.interclass_filtering_threshold"),
    ],
    ids=["num_devices", "every_steps", "lr", "loss_name"],
)
def test_main_bad_config_value_is_one_line_with_traceback_in_the_log(
    override, field, parse_main_flags, tmp_path, capsys
):
    workdir = tmp_path / "run"
    parse_main_flags(
        [
            "magjax.main",
            "--config",
            f"{CONFIGS}/arcface.py:demo",
            "--workdir",
            str(workdir),
            override,
        ]
    )
    with pytest.raises(SystemExit) as info:
        train_main.main([])
    assert info.value.code == cli.EXIT_USER_ERROR
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {field} ")
    assert "Traceback" in (workdir / "train.log").read_text()


def test_evaluate_keeps_the_sets_done_before_one_fails(model_dir, tmp_path, capsys):
    # Before: the missing third set raised and no eval.json was written at all.
    for name, seed in (("a.bin", 1), ("b.bin", 2)):
        write_toy_bin(tmp_path / name, seed)
    missing = tmp_path / "gone.bin"
    out = tmp_path / "eval"
    status = evaluate.main(
        [
            "--workdir",
            str(model_dir),
            "--bins",
            f"{tmp_path / 'a.bin'},{missing},{tmp_path / 'b.bin'}",
            "--out",
            str(out),
            "--batch",
            "4",
            "--no-progress",
        ]
    )
    assert status == cli.EXIT_USER_ERROR
    report = json.loads((out / "eval.json").read_text())
    assert set(report["verification"]) == {"a", "b"}
    assert 0.0 <= report["verification"]["a"]["accuracy"] <= 1.0
    assert report["failed"] == {str(missing): f"{missing}: verification .bin not found"}
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: 1 of 3 .bin sets failed") and str(missing) in err[-1]
    assert not list(out.glob("*.tmp"))


def test_evaluate_writes_each_set_as_it_completes(model_dir, tmp_path, monkeypatch):
    write_toy_bin(tmp_path / "a.bin", 1)
    write_toy_bin(tmp_path / "b.bin", 2)
    out = tmp_path / "eval"
    seen = []
    original = evaluators.Verification.run_set

    def spy(self, encoder, path):
        if (out / "eval.json").exists():
            seen.append(sorted(json.loads((out / "eval.json").read_text())["verification"]))
        return original(self, encoder, path)

    monkeypatch.setattr(evaluators.Verification, "run_set", spy)
    assert (
        evaluate.main(
            [
                "--workdir",
                str(model_dir),
                "--bins",
                f"{tmp_path / 'a.bin'},{tmp_path / 'b.bin'}",
                "--out",
                str(out),
                "--batch",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    assert seen == [["a"]]  # a's results were on disk while b was evaluated


def test_convert_refuses_an_existing_out_directory(model_dir, tmp_path, capsys):
    # Before: the model in --out was replaced without a word.
    out = tmp_path / "models" / "r50"
    out.mkdir(parents=True)
    (out / "model.json").write_text('{"arch": "iresnet50"}')
    argv = [
        "--from",
        "arcface_torch",
        str(tmp_path / "backbone.pth"),
        "--arch",
        "iresnet50",
        "--out",
        str(out),
    ]
    assert convert.main(argv) == cli.EXIT_USER_ERROR
    assert one_error_line(capsys.readouterr().err) == (
        f"error: --out {out} already exists; pass --overwrite to replace it"
    )
    assert (out / "model.json").read_text() == '{"arch": "iresnet50"}'
    # with --overwrite the directory is no obstacle: the next error is the missing checkpoint
    assert convert.main([*argv, "--overwrite"]) == cli.EXIT_USER_ERROR
    assert "backbone.pth" in one_error_line(capsys.readouterr().err)


def test_extract_batch_size_zero_is_one_line(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        extract.main(
            [
                "--workdir",
                str(model_dir),
                "--images",
                str(tmp_path),
                "--out",
                str(tmp_path / "f.npz"),
                "--batch",
                "0",
            ]
        )
    assert info.value.code == cli.EXIT_USER_ERROR
    assert one_error_line(capsys.readouterr().err) == (
        "error: argument --batch/--batch-size: must be a positive integer, got 0 "
        "(see python -m magjax.extract --help)"
    )


def test_corrupt_model_json_names_the_file(model_dir, tmp_path, capsys):
    # Before: a bare JSONDecodeError traceback without the file name.
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "model.json").write_text('{"arch": "tiny", ')
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(faces(0, 1)[0]).save(images / "a.png")
    assert (
        extract.main(
            [
                "--workdir",
                str(broken),
                "--images",
                str(images),
                "--out",
                str(tmp_path / "f.npz"),
                "--no-progress",
            ]
        )
        == cli.EXIT_USER_ERROR
    )
    line = one_error_line(capsys.readouterr().err)
    assert f"{broken / 'model.json'} is not valid JSON" in line


def test_data_inspect_missing_dataset_is_one_line(tmp_path, capsys):
    assert data_main.main(["inspect", str(tmp_path / "nope")]) == cli.EXIT_USER_ERROR
    assert f"{tmp_path / 'nope'}: no prepared dataset" in one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as info:
        data_main.main(["prepare", "--format", "tfrecord", "--out", str(tmp_path)])
    assert info.value.code == cli.EXIT_USER_ERROR
    assert "--format" in one_error_line(capsys.readouterr().err)


HELP_ENTRY_POINTS = [
    "magjax.evaluate",
    "magjax.extract",
    "magjax.convert",
    "magjax.export",
    "magjax.data",
    "magjax.refcheck",
    "magjax.models",
    "magjax.bench",
    *(
        f"magjax.bench {name}"
        for name in ("head", "backbone", "input", "train", "compile", "capacity", "export")
    ),
]


@pytest.mark.parametrize("command", HELP_ENTRY_POINTS)
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy, re-run
def test_every_help_exits_0_with_an_example(command, monkeypatch, capsys):
    import runpy

    module, *rest = command.split()
    monkeypatch.setattr(sys, "argv", [module, *rest, "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert f"python -m {command} " in out or f"python -m {command}\n" in out, out


def test_main_help_exits_0_with_hyphenated_flags(capsys):
    with pytest.raises(SystemExit) as info:
        train_main.parse_flags(["magjax.main", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m magjax.main --config" in out and "--allow-config-change" in out
    assert train_main._underscored(
        ["m", "--allow-config-change", "--config.optim.grad_clip_norm=5", "--num-processes=2"]
    ) == ["m", "--allow_config_change", "--config.optim.grad_clip_norm=5", "--num_processes=2"]


def test_evaluate_quality_set_is_the_training_evaluator(model_dir, tmp_path):
    """``--quality-set`` runs the evaluator training runs: the Spearman correlation of the
    encoder's norms with the levels and the mean norm per level, computed here independently."""
    import scipy.stats

    from magjax.encoder import FaceEncoder

    images = faces(3, 24)
    levels = np.repeat(np.arange(1, 5), 6)  # 4: the clean level, the synthetic data's
    images[levels == 1] //= 4  # darker faces at the low level: norms that differ by level
    identities = np.tile(np.arange(6), 4)
    np.savez(tmp_path / "quality.npz", images=images, quality=levels, labels=identities)
    out = tmp_path / "eval"
    assert (
        evaluate.main(
            [
                "--workdir",
                str(model_dir),
                "--quality-set",
                str(tmp_path / "quality.npz"),
                "--out",
                str(out),
                "--batch",
                "8",
            ]
        )
        == 0
    )
    got = json.loads((out / "eval.json").read_text())["quality"]
    norms = FaceEncoder.load(model_dir).encode(images)[1]
    assert got["spearman_norm_vs_quality"] == pytest.approx(
        scipy.stats.spearmanr(norms, levels).statistic, abs=1e-6
    )
    assert got["mean_norm_per_level"]["1"] == pytest.approx(norms[levels == 1].mean(), rel=1e-5)
