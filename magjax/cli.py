"""What every ``python -m magjax.<tool>`` shares: a user's mistake is one line, a bug a traceback.

:func:`run` calls a tool's work. A user error (:class:`magjax.errors.UserError`, a missing,
misplaced or unreadable path) prints ``error: MESSAGE`` as one line on stderr and the tool exits
with :data:`EXIT_USER_ERROR`; the traceback is shown with ``--verbose`` and appended to the tool's
log file in its workdir when there is one. Any other exception is a bug: it propagates with its
traceback. :class:`ArgumentParser` makes a bad flag one line too.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import traceback
from collections.abc import Callable

from magjax.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program Ctrl-C ended
_PATH_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of blanks collapsed to single spaces."""
    return " ".join(str(text).split())


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of a user's mistake, or None when ``error`` is a bug."""
    if isinstance(error, UserError):
        return one_line(str(error))
    if isinstance(error, _PATH_ERRORS):
        # OSError(errno, strerror, filename) prints as "[Errno 2] No such file ...: 'x'";
        # magjax's own raises carry a full message and no filename.
        if error.filename is not None:
            return one_line(f"{error.strerror}: {error.filename}")
        return one_line(str(error))
    return None


def report_user_error(message: str) -> int:
    """Prints ``error: message`` on stderr; returns the exit status of a user error."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def run(
    work: Callable[[], int | None],
    *,
    verbose: bool = False,
    log_file: str | pathlib.Path | None = None,
) -> int:
    """Runs ``work()``; returns its exit status, :data:`EXIT_USER_ERROR` on a user error, or
    :data:`EXIT_INTERRUPTED` after one line when Ctrl-C stopped it.

    ``log_file`` (appended to, when its directory exists) receives the traceback of a user
    error, so that a one-line console message still leaves the details on disk.
    """
    try:
        return work() or 0
    except KeyboardInterrupt:
        # Ctrl-C: every result file is written whole or not at all (magjax.files), so nothing
        # is left half-written and a traceback would only hide that.
        print("stopped by Ctrl-C", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as error:
        message = user_error_message(error)
        if message is None:
            raise
        details = traceback.format_exc()
        if verbose:
            print(details, file=sys.stderr, end="")
        if log_file is not None and pathlib.Path(log_file).parent.is_dir():
            try:
                with open(log_file, "a") as log:
                    log.write(details)
            except OSError:  # a read-only or full workdir: the message itself must still show
                pass
        return report_user_error(message)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose", action="store_true", help="on a user error, print the full traceback as well"
    )


def add_arch_argument(
    parser: argparse.ArgumentParser, archs: tuple[str, ...], *names: str, **options
) -> None:
    """An architecture argument (``names``, e.g. ``"--arch"``) among ``archs`` (``models.ARCHS``,
    passed in: this module must not import jax before the entry points configure it)."""
    parser.add_argument(
        *names, choices=archs, metavar="ARCH", help=f"one of {', '.join(archs)}", **options
    )


def add_image_batch_argument(parser: argparse.ArgumentParser) -> None:
    """``--batch`` / ``--batch-size``: images per forward pass (evaluate, extract)."""
    parser.add_argument(
        "--batch",
        "--batch-size",
        type=positive_int,
        default=64,
        dest="batch",
        help="images per forward pass (default 64)",
    )


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors (unknown flag, bad value, missing argument) are one line."""

    def error(self, message: str):
        sys.exit(report_user_error(f"{one_line(message)} (see {self.prog} --help)"))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value
