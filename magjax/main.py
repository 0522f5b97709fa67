"""Trains a face-recognition model: ``python -m magjax.main --config CONFIG --workdir DIR``.

    python -m magjax.main --config configs/magface.py:demo --workdir runs/demo   # CPU demo
    python -m magjax.main --config configs/arcface.py:r100 --workdir gs://b/r100 \\
        --config.data.dir=/data/ms1mv2_tfds

Rerunning the same command resumes from the newest intact checkpoint in ``--workdir`` (a
finished run prints its summary and changes nothing); a changed config is refused unless
``--allow-config-change``. A second run on a workdir in use is refused in one line naming the
run that holds it (``WORKDIR/.lock``, released when that process ends, however it ends). Ctrl-C
during training saves a checkpoint after the current step (an evaluation due included) and
exits 130, as SIGTERM saves (exit 0); before training, after it, or pressed twice, it stops at
once, keeping the checkpoints already saved. A user error (bad flag or config field, missing
data, a workdir that is a file or read-only, a full disk) is one line on stderr and exit status
2, its traceback behind ``--verbose`` and in ``WORKDIR/train.log``, where library messages
(absl, orbax, jax) go too.

``--config magjax:LOSS[:VARIANTS]`` (e.g. ``magjax:magface:demo``) names the recipe file
``configs/LOSS.py`` shipped with the package (installed as ``magjax/configs``), so that an
installed magjax trains from any directory, without a checkout.

On a Cloud TPU pod slice or a SLURM cluster pass ``--multihost``
(``jax.distributed.initialize`` detects the cluster); elsewhere give ``--coordinator-address``,
``--num-processes`` and ``--process-id``.

Flags are spelled with hyphens as in every magjax command (``--allow-config-change``); absl's
underscores are accepted too. ``--config.`` overrides name config fields as they are written
(``--config.optim.grad_clip_norm=5``).
"""

import logging
import os
import pathlib
import re
import signal
import sys

from magjax import cpu_runtime

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as magjax.cli (not imported yet: it is used before)


def stop_at_once(signum=None, frame=None) -> None:
    """Ctrl-C where no training step runs (start-up, compilation, the final export): nothing
    is in flight that a checkpoint would keep, so the process ends at once with one line, and
    a rerun starts again or resumes from the newest checkpoint. The training loop takes Ctrl-C
    over meanwhile to save first (``magjax.train``); a second Ctrl-C there comes here."""
    del signum, frame
    for handler in logging.getLogger().handlers:
        handler.flush()
    # os.write: print() may be in the middle of a write of the main thread, which this
    # handler interrupts (a reentrant write of sys.stderr raises).
    os.write(
        2,
        b"stopped by Ctrl-C: the newest checkpoint in the workdir (if any) is kept; "
        b"rerun the same command to resume\n",
    )
    os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":  # before the imports below, which take seconds
    cpu_runtime.restart_with_malloc_tunables("magjax.main")
    signal.signal(signal.SIGINT, stop_at_once)  # not a KeyboardInterrupt traceback

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from magjax import cli, logs, train  # noqa: E402
from magjax import workdir as workdirs  # noqa: E402
from magjax.errors import UserError  # noqa: E402

RECIPE_PREFIX = "magjax:"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() (auto-detects TPU/SLURM)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume although the config differs from WORKDIR/config.json (the changes are logged).",
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "On a user error, print the full traceback too.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with any error (a misspelt or ill-typed ``--config.`` field, an
    unknown flag, a missing config file) reported as one line and exit status 2; ``--help``
    prints this module's documentation and the flags, and exits 0."""
    if any(arg in ("-h", "--help", "-help", "--helpshort") for arg in argv[1:]):
        print(__doc__)
        print(
            re.sub(
                r"--(\[no\])?(\w+)",
                lambda m: "--" + (m[1] or "") + m[2].replace("_", "-"),
                flags.FLAGS.module_help(sys.modules[__name__]),
            )
        )
        sys.exit(0)
    try:
        remaining = flags.FLAGS(expand_recipe_names(_underscored(argv)))
        if _CONFIG.present:  # ml_collections reports a config file's failure on first use
            _CONFIG.value.keys()
        return remaining
    except UserError as error:  # an unknown magjax:LOSS recipe
        sys.exit(cli.report_user_error(str(error)))
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as error:
        sys.exit(cli.report_user_error(_flag_error_message(error, argv)))


def _flag_error_message(error: Exception, argv: list[str]) -> str:
    # ml_collections wraps a KeyError ("'lrr'\nDid you mean ...") in an AttributeError.
    cause = error.args[0] if error.args else error
    while isinstance(cause, KeyError) and cause.args:
        cause = cause.args[0]
    message = cli.one_line(str(cause))
    last_line = str(cause).strip().splitlines()[-1].strip()
    if isinstance(error, OSError):  # the config file did not load: its last line says why
        return f"--config: {last_line}"
    if "Traceback (most recent call last)" in str(cause):  # the config file's get_config raised
        return f"--config: {last_line}"
    if isinstance(error, (AttributeError, KeyError)):
        field = re.match(r"'([^']+)'", message)
        culprit = [
            arg
            for arg in argv
            if field
            and arg.startswith("--config.")
            and arg.split("=")[0].endswith("." + field.group(1))
        ]
        where = culprit[0].split("=")[0] if culprit else "a --config. override"
        return f"{where}: no such config field {message}"
    return message


def main(argv):
    del argv
    workdir = pathlib.Path(_WORKDIR.value).absolute()
    status = cli.run(_start, verbose=_VERBOSE.value, log_file=workdir / logs.LOG_FILE)
    sys.exit(status)


_LOCK: workdirs.WorkdirLock | None = None  # held until the process ends


def _start() -> int | None:
    """The workdir checked and locked before anything is written to it (its log file
    included), then the run; a run Ctrl-C stopped after saving exits 130."""
    global _LOCK
    remote = workdirs.is_remote(_WORKDIR.value)
    workdir = pathlib.Path(_WORKDIR.value).absolute()
    if not remote:
        try:
            workdirs.prepare(workdir)
            # Process 0 locks; with --multihost its index is known once JAX has started.
            if not _MULTIHOST.value and (not _COORDINATOR.value or _PROCESS_ID.value == 0):
                _LOCK = workdirs.lock(workdir)
        except UserError as error:  # nothing is written there, not even the error to its log
            sys.exit(cli.report_user_error(cli.one_line(str(error))))
    logs.route_logging(workdir / logs.LOG_FILE, verbose=_VERBOSE.value)
    sys.unraisablehook = logs.log_unraisable
    if remote:
        logging.getLogger(__name__).info(
            "%s is remote: not locked against a second run", _WORKDIR.value
        )
    try:
        _train(lock=not remote and _MULTIHOST.value)
    except train.Interrupted:  # saved and stopped; the loop said so in one line
        return EXIT_INTERRUPTED
    return None


def _train(lock: bool = False) -> None:
    global _LOCK
    cpu_runtime.configure()
    forced = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if _CONFIG.value.cpu_devices and not forced:
        # Must happen before the backend starts; it only affects the CPU platform. A device
        # count forced through XLA_FLAGS (tests, users) takes precedence.
        jax.config.update("jax_num_cpu_devices", _CONFIG.value.cpu_devices)
    if _COORDINATOR.value:
        # Cross-process collectives on CPU need gloo; the setting is ignored on TPU/GPU. Asking
        # jax for its backend here would initialise it, which distributed.initialize forbids.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    elif _MULTIHOST.value:
        jax.distributed.initialize()
    logs.start_jax(pathlib.Path(_WORKDIR.value).absolute() / logs.LOG_FILE, verbose=_VERBOSE.value)
    if lock and jax.process_index() == 0:
        _LOCK = workdirs.lock(pathlib.Path(_WORKDIR.value).absolute())
    summary = train.train_and_evaluate(
        _CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
    )
    if summary is not None and jax.process_index() == 0:
        print(train.describe_results(summary, _WORKDIR.value))


def recipe_file(name: str) -> pathlib.Path:
    """The shipped recipe file ``NAME.py``: ``magjax/configs`` when installed (setuptools maps
    the checkout's top-level ``configs/`` there), else ``configs/`` beside the package."""
    package = pathlib.Path(__file__).parent
    candidates = [package / "configs", package.parent / "configs"]
    for directory in candidates:
        if (directory / f"{name}.py").is_file():
            return directory / f"{name}.py"
    found = sorted({p.stem for d in candidates if d.is_dir() for p in d.glob("[a-z]*.py")})
    raise UserError(
        f"--config {RECIPE_PREFIX}{name}: no recipe {name!r}; shipped recipes: "
        f"{', '.join(found) or 'none found'}"
    )


def _recipe_path(value: str) -> str:
    name, _, variants = value[len(RECIPE_PREFIX) :].partition(":")
    return str(recipe_file(name)) + (f":{variants}" if variants else "")


def _underscored(argv: list[str]) -> list[str]:
    """``--allow-config-change`` -> ``--allow_config_change`` (absl names flags with
    underscores); ``--config.`` overrides are left as written."""

    def flag(arg: str) -> str:
        if not arg.startswith("--") or arg.startswith("--config"):
            return arg
        name, sep, value = arg.partition("=")
        return name.replace("-", "_").replace("__", "--", 1) + sep + value

    return [argv[0], *map(flag, argv[1:])] if argv else argv


def expand_recipe_names(argv: list[str]) -> list[str]:
    """Rewrites ``--config magjax:LOSS[:VARIANTS]`` to ``--config <recipe file>[:VARIANTS]``."""
    expanded = list(argv)
    for index, arg in enumerate(expanded):
        if arg.startswith(f"--config={RECIPE_PREFIX}"):
            expanded[index] = "--config=" + _recipe_path(arg[len("--config=") :])
        elif (
            arg == "--config"
            and index + 1 < len(expanded)
            and expanded[index + 1].startswith(RECIPE_PREFIX)
        ):
            expanded[index + 1] = _recipe_path(expanded[index + 1])
    return expanded


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
