"""Files written whole or not at all: a crash or a full disk never leaves half a result."""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Callable


def write_atomically(out: str | pathlib.Path, write: Callable[[str], None]) -> pathlib.Path:
    """Calls ``write(tmp_path)`` for a temporary file beside ``out``, then renames it to
    ``out``; the temporary file is removed if ``write`` fails."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def write_text_atomically(out: str | pathlib.Path, text: str) -> pathlib.Path:
    """``out`` holds ``text`` afterwards, or what it held before."""
    return write_atomically(out, lambda path: pathlib.Path(path).write_text(text))
