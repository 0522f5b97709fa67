"""Training logs: TensorBoard event files, ``metrics.jsonl`` and a console progress line.

One JSON object per log or eval event, with ``step`` and ``kind`` ("train" or "eval"), so that a
run can be plotted or compared without TensorBoard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import sys
import time

LOG_FILE = "train.log"


def _console_worthy(record: logging.LogRecord) -> bool:
    # magjax's own messages from INFO up; libraries (absl, orbax, jax) only from WARNING up.
    own = record.name == "magjax" or record.name.startswith("magjax.")
    if record.exc_info and not own:
        # A library's traceback (orbax's background threads on a full disk print five): the
        # log file keeps it, and magjax reports the failure itself in one line.
        return False
    return record.levelno >= (logging.INFO if own else logging.WARNING)


def log_unraisable(unraisable) -> None:
    """``sys.unraisablehook`` for the command-line tools: an exception Python cannot raise
    anywhere (a callback into an event loop already closed: orbax's tensorstore writes print a
    hundred after one failed on a full disk) goes to the log file with its traceback, not to
    the console."""
    logging.getLogger("unraisable").warning(
        "%s: %r",
        unraisable.err_msg or "Exception ignored in",
        unraisable.object,
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
    )


class _LogFile(logging.FileHandler):
    """The log file, which a full disk or a workdir gone read-only must not turn into a
    "--- Logging error ---" traceback on the console for every message."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)


def route_logging(log_file: pathlib.Path | None, *, verbose: bool = False) -> None:
    """Console: magjax's messages and anyone's warnings (with ``verbose``, everything from INFO
    up); ``log_file``: everything from INFO up.

    Replaces the root logger's handlers (absl's among them), so that library chatter (absl,
    orbax and jax INFO messages) goes to the log file only. Python warnings are logged too.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    # absl sets its own logger to WARNING when it parses its flags (its --verbosity default),
    # which would keep orbax's and absl's INFO messages out of the log file too.
    logging.getLogger("absl").setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(
        logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s")
    )
    if not verbose:
        console.addFilter(_console_worthy)
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = _LogFile(log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(to_file)
    logging.captureWarnings(True)


def start_jax(log_file: pathlib.Path | None = None, *, verbose: bool = False) -> None:
    """Starts JAX's backends with what they print while probing for accelerators sent to
    ``log_file`` (or nowhere) instead of the console, unless ``verbose``.

    On a host without the accelerator, libtpu (requirements-tpu.txt) prints "Failed to find host
    bounds ..." and an ``INVALID_ARGUMENT`` error from C++, and the CUDA plugin logs "Unable to
    load CUDA" with a traceback: both read as failures, while JAX goes on, as meant, with the
    CPU. Python's own stderr is file descriptor 2 too, so the plugin's logged traceback follows
    the C++ lines there.
    """
    import jax

    if verbose:
        jax.devices()
        return
    with native_stderr_to(log_file):
        jax.devices()


@contextlib.contextmanager
def native_stderr_to(log_file: pathlib.Path | None):
    """Sends what is written to file descriptor 2 meanwhile (by native libraries, out of reach
    of Python's logging, and by Python) to ``log_file``, or nowhere when it is None."""
    sys.stderr.flush()
    console = os.dup(2)
    try:
        with open(log_file if log_file is not None else os.devnull, "ab") as target:
            os.dup2(target.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(console, 2)
    finally:
        os.close(console)


def format_evaluation(scalars: dict) -> str:
    """The console line of an evaluation (``metrics.jsonl`` keeps every number): each
    verification set's accuracy ± std and XNorm, the quality set's Spearman correlations and
    its mean norm per quality level."""
    parts, sets = [], {}
    for key, value in scalars.items():
        if key.startswith("verification/"):
            name, _, field = key.removeprefix("verification/").rpartition("/")
            sets.setdefault(name, {})[field] = value
    for name, r in sets.items():
        parts.append(
            f"{name} accuracy {r.get('accuracy', math.nan):.4f} ± "
            f"{r.get('std', math.nan):.4f} (XNorm {r.get('xnorm', math.nan):.2f})"
        )
    if "quality/spearman_norm_vs_quality" in scalars:
        levels = [f"{scalars[k]:.1f}" for k in scalars if k.startswith("quality/mean_norm_per")]
        parts.append(
            f"quality: Spearman(norm, level) "
            f"{scalars['quality/spearman_norm_vs_quality']:.3f}, recognisability vs "
            f"level {scalars.get('quality/spearman_recognisability_vs_quality', 0):.3f}"
            f"; mean norm per level {' '.join(levels)}"
        )
    shown = ("verification/", "quality/")
    parts += [
        f"{k} {v:.4g}"
        for k, v in scalars.items()
        if isinstance(v, float) and not k.startswith(shown)
    ]
    return " | ".join(parts)


METRICS_FILE = "metrics.jsonl"
DROPPED_METRICS_FILE = "metrics.dropped.jsonl"


def trim_metrics(path: pathlib.Path, restored_step: int) -> tuple[int, int]:
    """Makes ``path`` (metrics.jsonl) hold what a run resumed at ``restored_step`` continues:
    its complete records of steps up to ``restored_step``, one per ``(kind, step)`` (the last
    written), in step order. What it takes out (records of steps the resumed run computes
    again, a line a kill cut short, a repeated record) is appended to ``metrics.dropped.jsonl``
    beside it, never deleted; the rewrite itself is atomic. Returns ``(kept, dropped)``."""
    if not path.exists():
        return 0, 0
    records: dict[tuple[str, int], tuple[int, bytes]] = {}
    dropped: list[bytes] = []
    for index, line in enumerate(path.read_bytes().split(b"\n")):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = (str(record["kind"]), int(record["step"]))
        except (ValueError, TypeError, KeyError):  # a partial line, or not a record
            dropped.append(line)
            continue
        if key[1] > restored_step:
            dropped.append(line)
            continue
        if key in records:
            dropped.append(records[key][1])
        records[key] = (index, line)
    if not dropped:
        return len(records), 0
    from magjax import files

    with open(path.with_name(DROPPED_METRICS_FILE), "ab") as out:
        out.write(b"".join(line + b"\n" for line in dropped))
        out.flush()
        os.fsync(out.fileno())
    kept = sorted(records.items(), key=lambda item: (item[0][1], item[1][0]))
    files.write_atomically(
        path,
        lambda tmp: pathlib.Path(tmp).write_bytes(b"".join(line + b"\n" for _, (_, line) in kept)),
    )
    return len(kept), len(dropped)


class MetricsLogger:
    """metrics.jsonl, TensorBoard events and the progress line of a training run; the progress
    line shows, besides the loss and learning rate, the scalars named in ``progress_keys``.

    ``restored_step``: the step the run starts from (0 for a new run). metrics.jsonl is first
    trimmed to it (:func:`trim_metrics`), so that after a kill or a resume it still holds valid
    lines whose steps increase, and TensorBoard hides the events of the steps after it."""

    def __init__(
        self,
        workdir: pathlib.Path,
        *,
        enabled: bool = True,
        progress_keys: tuple[str, ...] = (),
        restored_step: int = 0,
    ):
        self.enabled = enabled
        self._progress_keys = progress_keys
        self._start = time.time()
        self._first_step: int | None = None
        if enabled:
            from tensorboardX import SummaryWriter  # only for training: commands start faster

            kept, dropped = trim_metrics(workdir / METRICS_FILE, restored_step)
            if dropped:
                logging.getLogger(__name__).info(
                    "%s: %d records of steps after %d (computed again now) or cut short moved "
                    "to %s; %d kept",
                    workdir / METRICS_FILE,
                    dropped,
                    restored_step,
                    DROPPED_METRICS_FILE,
                    kept,
                )
            self._writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=restored_step + 1)
            self._jsonl = open(workdir / METRICS_FILE, "a")  # noqa: SIM115 (kept open)

    def start_clock(self, step: int) -> None:
        """Times the progress line's ETA from now, when ``step`` has just been reached."""
        self._first_step, self._start = step, time.time()

    def write(
        self, step: int, scalars: dict, *, kind: str = "train", total_steps: int | None = None
    ) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **scalars}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{kind}/{name}", value, step)
        self._writer.flush()
        if kind == "train":
            self._progress(step, scalars, total_steps)
        else:
            print(f"[eval {step}] {format_evaluation(scalars)}", file=sys.stderr, flush=True)

    def _progress(self, step: int, scalars: dict, total_steps: int | None) -> None:
        if self._first_step is None:
            self._first_step, self._start = step, time.time()
        done = step - self._first_step
        elapsed = time.time() - self._start
        eta = ""
        if total_steps and done > 0:
            remaining = elapsed / done * (total_steps - step)
            eta = f" eta {int(remaining // 60)}m{int(remaining % 60):02d}s"
        extra = "".join(f" {k} {scalars[k]:.3g}" for k in self._progress_keys if k in scalars)
        print(
            f"[{step}/{total_steps}] loss {scalars['loss']:.4f} lr {scalars['lr']:.4g}"
            f"{extra} {scalars.get('images_per_s', 0):.0f} img/s{eta}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
