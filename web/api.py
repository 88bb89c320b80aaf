"""JSON API, version 1 (``/api/v1``). See :mod:`web.openapi` for the contract."""

from __future__ import annotations

import uuid

from flask import Blueprint, Response, jsonify, redirect, request, send_file, url_for

from shared.storage import StorageUnavailable

from shared.attribution.config import PerturbationConfig

from . import fleet, quotas
from .auth import current_owner, owner_name
from . import jobs as jobs_svc
from .db import get_db, state
from .errors import ApiError
from .openapi import openapi_document

bp = Blueprint("api", __name__, url_prefix="/api/v1")

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


@bp.post("/jobs")
def create_job():
    st = state()
    try:
        sub = jobs_svc.parse_submission(
            request.form,
            jobs_svc.single_image(request.files),
            models=st.settings.models,
            labels=st.labels,
            max_pixels=st.settings.max_pixels,
        )
        jobs_svc.admit(sub, st.settings)
    except jobs_svc.SubmissionErrors as errors:
        raise errors.first() from None
    force = jobs_svc.parse_force(request.form)
    db = get_db()
    quotas.check(db, st.settings, owner_name(), quotas.submission_work(sub))
    job = jobs_svc.submit(db, st.storage, sub, owner_name(), force=force)
    body = jobs_svc.job_to_dict(db, st.storage, job)
    response = jsonify(body)
    response.status_code = 202
    response.headers["Location"] = body["links"]["self"]
    return response


@bp.get("/jobs")
def list_jobs():
    for name in ("status", "limit", "cursor"):
        if len(request.args.getlist(name)) > 1:
            raise ApiError(400, "invalid_value", f"{name} given more than once", field=name)
    status = request.args.get("status")
    if status is not None and status not in jobs_svc.STATUSES:
        raise ApiError(400, "invalid_value",
                       f"status must be one of {', '.join(jobs_svc.STATUSES)}", field="status")
    raw_limit = request.args.get("limit")
    limit = DEFAULT_LIMIT
    if raw_limit is not None:
        text = raw_limit.strip()
        limit = int(text) if text.isascii() and text.isdigit() and len(text) <= 6 else -1
        if not 1 <= limit <= MAX_LIMIT:
            raise ApiError(400, "invalid_value",
                           f"limit must be an integer between 1 and {MAX_LIMIT}", field="limit")
    cursor = request.args.get("cursor")
    db = get_db()
    rows, next_cursor = jobs_svc.list_jobs(db, status=status, limit=limit, cursor=cursor,
                                             owner=current_owner())
    snapshot = jobs_svc.queue_snapshot(db, rows)  # one query for every row's queue position
    st = state()
    return jsonify({
        "jobs": [jobs_svc.job_to_dict(db, st.storage, job, snapshot) for job in rows],
        "next_cursor": next_cursor,
    })


@bp.get("/jobs/<uuid:job_id>")
def get_job(job_id: uuid.UUID):
    db = get_db()
    job = jobs_svc.get_job(db, job_id, current_owner())
    return jsonify(jobs_svc.job_to_dict(db, state().storage, job))


@bp.delete("/jobs/<uuid:job_id>")
def delete_job(job_id: uuid.UUID):
    """Delete a job, its artifacts and its upload (unless another job uses
    them); a queued or running job is cancelled first. 204 when done."""
    jobs_svc.delete_job(get_db(), state().storage, job_id, current_owner())
    return "", 204


@bp.get("/usage")
def usage():
    """The requester's quota usage and limits."""
    st = state()
    response = jsonify(quotas.usage(get_db(), st.settings, quotas.owner_name()))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/jobs/<uuid:job_id>/cancel")
def cancel_job(job_id: uuid.UUID):
    db = get_db()
    job = jobs_svc.cancel_job(db, job_id, current_owner())
    return jsonify(jobs_svc.job_to_dict(db, state().storage, job))


def _unknown_artifact() -> ApiError:
    return ApiError(404, "not_found",
                    f"unknown artifact; expected one of {', '.join(jobs_svc.ARTIFACTS)}",
                    field="name")


def _missing(job, name: str) -> ApiError:
    return ApiError(404, "not_found", f"artifact {name} of job {job.id} does not exist (yet)")


def _send_artifact(job, key: str, name: str, prefix: str):
    """Serve the stored object ``key``: a file with ``send_file``; an S3 object
    streamed with its ETag, Last-Modified and Range support, or, with
    ``EBB_PRESIGNED_URLS=1``, a 302 to a short-lived presigned URL."""
    st = state()
    storage = st.storage
    filename = key.rsplit("/", 1)[-1]
    mimetype = jobs_svc.ARTIFACT_MIMETYPES.get("." + filename.rsplit(".", 1)[-1], "application/octet-stream")
    download = request.args.get("download") in ("1", "true", "yes")
    download_name = f"{job.id}-{prefix}{filename}"
    path = storage.local_path(key)
    if path is not None:
        if not path.is_file():
            raise _missing(job, name)
        response = send_file(path, mimetype=mimetype, as_attachment=download, download_name=download_name,
                             max_age=0, conditional=True)
        response.headers["Cache-Control"] = "no-cache"
        return response
    try:
        info = storage.stat(key)
        if info is None:
            raise _missing(job, name)
        if st.settings.presigned_urls:
            url = storage.presigned_url(key, st.settings.presigned_ttl_s, mimetype,
                                        download_name if download else None)
            response = redirect(url, code=302)
            response.headers["Cache-Control"] = "no-store"
            return response
        return _stream_object(storage, key, info, mimetype, download, download_name)
    except StorageUnavailable as error:
        raise jobs_svc.storage_unavailable(error) from None


def _stream_object(storage, key: str, info, mimetype: str, download: bool, download_name: str):
    """A streamed response for a stored object (200, 206 for a satisfiable
    ``Range``, 304 for a matching ``If-None-Match`` / ``If-Modified-Since``, 416)."""
    from werkzeug.http import http_date

    etag = info.etag or f"{info.size}-{int(info.last_modified.timestamp())}"
    headers = {
        "ETag": f'"{etag}"',
        "Last-Modified": http_date(info.last_modified),
        "Accept-Ranges": "bytes",
        "Cache-Control": "no-cache",
    }
    if download:
        headers["Content-Disposition"] = f'attachment; filename="{download_name}"'
    if request.if_none_match and request.if_none_match.contains(etag):
        return Response(status=304, headers=headers)
    since = request.if_modified_since
    if not request.if_none_match and since is not None and int(info.last_modified.timestamp()) <= int(since.timestamp()):
        return Response(status=304, headers=headers)
    start = stop = None
    status = 200
    ranges = request.range
    if_range = request.if_range  # a Range applies unless If-Range names another version
    if ranges is not None and ((if_range.etag is None and if_range.date is None) or if_range.etag == etag):
        span = ranges.range_for_length(info.size)
        if span is None:
            headers["Content-Range"] = f"bytes */{info.size}"
            return Response(status=416, headers=headers)
        start, stop = span
        status = 206
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{info.size}"
    body = storage.open(key, start, stop)
    headers["Content-Length"] = str((stop - start) if status == 206 else info.size)
    return Response(body, status=status, mimetype=mimetype, headers=headers, direct_passthrough=True)


@bp.get("/jobs/<uuid:job_id>/artifacts/<name>")
def job_artifact(job_id: uuid.UUID, name: str):
    if not jobs_svc.is_artifact_name(name):
        raise _unknown_artifact()
    job = jobs_svc.get_job(get_db(), job_id, current_owner())
    key = jobs_svc.artifact_key(job, name)
    assert key is not None
    return _send_artifact(job, key, name, "")


@bp.get("/jobs/<uuid:job_id>/results/<int:k>/artifacts/<name>")
def job_result_artifact(job_id: uuid.UUID, k: int, name: str):
    """An artifact of the ``k``-th explained target (0 = the primary target,
    the same files as ``/artifacts/<name>``)."""
    if name == jobs_svc.PREVIEW or not jobs_svc.is_artifact_name(name):
        raise _unknown_artifact()
    job = jobs_svc.get_job(get_db(), job_id, current_owner())
    count = len(jobs_svc.stored_results(job))
    if k != 0 and k >= count:
        raise ApiError(404, "not_found",
                       f"job {job.id} has no result {k} (it has {count})", field="k")
    key = jobs_svc.artifact_key(job, name, k)
    assert key is not None
    return _send_artifact(job, key, name, f"result{k}-" if k else "")


@bp.get("/models")
def list_models():
    st = state()
    input_size = PerturbationConfig().input_size
    queued = fleet.queued_counts(get_db())
    return jsonify({
        "default": st.settings.models[0],
        "models": [
            {
                "name": name,
                "queue": _queue(name),
                "input_size": input_size,
                "num_classes": len(st.labels),
                "labels": st.labels,
                "workers_online": fleet.workers_online(name),
                "queued": queued.get(name, 0),
            }
            for name in st.settings.models
        ],
    })


@bp.get("/workers")
def list_workers():
    """The live workers, from their heartbeats (503 when Redis cannot be read)."""
    workers = fleet.live_workers()
    if workers is None:
        raise ApiError(503, "fleet_unavailable",
                       "The worker heartbeats cannot be read right now (Redis is unreachable).")
    response = jsonify({"workers": workers})
    response.headers["Cache-Control"] = "no-store"
    return response


def _queue(model: str) -> str:
    from worker.celery_app import queue_for

    return queue_for(model)


@bp.get("/openapi.json")
def openapi():
    from .auth import enabled as auth_enabled

    response = jsonify(openapi_document(
        server_url=url_for("api.list_models").rsplit("/", 1)[0], auth_required=auth_enabled()))
    response.headers["Cache-Control"] = "public, max-age=300"
    return response
