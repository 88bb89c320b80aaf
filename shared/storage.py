"""The store: content-addressed uploads and per-job artifact folders, on a
local disk (:class:`Storage`, ``STORAGE_URL=file:///path``) or in an
S3-compatible object store (:class:`S3Storage`, ``STORAGE_URL=s3://bucket/prefix``);
:func:`open_storage` picks one from the settings.

Both name things by *keys* (``uploads/<sha256>``, ``jobs/<id>/...``,
``previews/<id>.png``): paths under ``data_dir`` on disk, object names under
the prefix in a bucket. Layout under ``data_dir``::

    uploads/<sha256>          the uploaded bytes, named by their SHA-256
    jobs/<job uuid>/<name>    artifacts of one job (names from
                              ``shared.imaging.render.ARTIFACT_NAMES``)

Every path is built by the server from a validated hash, UUID or artifact key,
never from user-supplied names, so no request can reach outside ``data_dir``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: A store key: relative, ``/``-separated, no ``..``; built by the server only.
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")


class StorageUnavailable(Exception):
    """The store cannot be reached (or refuses the request); the message says why."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a reader needs to serve a stored object."""

    key: str
    size: int
    etag: str
    last_modified: datetime


#: File suffix -> content type of stored objects (artifacts, previews).
CONTENT_TYPES = {".npy": "application/octet-stream", ".png": "image/png", ".json": "application/json",
                 ".jpg": "image/jpeg"}


def content_type_for(name: str) -> str:
    return CONTENT_TYPES.get(os.path.splitext(name)[1].lower(), "application/octet-stream")


def check_key(key: str) -> str:
    """``key`` if it is a safe relative store key (``jobs/<id>/mask.png``), else ``ValueError``."""
    if not isinstance(key, str) or not _KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"not a valid store key: {key!r}")
    return key


def job_key(job_id: uuid.UUID | str) -> str:
    """``jobs/<id>``: the default artifacts key of a job (file store, rows before 0004)."""
    return f"jobs/{parse_job_id(job_id)}"


def preview_key(job_id: uuid.UUID | str) -> str:
    return f"previews/{parse_job_id(job_id)}.png"


def attempt_token(attempt: int) -> str:
    """A fresh name for one attempt's artifact prefix: ``a<attempt>-<8 hex>``."""
    return f"a{int(attempt)}-{uuid.uuid4().hex[:8]}"


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
    """The file store: paths and atomic writes under one data folder.

    Args:
        data_dir: root folder (``DATA_DIR``); created lazily on first write.
    """

    kind = "file"

    def __init__(self, data_dir: str | os.PathLike[str]):
        self.data_dir = Path(data_dir).resolve()

    # generic key interface (shared with S3Storage)

    def local_path(self, key: str) -> Path | None:
        """The file of ``key`` (which may not exist); None on an object store."""
        return self.data_dir / check_key(key)

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        atomic_write(self.data_dir / check_key(key), bytes(data))

    def get(self, key: str) -> bytes:
        """The bytes of ``key``; ``FileNotFoundError`` if missing."""
        return (self.data_dir / check_key(key)).read_bytes()

    def exists(self, key: str) -> bool:
        return (self.data_dir / check_key(key)).is_file()

    def delete(self, key: str) -> None:
        try:
            (self.data_dir / check_key(key)).unlink(missing_ok=True)
        except OSError:
            pass

    def list_keys(self, prefix: str) -> set[str]:
        """Keys of the files under folder ``prefix``."""
        root = self.data_dir / check_key(prefix)
        if not root.is_dir():
            return set()
        return {f"{prefix}/{p.relative_to(root).as_posix()}" for p in root.rglob("*") if p.is_file()}

    def write_artifacts(self, job_id: uuid.UUID | str, attempt: int, render: Callable[[Path], Any],
                        retries: int = 1, on_retry: Callable[[], Any] | None = None) -> str:
        """Let ``render(folder)`` write a job's artifacts (atomically, see
        ``render.save_artifacts``) into ``jobs/<id>``; return that key."""
        render(self.job_dir(job_id))
        return job_key(job_id)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.data_dir / check_key(prefix), ignore_errors=True)

    def check(self) -> None:
        """Raise :class:`StorageUnavailable` unless the store can be used."""
        if not os.access(self.data_dir if self.data_dir.exists() else self.data_dir.parent, os.W_OK):
            raise StorageUnavailable(f"{self.data_dir} is not writable")

    def __repr__(self) -> str:
        return f"Storage({str(self.data_dir)!r})"

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


# --------------------------------------------------------------------------- S3


def _retry(fn: Callable[[], Any], attempts: int, what: str, first_delay_s: float = 0.5,
           on_retry: Callable[[], Any] | None = None) -> Any:
    """Run ``fn``; on :class:`StorageUnavailable` retry with exponential backoff
    (``first_delay_s``, doubling, at most 8 s) ``attempts`` times in all,
    calling ``on_retry()`` before each pause (e.g. a job heartbeat)."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StorageUnavailable as error:
            if attempt >= attempts:
                raise StorageUnavailable(f"{what} failed after {attempts} attempts: {error}") from None
            log.warning("%s failed (attempt %d of %d, retrying in %.1f s): %s",
                        what, attempt, attempts, delay, error)
            if on_retry is not None:
                on_retry()
            time.sleep(delay)
            delay = min(8.0, delay * 2)


class S3Storage:
    """The object store: an S3 bucket (AWS, MinIO, SeaweedFS, Ceph, GCS in S3
    mode) through boto3, keys under ``prefix``.

    Uploads are stored once per content (``uploads/<sha256>``); a job's
    artifacts go to a fresh per-attempt prefix ``jobs/<id>/<attempt token>/``,
    and the job row's ``artifacts_key`` names the committed one. ``data_dir``
    is this process's private scratch folder (staging, thumbnails).

    Errors: a missing object is ``FileNotFoundError``; anything else (no
    connection, timeouts, 5xx, denied, no bucket) is :class:`StorageUnavailable`.
    """

    kind = "s3"

    def __init__(self, bucket: str, prefix: str = "", *, data_dir: str | os.PathLike[str],
                 endpoint_url: str | None = None, region: str = "us-east-1",
                 timeout_s: float = 2.0, retries: int = 6):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.data_dir = Path(data_dir).resolve()
        self.endpoint_url = endpoint_url
        self.retries = retries
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=Config(
                connect_timeout=timeout_s, read_timeout=max(10.0, timeout_s),
                retries={"max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": "path"}, signature_version="s3v4",
            ),
        )

    def __repr__(self) -> str:
        return f"S3Storage(s3://{self.bucket}/{self.prefix}, endpoint={self.endpoint_url!r})"

    def _k(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as error:
            info = error.response.get("Error", {})
            code = str(info.get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or (status == 404 and code != "NoSuchBucket"):
                raise FileNotFoundError(what) from None
            raise StorageUnavailable(f"object store refused {what}: {code or status} "
                                     f"{info.get('Message', '')}".strip()) from None
        except BotoCoreError as error:
            raise StorageUnavailable(f"object store unreachable ({what}): {error}") from None

    # uploads

    def save_upload(self, data: bytes) -> str:
        """Store ``data`` as ``uploads/<sha256>`` (once per content); return the hash."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"upload data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        key = f"uploads/{sha}"
        info = self.stat(key)
        if info is None or info.size != len(data):
            self.put(key, data, "application/octet-stream")
        return sha

    def read_upload(self, sha: str) -> bytes:
        return self.get(f"uploads/{check_sha256(sha)}")

    def upload_path(self, sha: str) -> None:
        return None

    # generic key interface

    def local_path(self, key: str) -> None:
        return None

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self._call(f"PUT {key}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._k(key), Body=bytes(data), **extra))

    def get(self, key: str) -> bytes:
        return self._call(f"GET {key}", lambda: self.client.get_object(
            Bucket=self.bucket, Key=self._k(key))["Body"].read())

    def stat(self, key: str) -> ObjectInfo | None:
        """Size, ETag and time of ``key``, or None if there is no such object."""
        try:
            head = self._call(f"HEAD {key}", lambda: self.client.head_object(Bucket=self.bucket, Key=self._k(key)))
        except FileNotFoundError:
            return None
        return ObjectInfo(key=key, size=int(head["ContentLength"]), etag=str(head.get("ETag", "")).strip('"'),
                          last_modified=head["LastModified"])

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def open(self, key: str, start: int | None = None, stop: int | None = None) -> Iterator[bytes]:
        """The bytes ``[start, stop)`` of ``key`` (all without a range), in chunks."""
        extra = {"Range": f"bytes={start}-{stop - 1}"} if start is not None and stop is not None else {}
        body = self._call(f"GET {key}", lambda: self.client.get_object(
            Bucket=self.bucket, Key=self._k(key), **extra))["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(64 * 1024)
            finally:
                body.close()

        return chunks()

    def delete(self, key: str) -> None:
        try:
            self._call(f"DELETE {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._k(key)))
        except FileNotFoundError:
            pass

    def list_objects(self, prefix: str) -> list[tuple[str, datetime]]:
        """``(key, last modified)`` of every object under ``prefix/``."""
        out: list[tuple[str, datetime]] = []
        full = self._k(prefix) + "/"

        def pages():
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []) or []:
                    out.append((obj["Key"][len(self.prefix):], obj["LastModified"]))

        self._call(f"LIST {prefix}/", pages)
        return out

    def list_keys(self, prefix: str) -> set[str]:
        return {key for key, _ in self.list_objects(prefix)}

    def delete_prefix(self, prefix: str) -> None:
        for key, _ in self.list_objects(prefix):
            self.delete(key)

    def presigned_url(self, key: str, ttl_s: int, content_type: str | None = None,
                      download_name: str | None = None) -> str:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._k(key)}
        if content_type:
            params["ResponseContentType"] = content_type
        if download_name:
            params["ResponseContentDisposition"] = f'attachment; filename="{download_name}"'
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=int(ttl_s))

    def write_artifacts(self, job_id: uuid.UUID | str, attempt: int, render: Callable[[Path], Any],
                        retries: int | None = None, on_retry: Callable[[], Any] | None = None) -> str:
        """Render a job's artifacts into a private staging folder, upload every
        file under a fresh ``jobs/<id>/<attempt token>/`` (each retried with
        backoff), then return that prefix: the caller commits it to the job row.

        Raises :class:`StorageUnavailable` when an upload keeps failing (the
        partial prefix is deleted when possible, else swept later).
        """
        key = f"{job_key(job_id)}/{attempt_token(attempt)}"
        staging_root = self.data_dir / "staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{parse_job_id(job_id)}-", dir=staging_root))
        try:
            out = staging / "out"
            render(out)
            attempts = retries or self.retries
            for path in sorted(p for p in out.rglob("*") if p.is_file()):
                rel = path.relative_to(out).as_posix()
                data = path.read_bytes()
                _retry(lambda: self.put(f"{key}/{rel}", data, content_type_for(path.name)),
                       attempts, f"upload of {rel}", on_retry=on_retry)
            return key
        except StorageUnavailable:
            try:
                self.delete_prefix(key)
            except (StorageUnavailable, OSError):
                pass
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (best effort at start-up)."""
        from botocore.exceptions import ClientError

        try:
            self._call("HEAD bucket", lambda: self.client.head_bucket(Bucket=self.bucket))
        except (FileNotFoundError, StorageUnavailable):
            try:
                self._call("CREATE bucket", lambda: self.client.create_bucket(Bucket=self.bucket))
            except (StorageUnavailable, ClientError) as error:
                log.warning("could not create bucket %s: %s", self.bucket, error)

    def check(self) -> None:
        """Raise :class:`StorageUnavailable` unless the bucket answers."""
        try:
            self._call("HEAD bucket", lambda: self.client.head_bucket(Bucket=self.bucket))
        except FileNotFoundError:
            raise StorageUnavailable(f"bucket {self.bucket!r} does not exist") from None


def open_storage(settings: Any, data_dir: str | os.PathLike[str] | None = None) -> Storage | S3Storage:
    """The store named by ``settings.storage`` (``STORAGE_URL``).

    ``file:///path``: a :class:`Storage` on that folder (default ``DATA_DIR``);
    ``s3://bucket/prefix``: an :class:`S3Storage` (``S3_ENDPOINT_URL``, AWS
    credential variables) with ``data_dir`` (default ``DATA_DIR``) as private scratch.
    """
    url = settings.storage
    if url.startswith("file://"):
        return Storage(url[len("file://"):])
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        return S3Storage(bucket, prefix, data_dir=data_dir or settings.data_dir,
                         endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                         timeout_s=settings.storage_timeout_s, retries=settings.storage_retries)
    raise ValueError(f"STORAGE_URL must start with file:// or s3://, got {url!r}")
