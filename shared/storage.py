"""Files on disk: content-addressed uploads and per-job artifact folders.

Layout under ``data_dir``::

    uploads/<sha256>          the uploaded bytes, named by their SHA-256
    jobs/<job uuid>/<name>    artifacts of one job (names from
                              ``shared.imaging.render.ARTIFACT_NAMES``)

Every path is built by the server from a validated hash, UUID or artifact key,
never from user-supplied names, so no request can reach outside ``data_dir``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: A store key: relative, ``/``-separated, no ``..``; built by the server only.
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")


def check_key(key: str) -> str:
    """``key`` if it is a safe relative store key (``jobs/<id>/mask.png``), else ``ValueError``."""
    if not isinstance(key, str) or not _KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"not a valid store key: {key!r}")
    return key


def job_key(job_id: uuid.UUID | str) -> str:
    """``jobs/<id>``: the default artifacts key of a job."""
    return f"jobs/{parse_job_id(job_id)}"


def artifact_names() -> dict[str, str]:
    """Artifact key -> file name (``render.ARTIFACT_NAMES``), imported lazily."""
    from shared.imaging.render import ARTIFACT_NAMES

    return dict(ARTIFACT_NAMES)


def parse_job_id(job_id: uuid.UUID | str) -> uuid.UUID:
    """``job_id`` as a :class:`uuid.UUID`; ``ValueError`` if it is not a UUID."""
    if isinstance(job_id, uuid.UUID):
        return job_id
    if not isinstance(job_id, str):
        raise ValueError(f"job id must be a UUID, got {type(job_id).__name__}")
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise ValueError(f"job id must be a UUID, got {job_id!r}") from None


def check_sha256(sha: str) -> str:
    """``sha`` if it is 64 lowercase hex digits, else ``ValueError``."""
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise ValueError(f"not a SHA-256 hex digest: {sha!r}")
    return sha


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and ``os.replace``.

    Readers see either the old file or the complete new one, never a prefix.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class Storage:
    """Paths and atomic writes under one data folder.

    Args:
        data_dir: root folder (``DATA_DIR``); created lazily on first write.
    """

    def __init__(self, data_dir: str | os.PathLike[str]):
        self.data_dir = Path(data_dir).resolve()

    def __repr__(self) -> str:
        return f"Storage({str(self.data_dir)!r})"

    def delete(self, key: str) -> None:
        """Remove the file ``key`` (a relative path under ``data_dir``) if it exists."""
        try:
            (self.data_dir / check_key(key)).unlink(missing_ok=True)
        except OSError:
            pass

    def delete_prefix(self, prefix: str) -> None:
        """Remove the folder ``prefix`` (a relative path under ``data_dir``) and all it holds."""
        shutil.rmtree(self.data_dir / check_key(prefix), ignore_errors=True)

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    def save_upload(self, data: bytes) -> str:
        """Store ``data`` as ``uploads/<sha256>`` (atomic, idempotent); return the hash."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"upload data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        path = self.upload_path(sha)
        if path.is_file() and path.stat().st_size == len(data):
            return sha
        atomic_write(path, data)
        return sha

    def upload_path(self, sha: str) -> Path:
        """Path of the upload with hash ``sha`` (which may not exist)."""
        return self.uploads_dir / check_sha256(sha)

    def read_upload(self, sha: str) -> bytes:
        """The bytes of upload ``sha``; ``FileNotFoundError`` if missing."""
        return self.upload_path(sha).read_bytes()

    @property
    def previews_dir(self) -> Path:
        return self.data_dir / "previews"

    def preview_path(self, job_id: uuid.UUID | str) -> Path:
        """The live preview of a running job (``previews/<id>.png``, which may not exist)."""
        return self.previews_dir / f"{parse_job_id(job_id)}.png"

    def job_dir(self, job_id: uuid.UUID | str) -> Path:
        """Artifact folder of ``job_id`` (which must be a UUID)."""
        return self.jobs_dir / str(parse_job_id(job_id))

    def artifact_path(self, job_id: uuid.UUID | str, key: str) -> Path:
        """Path of artifact ``key`` of ``job_id``.

        ``key`` must be one of ``render.ARTIFACT_NAMES``' keys, else
        ``ValueError`` listing the valid ones.
        """
        names = artifact_names()
        if not isinstance(key, str) or key not in names:
            raise ValueError(f"unknown artifact {key!r}; expected one of {', '.join(sorted(names))}")
        return self.job_dir(job_id) / names[key]
