"""The training workdir made ready before anything is written to it: created, checked (one line
naming the path when it is a file, under a file or not writable) and locked against a second run.

The lock is ``WORKDIR/.lock``, held with ``fcntl.flock`` for the life of the process: the kernel
releases it when the process ends however it ends (a kill, a crash), so a dead run never leaves
the workdir locked. The file names the holder (pid, host, start time) for the message a second
run prints. ``flock`` works across machines on NFSv4 (and NFSv3 with lockd), as Linux emulates it
with byte-range locks there; on a file system without locks (some FUSE mounts, Lustre without
``-o flock``) the run goes on unlocked with a warning. A remote workdir (``gs://...``) is not
locked: object stores have no locks, and such runs are started by one launcher per slice.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import logging
import os
import pathlib
import socket

from magjax.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


def is_remote(workdir: str) -> bool:
    """Whether ``workdir`` names an object store (``gs://``, ``s3://``) rather than a path."""
    return "://" in str(workdir)


def prepare(workdir: str | pathlib.Path, flag: str = "--workdir") -> pathlib.Path:
    """Creates ``workdir`` (and its parents) and checks that files can be written there.

    Each problem is a ``UserError`` naming the path: the workdir is a file, a path above it is
    a file, or the directory cannot be created or written (permissions, a read-only file
    system, a full disk).
    """
    path = pathlib.Path(workdir).absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a directory: name a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / LOCK_FILE
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o644))
    except OSError as error:
        raise UserError(
            f"{flag} {path} cannot be written: {error.strerror or error} ({error.filename or path})"
        ) from None
    return path


class WorkdirLock:
    """``WORKDIR/.lock`` held with ``flock`` until :meth:`release` or the end of the process."""

    def __init__(self, fd: int | None, path: pathlib.Path):
        self._fd, self.path = fd, path

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def lock(workdir: str | pathlib.Path, flag: str = "--workdir") -> WorkdirLock:
    """Takes the workdir's lock, or raises a ``UserError`` naming the run that holds it.

    Call :func:`prepare` first. Never waits: a second run on a workdir in use stops at once.
    """
    path = pathlib.Path(workdir).absolute() / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd).strip() or "a process that has not written its name yet"
        os.close(fd)
        raise UserError(
            f"{flag} {path.parent} is in use by another run ({holder}; lock "
            f"{path}): wait for it to end, stop it, or use another {flag}"
        ) from None
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        log.warning(
            "%s: the file system does not support locks (%s); the workdir is not "
            "protected against a second run",
            path,
            error.strerror,
        )
        return WorkdirLock(None, path)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    os.ftruncate(fd, 0)
    os.pwrite(
        fd, f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode(), 0
    )
    return WorkdirLock(fd, path)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return ""
