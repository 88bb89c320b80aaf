"""HTML pages: the upload form, the live job page, the job list and the fleet."""

from __future__ import annotations

import io
import logging
import math
import uuid
from datetime import datetime
from typing import Any

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from sqlalchemy import func, select

from shared.db.models import Job, JobStatus
from shared.fleet import interval_s, workers_by_model

from . import charts, fleet, quotas
from . import jobs as jobs_svc
from .auth import current_owner, owner_name
from .db import get_db, state
from .errors import ApiError, remember_headers
from .forms import JobForm

log = logging.getLogger(__name__)

bp = Blueprint("pages", __name__)

#: Formats every browser displays; anything else is re-encoded as PNG.
_BROWSER_MIMES = {"image/jpeg", "image/png", "image/gif", "image/webp", "image/bmp"}
THUMB_SIZE = 320
#: Folder of ``DATA_DIR`` with the capped renditions of large uploads (see :func:`job_image`).
RENDITIONS_DIR = "renditions"

METHOD_NAMES = {
    "meaningful_perturbation": "Meaningful perturbation",
    "extremal": "Extremal perturbations",
}

RESULT_IMAGES = (
    ("original", "Original"),
    ("overlay_png", "Overlay"),
    ("heatmap_png", "Heatmap"),
    ("mask_png", "Mask"),
    ("perturbed_png", "Perturbed"),
)
#: Captions' notes: what size each picture is at.
RESULT_IMAGE_NOTES = {
    "original": "original size",
    "overlay_png": "original size",
    "heatmap_png": "model input size, squashed square",
    "mask_png": "model input size, squashed square; white = kept",
    "perturbed_png": "model input size, squashed square",
}


# --------------------------------------------------------------------------- helpers


@bp.app_template_filter("score")
def fmt_score(value: Any) -> str:
    value = jobs_svc.finite_number(value)
    if value is None:
        return "–"
    return f"{value:.3f}" if value >= 0.001 or value == 0 else f"{value:.1e}"


@bp.app_template_filter("percent")
def fmt_percent(value: Any) -> str:
    value = jobs_svc.finite_number(value)
    if value is None:
        return "–"
    return f"{value * 100:.1f}%" if value >= 0.001 else "<0.1%"


@bp.app_template_filter("duration")
def fmt_duration(seconds: Any) -> str:
    seconds = jobs_svc.finite_number(seconds)
    if seconds is None or seconds < 0:
        return "–"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@bp.app_template_filter("when")
def fmt_when(value: datetime | str | None) -> str:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    value = jobs_svc.as_utc(value)
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "–"


@bp.app_template_filter("bar_width")
def bar_width(value: Any) -> str:
    value = jobs_svc.finite_number(value)
    if value is None:
        return "0%"
    return f"{max(0.0, min(1.0, value)) * 100:.2f}%"


_PRETTY = {
    "l1_coeff": "L1 coefficient",
    "tv_coeff": "TV coefficient",
    "tv_beta": "TV beta",
    "noise_std": "Noise std",
    "input_size": "Input size",
    "iterations_run": "Iterations run",
    "total_s": "Total",
    "queued_s": "Waited in queue",
    "seconds": "Explanation",
    "metrics_s": "Deletion/insertion scoring",
    "gradcam_s": "Grad-CAM baseline",
    "scoring_s": "Faithfulness (total)",
    "top_k": "Top-k",
}


@bp.app_template_filter("pretty_key")
def pretty_key(value: str) -> str:
    text = str(value)
    if text in _PRETTY:
        return _PRETTY[text]
    if text.endswith("_s"):
        text = text[:-2]
    return text.replace("_", " ").capitalize()


def _job_or_404(job_id: uuid.UUID) -> Job:
    job = jobs_svc.get_job_for_owner(get_db(), job_id, current_owner())
    if job is None:
        abort(404, description="This job does not exist.")
    return job


def _new_form(formdata: Any = None) -> JobForm:
    if formdata is None:
        form = JobForm(formdata=None)
    else:
        form = JobForm()
    models = state().settings.models
    online = fleet.live_workers()
    counts = workers_by_model(online) if online is not None else None
    form.model.choices = [
        (name, name if counts is None or counts.get(name) else f"{name} (no worker online: jobs wait)")
        for name in models
    ]
    if not form.model.data:
        form.model.data = models[0]
    return form


def _render_form(form: JobForm, status: int = 200, form_errors: list[str] | None = None):
    st = state()
    html = render_template(
        "index.html",
        form=form,
        labels=st.labels,
        form_errors=form_errors or [],
        max_upload_mb=st.settings.max_upload_mb,
        advanced_open=any(form[name].errors for name in form.ADVANCED),
    )
    return make_response(html, status)


def form_error_response(status: int, message: str):
    """The form page with ``message`` when an error hits the form's POST, else None."""
    if request.method == "POST" and request.endpoint == "pages.submit":
        return _render_form(_new_form(), status, [message])
    return None


# --------------------------------------------------------------------------- form


@bp.get("/")
def index():
    return _render_form(_new_form())


@bp.post("/")
def submit():
    form = _new_form(formdata=True)
    st = state()
    if not form.validate_on_submit():  # CSRF already checked by CSRFProtect
        return _render_form(form, 400, ["The form could not be verified. Please try again."])
    try:
        sub = jobs_svc.parse_submission(
            request.form, jobs_svc.single_image(request.files), models=st.settings.models,
            labels=st.labels, blank_is_default=True, max_pixels=st.settings.max_pixels,
        )
        jobs_svc.admit(sub, st.settings)
    except jobs_svc.SubmissionErrors as errors:
        for name, (_code, message) in errors.errors.items():
            field = getattr(form, name, None)
            if field is not None and hasattr(field, "errors"):
                field.errors = list(field.errors) + [message]
        return _render_form(form, 400, ["Please correct the highlighted fields."])
    try:
        quotas.check(get_db(), st.settings, owner_name(), quotas.submission_work(sub))
        job = jobs_svc.submit(get_db(), st.storage, sub, owner_name(),
                              force=jobs_svc.parse_force(request.form))
    except ApiError as exc:
        remember_headers(exc)
        response = _render_form(form, exc.status, [exc.message])
        response.headers.extend(exc.headers)
        return response
    return redirect(url_for("pages.job", job_id=job.id), code=303)


# --------------------------------------------------------------------------- jobs


@bp.get("/jobs")
def jobs():
    db = get_db()
    per_page = int(current_app.config.get("JOBS_PER_PAGE", 20))
    page = request.args.get("page", 1, type=int) or 1
    owner = current_owner()
    total = int(db.scalar(jobs_svc.owner_filter(select(func.count()).select_from(Job), owner)) or 0)
    pages = max(1, math.ceil(total / per_page))
    page = max(1, min(page, pages))
    rows = list(
        db.scalars(
            jobs_svc.owner_filter(select(Job), owner)
            .order_by(Job.created_at.desc(), Job.id.desc())
            .offset((page - 1) * per_page)
            .limit(per_page)
        )
    )
    items = []
    for job in rows:
        elapsed, _ = jobs_svc.elapsed_and_eta(job)
        items.append({"job": job, "elapsed": elapsed})
    return render_template("jobs.html", items=items, page=page, pages=pages, total=total,
                           show_owner=bool(owner is not None and owner.admin))


@bp.get("/workers")
def workers():
    """The fleet: every live worker, refreshed by the page every few seconds."""
    db = get_db()
    st = state()
    online = fleet.live_workers()
    queued = fleet.queued_counts(db)
    counts = workers_by_model(online or [])
    models = [
        {"name": name, "workers": counts.get(name, 0), "queued": queued.get(name, 0)}
        for name in dict.fromkeys([*st.settings.models, *counts])
    ]
    return render_template("workers.html", workers=online, models=models,
                           refresh_s=max(2, round(interval_s())))


@bp.get("/jobs/<uuid:job_id>")
def job(job_id: uuid.UUID):
    db = get_db()
    st = state()
    row = _job_or_404(job_id)
    data = jobs_svc.job_to_dict(db, st.storage, row)
    images = []
    if row.status == JobStatus.SUCCEEDED.value:
        for key, title in RESULT_IMAGES:
            url = (
                url_for("pages.job_image", job_id=row.id)
                if key == "original"
                else data["artifacts"].get(key)
            )
            if url:
                images.append({"key": key, "title": title, "url": url,
                               "note": RESULT_IMAGE_NOTES.get(key, "")})
    downloads = [
        {"key": key, "name": jobs_svc.ARTIFACTS[key], "url": url}
        for key, url in data["artifacts"].items()
        if url and key in jobs_svc.ARTIFACTS
    ]
    for k, result in enumerate(data["results"][1:], start=1):
        downloads += [
            {"key": key, "name": f"results/{k}/{jobs_svc.ARTIFACTS[key]}", "url": url}
            for key, url in result["artifacts"].items()
            if url
        ]
    cards = []
    if row.status == JobStatus.SUCCEEDED.value:
        for k, result in enumerate(data["results"]):
            cards.append({"k": k, "result": result, "chart": charts.curves_chart(result),
                          "verdict": charts.verdict(result)})
    requested = [
        {"index": index, "label": st.labels[index] if 0 <= index < len(st.labels) else None}
        for index in data["targets"] or ()
    ]
    return render_template(
        "job.html", job=data, row=row, images=images, downloads=downloads, cards=cards,
        requested=requested, method_names=METHOD_NAMES,
        terminal=row.status in (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value,
                                JobStatus.CANCELLED.value),
    )


@bp.post("/jobs/<uuid:job_id>/cancel")
def cancel(job_id: uuid.UUID):
    try:
        row = jobs_svc.cancel_job(get_db(), job_id, current_owner())
    except ApiError as exc:
        if exc.status == 404:
            abort(404, description="This job does not exist.")
        flash(exc.message, "warning")
    else:
        if row.status == JobStatus.CANCELLED.value:
            flash("The job was cancelled.", "info")
        else:
            flash("Cancellation requested; the worker stops within a second.", "info")
    return redirect(url_for("pages.job", job_id=job_id), code=303)


@bp.post("/jobs/<uuid:job_id>/delete")
def delete(job_id: uuid.UUID):
    """The job page's delete button (CSRF-checked like every form)."""
    try:
        jobs_svc.delete_job(get_db(), state().storage, job_id, current_owner())
    except ApiError as exc:
        if exc.status == 404:
            abort(404, description="This job does not exist.")
        flash(exc.message, "warning")
        return redirect(url_for("pages.job", job_id=job_id), code=303)
    flash("The job and its files were deleted.", "info")
    return redirect(url_for("pages.jobs"), code=303)


def _upload_bytes(job: Job) -> bytes:
    """The uploaded bytes of ``job`` from the store (404 if gone, 503 if the store is down)."""
    from shared.storage import StorageUnavailable

    try:
        return state().storage.read_upload(job.image_sha256)
    except (FileNotFoundError, ValueError):
        abort(404, description="The uploaded image is no longer available.")
    except StorageUnavailable:
        abort(503, description="The file store is unavailable right now. Please retry later.")


def _store_and_send(path, data: bytes, mimetype: str, what: str):
    """Cache ``data`` at ``path`` and send it; on a full or read-only store, send it unstored."""
    from shared.storage import atomic_write

    try:
        atomic_write(path, data)
    except OSError as exc:
        log.warning("%s not stored: %s", what, exc)
        return send_file(io.BytesIO(data), mimetype=mimetype, max_age=86400)
    return send_file(path, mimetype=mimetype, max_age=86400, conditional=True)


@bp.get("/jobs/<uuid:job_id>/image")
def job_image(job_id: uuid.UUID):
    """The uploaded image: as uploaded when a browser can show it and its
    longest side is within ``EBB_MAX_ARTIFACT_SIDE``, else a PNG rendition
    capped to that side (upright, aspect ratio kept), made once and stored as
    ``DATA_DIR/renditions/<sha256>-<side>.png``."""
    from PIL import Image, ImageOps

    from shared.imaging.render import capped_size

    job = _job_or_404(job_id)
    st = state()
    side = int(st.settings.max_artifact_side)
    # renditions are a local cache of this web process (its own DATA_DIR with an S3 store)
    rendition = st.storage.data_dir / RENDITIONS_DIR / f"{job.image_sha256}-{side}.png"
    if rendition.is_file():
        return send_file(rendition, mimetype="image/png", max_age=86400, conditional=True)
    data = _upload_bytes(job)
    try:
        with Image.open(io.BytesIO(data)) as img:
            mime = Image.MIME.get(img.format or "", "")
            if mime in _BROWSER_MIMES and max(img.size) <= side:
                # uploads are content-addressed: the hash is a strong ETag
                return send_file(io.BytesIO(data), mimetype=mime, max_age=86400, conditional=True,
                                 etag=job.image_sha256, download_name=job.image_filename)
            img.draft("RGB", capped_size(*img.size, side))  # JPEG: decode at a reduced scale
            upright = ImageOps.exif_transpose(img).convert("RGB")
            upright.thumbnail((side, side), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            upright.save(buffer, "PNG", compress_level=1)
    except (OSError, ValueError, Image.DecompressionBombError):
        abort(404, description="The uploaded image cannot be displayed.")
    return _store_and_send(rendition, buffer.getvalue(), "image/png", f"image rendition of job {job_id}")


@bp.get("/jobs/<uuid:job_id>/thumbnail")
def job_thumbnail(job_id: uuid.UUID):
    """A small JPEG of the upload, cached under ``DATA_DIR/thumbnails``."""
    from PIL import Image, ImageOps

    job = _job_or_404(job_id)
    storage = state().storage
    cache = storage.data_dir / "thumbnails" / f"{job.image_sha256}-{THUMB_SIZE}.jpg"
    if not cache.is_file():
        data = _upload_bytes(job)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.draft("RGB", (THUMB_SIZE, THUMB_SIZE))
                img = ImageOps.exif_transpose(img)
                img = img.convert("RGB")
                img.thumbnail((THUMB_SIZE, THUMB_SIZE))
                buffer = io.BytesIO()
                img.save(buffer, "JPEG", quality=85, optimize=True)
        except (OSError, ValueError, Image.DecompressionBombError):
            abort(404, description="The uploaded image cannot be displayed.")
        return _store_and_send(cache, buffer.getvalue(), "image/jpeg", f"thumbnail of job {job_id}")
    return send_file(cache, mimetype="image/jpeg", max_age=86400, conditional=True)
