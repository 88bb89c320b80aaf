"""shared.storage: content-addressed uploads and server-made artifact paths."""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest

from shared.imaging.render import ARTIFACT_NAMES
from shared.storage import Storage, atomic_write, parse_job_id


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(tmp_path / "data")


def test_save_upload_is_content_addressed_and_idempotent(storage):
    data = b"\x89PNG some bytes"
    sha = storage.save_upload(data)
    assert sha == hashlib.sha256(data).hexdigest()
    path = storage.upload_path(sha)
    assert path == storage.data_dir / "uploads" / sha
    assert path.read_bytes() == data
    mtime = path.stat().st_mtime_ns
    assert storage.save_upload(data) == sha
    assert path.stat().st_mtime_ns == mtime  # not rewritten
    assert storage.read_upload(sha) == data
    assert sorted(p.name for p in path.parent.iterdir()) == [sha]  # no temp files left


def test_save_upload_repairs_a_truncated_file(storage):
    data = b"0123456789"
    sha = storage.save_upload(data)
    storage.upload_path(sha).write_bytes(b"01")
    storage.save_upload(data)
    assert storage.read_upload(sha) == data


def test_save_upload_accepts_bytearray_and_rejects_str(storage):
    assert storage.save_upload(bytearray(b"ab")) == hashlib.sha256(b"ab").hexdigest()
    with pytest.raises(ValueError, match="bytes"):
        storage.save_upload("text")  # type: ignore[arg-type]


@pytest.mark.parametrize("sha", ["", "abc", "../" + "a" * 61, "A" * 64, "g" * 64, "a" * 65, None])
def test_upload_path_rejects_non_hashes(storage, sha):
    with pytest.raises(ValueError, match="SHA-256"):
        storage.upload_path(sha)


def test_read_missing_upload_raises_file_not_found(storage):
    with pytest.raises(FileNotFoundError):
        storage.read_upload("a" * 64)


def test_job_dir_and_artifact_paths(storage):
    job_id = uuid.uuid4()
    assert storage.job_dir(job_id) == storage.data_dir / "jobs" / str(job_id)
    assert storage.job_dir(str(job_id).upper()) == storage.job_dir(job_id)  # canonical form
    for key, name in ARTIFACT_NAMES.items():
        assert storage.artifact_path(job_id, key) == storage.job_dir(job_id) / name


@pytest.mark.parametrize("job_id", ["../etc", "", "not-a-uuid", "1234", 42, None])
def test_job_dir_requires_a_uuid(storage, job_id):
    with pytest.raises(ValueError, match="UUID"):
        storage.job_dir(job_id)


@pytest.mark.parametrize("key", ["mask.png", "../mask_png", "", "MASK_PNG", None])
def test_artifact_path_requires_a_known_key(storage, key):
    with pytest.raises(ValueError, match="unknown artifact") as info:
        storage.artifact_path(uuid.uuid4(), key)
    assert "mask_png" in str(info.value)  # lists the valid keys


def test_parse_job_id_round_trips():
    job_id = uuid.uuid4()
    assert parse_job_id(job_id) is job_id
    assert parse_job_id(str(job_id)) == job_id


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_storage_does_not_touch_disk_until_written(tmp_path):
    storage = Storage(tmp_path / "nothing-yet")
    storage.job_dir(uuid.uuid4())
    storage.upload_path("b" * 64)
    assert not (tmp_path / "nothing-yet").exists()
