"""Is the data store usable? Free space and writability of ``DATA_DIR``.

Pure checks on a local folder, kept apart from :class:`shared.storage.Storage`
so that another backend can bring its own. The web calls :func:`check_storage`
before it accepts an upload and from ``/readyz``; :func:`classify_os_error`
turns a failed write into the same two kinds of fault; the worker words a job
that failed for disk space with :func:`disk_full_message`, and one it
refuses to start on a (nearly) full disk with :func:`disk_low_message`.

Two kinds of fault (:attr:`StorageFault.kind`):

* ``"full"``: less than ``min_free_mb`` MiB free, or a write failed with
  ``ENOSPC``/``EDQUOT`` (the web answers 507 ``insufficient_storage``);
* ``"unavailable"``: the folder cannot be written (read-only file system,
  permissions, I/O error; the web answers 503 ``storage_unavailable``).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

FULL = "full"
UNAVAILABLE = "unavailable"

#: errno values that mean "no space left" (disk full, quota exceeded).
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class StorageFault(Exception):
    """The data store cannot take a write.

    Attributes:
        kind: :data:`FULL` or :data:`UNAVAILABLE`.
        message: a readable sentence for users and logs.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def free_mb(path: str | os.PathLike[str]) -> float:
    """MiB available to an unprivileged user on the file system of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 1048576


def check_free_space(path: str | os.PathLike[str], min_free_mb: float) -> float:
    """Free MiB at ``path``; :class:`StorageFault` ``full`` when below ``min_free_mb``."""
    free = free_mb(path)
    if free < min_free_mb:
        raise StorageFault(FULL, f"The data store is almost full ({free:.0f} MiB free, "
                                 f"{min_free_mb:g} MiB needed); nothing was stored.")
    return free


def check_writable(path: str | os.PathLike[str]) -> None:
    """Create, write and remove a probe file in ``path`` (created if missing);
    :class:`StorageFault` (from :func:`classify_os_error`) if that fails."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ebb-probe-", suffix=".tmp")
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise classify_os_error(exc) from exc


def check_storage(data_dir: str | os.PathLike[str], min_free_mb: float) -> float:
    """Both checks on ``data_dir``: writable, then at least ``min_free_mb`` MiB
    free. Returns the free MiB; raises :class:`StorageFault`."""
    check_writable(data_dir)
    try:
        return check_free_space(data_dir, min_free_mb)
    except OSError as exc:  # statvfs failing: treat like an unwritable store
        raise classify_os_error(exc) from exc


def classify_os_error(exc: OSError) -> StorageFault:
    """The :class:`StorageFault` for a failed file operation: ``full`` for
    ``ENOSPC``/``EDQUOT``, ``unavailable`` for anything else (``EROFS``,
    ``EACCES``, ``EIO``...)."""
    if exc.errno in _FULL_ERRNOS:
        return StorageFault(FULL, "The data store is full (no space left on device); nothing was stored.")
    reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    return StorageFault(UNAVAILABLE, f"The data store cannot be written ({reason}); nothing was stored.")


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` or one of its causes is an ``ENOSPC``/``EDQUOT`` :class:`OSError`."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(error: BaseException) -> str:
    """The job error for a run that failed because the disk filled up."""
    detail = " ".join(str(error).split())
    return ("The server ran out of disk space while saving this job's results "
            f"({detail}). Please resubmit the job once space is available.")


def disk_low_message(free: float, min_free_mb: float) -> str:
    """The job error for a run refused because ``DATA_DIR`` is (almost) full."""
    return (f"The server's disk is full ({free:.0f} MiB free, EBB_MIN_FREE_MB={min_free_mb:g} needed), "
            "so this job was not run. Please resubmit the job once space is available.")
