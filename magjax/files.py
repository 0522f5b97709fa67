"""Files written whole or not at all: a crash or a full disk never leaves half a result."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import IO


def _user_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process's umask. Linux reports the
    umask in /proc; elsewhere ``os.umask`` is the only way to read it, and it sets it too, so it
    is set back at once (a file another thread creates meanwhile could get the wrong mode)."""
    try:
        status = pathlib.Path("/proc/self/status").read_text()
        umask = int(
            next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8
        )
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def write_atomically(out: str | pathlib.Path, write: Callable[[str], None]) -> pathlib.Path:
    """Calls ``write(tmp_path)`` for a temporary file beside ``out``, then renames it to
    ``out``; the temporary file is removed if ``write`` fails. ``out`` gets the mode any new
    file of the user gets (``mkstemp`` creates 0600, which would keep a model or a summary from
    another user or a serving container)."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.fchmod(fd, _user_file_mode())
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def write_together_atomically(
    outs: Sequence[str | pathlib.Path], write: Callable[[pathlib.Path], None]
) -> list[pathlib.Path]:
    """Files that belong together (an ONNX graph and its external-data file): calls
    ``write(directory)``, which must write each of ``outs`` under its own name into
    ``directory``, a temporary directory beside them, then moves them into place, the last of
    ``outs`` last. The last one is the entry point, the file a reader opens and which names
    the others, so whenever it exists the others are complete. An entry point that already
    exists is removed before a companion is replaced (so that it never reads a newer
    companion); a crash between the moves thus leaves companions without an entry point,
    never a mixed pair. The temporary directory is removed whatever happens; every file gets
    the mode any new file of the user gets."""
    outs = [pathlib.Path(out) for out in outs]
    parent = outs[-1].parent
    if any(out.parent != parent for out in outs):
        raise ValueError(f"files written together must share a directory: {outs}")
    parent.mkdir(parents=True, exist_ok=True)
    directory = pathlib.Path(
        tempfile.mkdtemp(prefix=f".{outs[-1].name}.", suffix=".tmp", dir=parent)
    )
    try:
        write(directory)
        for out in outs:
            os.chmod(directory / out.name, _user_file_mode())
        if any(out.exists() for out in outs[:-1]):
            outs[-1].unlink(missing_ok=True)
        for out in outs:
            os.replace(directory / out.name, out)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return outs


def write_npz_atomically(out: str | pathlib.Path, arrays: dict) -> pathlib.Path:
    """``out`` holds ``np.savez`` of ``arrays`` afterwards, or what it held before. (The file
    object keeps ``np.savez`` from appending ``.npz`` to the temporary name.)"""
    import numpy as np

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return write_atomically(out, save)


def write_text_atomically(out: str | pathlib.Path, text: str) -> pathlib.Path:
    """``out`` holds ``text`` afterwards, or what it held before."""
    return write_atomically(out, lambda path: pathlib.Path(path).write_text(text))


def write_stream_atomically(
    out: str | pathlib.Path, write: Callable[[IO], None], *, mode: str = "w", **open_options
) -> pathlib.Path:
    """``out`` holds what ``write(f)`` writes to the open file ``f`` (``open(tmp, mode,
    **open_options)``) afterwards, or what it held before: for writers that take a file object
    (``csv.writer``, ``pickle.dump``)."""

    def write_path(tmp: str) -> None:
        with open(tmp, mode, **open_options) as f:
            write(f)

    return write_atomically(out, write_path)


def save_figure_atomically(figure, out: str | pathlib.Path, **savefig_options) -> pathlib.Path:
    """``out`` holds matplotlib ``figure`` afterwards, or what it held before, in the format its
    suffix names (as ``figure.savefig(out)`` infers it; the temporary file's name has none)."""
    out = pathlib.Path(out)
    return write_stream_atomically(
        out,
        lambda f: figure.savefig(f, format=out.suffix[1:] or None, **savefig_options),
        mode="wb",
    )
