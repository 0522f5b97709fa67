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

from tensorboardX import SummaryWriter

LOG_FILE = "train.log"


def _console_worthy(record: logging.LogRecord) -> bool:
    # magjax's own messages from INFO up; libraries (absl, orbax, jax) only from WARNING up.
    own = record.name == "magjax" or record.name.startswith("magjax.")
    return record.levelno >= (logging.INFO if own else logging.WARNING)


def route_logging(log_file: pathlib.Path | None) -> None:
    """Console: magjax's messages and anyone's warnings; ``log_file``: everything from INFO up.

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
    console.setFormatter(logging.Formatter("%(message)s"))
    console.addFilter(_console_worthy)
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file)
        to_file.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(to_file)
    logging.captureWarnings(True)


@contextlib.contextmanager
def native_stderr_to(log_file: pathlib.Path):
    """Sends what native libraries write to file descriptor 2 meanwhile to ``log_file``.

    For the start of the JAX backends: on a machine without a TPU, libtpu's probing prints
    several lines of warnings from C++, out of reach of Python's logging.
    """
    sys.stderr.flush()
    console = os.dup(2)
    try:
        with open(log_file, "ab") as target:
            os.dup2(target.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(console, 2)
    finally:
        os.close(console)


class MetricsLogger:
    """metrics.jsonl, TensorBoard events and the progress line of a training run; the progress
    line shows, besides the loss and learning rate, the scalars named in ``progress_keys``."""

    def __init__(self, workdir: pathlib.Path, *, enabled: bool = True,
                 progress_keys: tuple[str, ...] = ()):
        self.enabled = enabled
        self._progress_keys = progress_keys
        self._start = time.time()
        self._first_step: int | None = None
        if enabled:
            self._writer = SummaryWriter(str(workdir / "tensorboard"))
            self._jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 (kept open)

    def start_clock(self, step: int) -> None:
        """Times the progress line's ETA from now, when ``step`` has just been reached."""
        self._first_step, self._start = step, time.time()

    def write(self, step: int, scalars: dict, *, kind: str = "train",
              total_steps: int | None = None) -> None:
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
            shown = " ".join(f"{k}={v:.4f}" for k, v in scalars.items()
                             if isinstance(v, float))
            print(f"[eval {step}] {shown}", file=sys.stderr, flush=True)

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
        print(f"[{step}/{total_steps}] loss {scalars['loss']:.4f} lr {scalars['lr']:.4g}"
              f"{extra} {scalars.get('images_per_s', 0):.0f} img/s{eta}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
