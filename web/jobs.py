"""Job submission, queueing, cancellation and serialisation, shared by the
HTML pages and the JSON API.

Nothing here imports torch or OpenCV.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from collections import OrderedDict
import logging
import math
import re
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from flask import current_app, url_for
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from shared.attribution.config import BLURS, GAMES, MAX_AREAS, METHODS, PERTURBATIONS, PRECISIONS
from shared.attribution.config import PerturbationConfig
from shared.db.models import TERMINAL_STATUSES, Job, JobStatus, utcnow
from shared.settings import DEFAULT_OWNER
from shared.imaging.render import ARTIFACT_NAMES, EXTRA_ARTIFACT_NAMES, RESULTS_SUBDIR
from shared.storage import StorageUnavailable, job_key, preview_key
from shared.storage_check import FULL, StorageFault, check_storage, classify_os_error

from .errors import ApiError
from .fleet import queue_info, scoring_estimate_s

log = logging.getLogger(__name__)

#: Artifact key -> file name in the job's folder (the public API names both):
#: the six every succeeded job has, then the optional ones (Grad-CAM baseline,
#: extremal areas), present only when the worker computed them.
#: ``render`` imports OpenCV lazily, inside its drawing functions only.
ARTIFACTS: dict[str, str] = {**ARTIFACT_NAMES, **EXTRA_ARTIFACT_NAMES}
ARTIFACT_MIMETYPES = {
    ".npy": "application/octet-stream",
    ".png": "image/png",
    ".json": "application/json",
}

#: Form/multipart fields of the settings a client may choose (order = display order).
INT_FIELDS = ("iterations", "mask_size", "seed", "input_size")
FLOAT_FIELDS = ("learning_rate", "l1_coeff", "tv_coeff", "tv_beta", "noise_std")
#: Choice fields -> allowed values.
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "blur": BLURS,
    "game": GAMES,
    "perturbation": PERTURBATIONS,
    "precision": PRECISIONS,
}
CHOICE_FIELDS = tuple(CHOICES)
CONFIG_FIELDS = ("iterations", "learning_rate", "l1_coeff", "tv_coeff", "tv_beta",
                 "noise_std", "mask_size", "input_size", "seed", *CHOICE_FIELDS, "areas")
#: Several classes per job: explicit ``targets`` or the ``top_k`` most probable.
MAX_TARGETS = 5
#: Order in which fields are validated (the API reports the first failure).
FIELD_ORDER = ("image", "model", "target", "targets", "top_k", *CONFIG_FIELDS)
#: Longest accepted ``areas`` / ``targets`` text (characters).
LIST_FIELD_MAX_LEN = 1000

FILENAME_MAX = 100
_INT_RE = re.compile(r"^[+-]?[0-9]{1,30}$")
_CURSOR_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_FLOAT_MAX_LEN = 64
STATUSES = tuple(s.value for s in JobStatus)


# --------------------------------------------------------------------------- input


@dataclass
class Submission:
    """A fully validated job request (nothing stored yet)."""

    data: bytes
    width: int
    height: int
    image_format: str
    filename: str
    model: str
    target_index: int | None
    target_label: str | None
    config: PerturbationConfig
    #: Class indices explicitly requested with ``targets`` (primary first), or None.
    targets: list[int] | None = None
    #: Explain the ``top_k`` most probable classes (None: just one).
    top_k: int | None = None

    @property
    def target_count(self) -> int:
        """How many classes the job explains."""
        if self.targets:
            return len(self.targets)
        return self.top_k if self.top_k and self.top_k > 1 else 1


class SubmissionErrors(Exception):
    """Validation failures, field -> (code, message), in :data:`FIELD_ORDER`."""

    def __init__(self, errors: dict[str, tuple[str, str]]):
        super().__init__("; ".join(f"{k}: {m}" for k, (_, m) in errors.items()))
        self.errors = dict(sorted(errors.items(), key=lambda kv: _field_rank(kv[0])))

    def first(self) -> ApiError:
        field, (code, message) = next(iter(self.errors.items()))
        return ApiError(400, code, message, field=field)


def _field_rank(name: str) -> int:
    return FIELD_ORDER.index(name) if name in FIELD_ORDER else len(FIELD_ORDER)


def clean_filename(name: str | None) -> str:
    """A display-only file name: the last path part, without control characters,
    at most 100 characters; ``"image"`` if nothing is left. Non-ASCII is kept."""
    if not name:
        return "image"
    name = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(
        ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")
    )
    name = " ".join(name.split())  # collapse odd whitespace
    name = name.strip(" .")
    if name in ("", ".", ".."):
        return "image"
    return name[:FILENAME_MAX]


def _parse_int(field: str, raw: str) -> int:
    text = raw.strip()
    if not text:
        raise ValueError(f"{field} must be an integer, not blank")
    if not _INT_RE.match(text):
        raise ValueError(f"{field} must be an integer, got {raw[:40]!r}")
    return int(text)


def _parse_float(field: str, raw: str) -> float:
    text = raw.strip()
    if not text:
        raise ValueError(f"{field} must be a number, not blank")
    if len(text) > _FLOAT_MAX_LEN:
        raise ValueError(f"{field} must be a number")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{field} must be a number, got {raw[:40]!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {raw[:40]!r}")
    return value


def _split_list(field: str, raw: str) -> list[str]:
    """The comma-separated entries of ``raw`` (stripped); blank entries are errors."""
    if len(raw) > LIST_FIELD_MAX_LEN:
        raise ValueError(f"{field} is too long (at most {LIST_FIELD_MAX_LEN} characters)")
    parts = [part.strip() for part in raw.split(",")]
    if any(not part for part in parts):
        raise ValueError(f"{field} must be a comma-separated list without empty entries, "
                         f"got {raw[:60]!r}")
    return parts


def _parse_areas(raw: str) -> tuple[float, ...]:
    """``"0.05, 0.1,0.2"`` -> ``(0.05, 0.1, 0.2)``; range, count and repeats are
    checked by :class:`PerturbationConfig` (messages start with ``areas``)."""
    parts = _split_list("areas", raw)
    if len(parts) > MAX_AREAS:
        raise ValueError(f"areas must list 1 to {MAX_AREAS} fractions, got {len(parts)}")
    values = []
    for part in parts:
        try:
            values.append(_parse_float("areas", part))
        except ValueError:
            raise ValueError(f"areas must be comma-separated fractions between 0 and 1 "
                             f"(e.g. 0.05,0.1,0.2), got {part[:40]!r}") from None
    return tuple(values)


def _parse_targets(raw: str, labels: list[str]) -> list[int]:
    """``"flute, 683"`` -> ``[558, 683]``: 1-:data:`MAX_TARGETS` distinct classes."""
    from shared.models.labels import resolve_target

    parts = _split_list("targets", raw)
    if len(parts) > MAX_TARGETS:
        raise ValueError(f"targets must list 1 to {MAX_TARGETS} classes, got {len(parts)}")
    indices: list[int] = []
    for part in parts:
        try:
            index = resolve_target(part, labels)
        except ValueError as exc:
            raise ValueError(f"targets: {str(exc)[:300]}") from None
        if index is None:  # pragma: no cover - blank entries are refused above
            raise ValueError("targets must not contain empty entries")
        if index in indices:
            raise ValueError(f"targets must be distinct classes; {part[:60]!r} repeats "
                             f"class {index} ({labels[index]})")
        indices.append(index)
    return indices


def _config_error_field(message: str) -> str:
    for name in sorted(PerturbationConfig.field_names(), key=len, reverse=True):
        if message.startswith(name):
            return name
    return "config"


def parse_submission(
    form: Mapping[str, str],
    image: Any,
    *,
    models: tuple[str, ...],
    labels: list[str],
    max_pixels: int | None = None,
    blank_is_default: bool = False,
) -> Submission:
    """Validate a job request; raise :class:`SubmissionErrors` (stores nothing).

    ``form`` maps field names to strings (unknown names are ignored; absent
    settings take their defaults, blank ones too when ``blank_is_default``,
    as an HTML form sends them, else they are errors; a blank model or target
    means the default model / the top-1 class); ``image`` is a werkzeug
    ``FileStorage`` or None.
    The image is decoded by content, never by its name or content type.
    """
    from shared.imaging.decode import decode_image
    from shared.models.labels import resolve_target

    errors: dict[str, tuple[str, str]] = {}

    def value(name: str) -> str:
        raw = form.get(name)
        return raw if isinstance(raw, str) else ""

    # model
    model = value("model").strip() or models[0]
    if model not in models:
        errors["model"] = (
            "unknown_model", f"unknown model {model[:64]!r}; served: {', '.join(models)}"
        )

    # target
    target_index: int | None = None
    try:
        target_index = resolve_target(value("target"), labels)
    except ValueError as exc:
        errors["target"] = ("invalid_target", str(exc)[:500])

    # targets (several explicit classes; blank = not given)
    targets: list[int] | None = None
    if value("targets").strip():
        try:
            targets = _parse_targets(value("targets"), labels)
        except ValueError as exc:
            errors["targets"] = ("invalid_value", str(exc)[:500])
        if value("target").strip():
            errors["targets"] = (
                "invalid_value",
                "targets cannot be combined with target: list every class in targets "
                "(the first one is the primary target)")

    # top_k (the k most probable classes)
    top_k = 1
    if "top_k" in form and (value("top_k").strip() or not blank_is_default):
        try:
            top_k = _parse_int("top_k", value("top_k"))
            if not 1 <= top_k <= MAX_TARGETS:
                raise ValueError(f"top_k must be between 1 and {MAX_TARGETS}, got {top_k}")
        except ValueError as exc:
            errors["top_k"] = ("invalid_value", str(exc))
            top_k = 1
        if top_k > 1 and value("targets").strip():
            errors["targets"] = (
                "invalid_value",
                "targets cannot be combined with top_k > 1: either list the classes in "
                "targets or ask for the top_k most probable ones")
        elif top_k > 1 and value("target").strip():
            errors["top_k"] = (
                "invalid_value",
                "top_k > 1 explains the model's most probable classes and cannot be "
                "combined with target; list the classes in targets instead")

    # config
    changes: dict[str, Any] = {}
    for name in INT_FIELDS + FLOAT_FIELDS + CHOICE_FIELDS + ("areas",):
        if name not in form:
            continue
        raw = value(name)
        if not raw.strip() and (blank_is_default or name == "areas"):
            continue
        try:
            if name == "areas":
                changes[name] = _parse_areas(raw)
            elif name in INT_FIELDS:
                changes[name] = _parse_int(name, raw)
            elif name in FLOAT_FIELDS:
                changes[name] = _parse_float(name, raw)
            else:
                choice = raw.strip()
                if choice not in CHOICES[name]:
                    raise ValueError(
                        f"{name} must be one of {', '.join(CHOICES[name])}, got {raw[:40]!r}")
                changes[name] = choice
        except ValueError as exc:
            errors[name] = ("invalid_value", str(exc))
    config: PerturbationConfig | None = None
    if not any(n in errors for n in CONFIG_FIELDS):
        try:
            config = PerturbationConfig(**changes)
        except ValueError as exc:
            message = str(exc)
            errors[_config_error_field(message)] = ("invalid_value", message)

    # image (decoded by content)
    data = b""
    decoded = None
    if image is not None:
        data = image.read()
    if image is None or (not data and not getattr(image, "filename", "")):
        errors["image"] = ("missing_field", "an image file is required (multipart field 'image')")
    else:
        if not data:
            errors["image"] = ("invalid_image", "the uploaded file is empty")
        else:
            try:
                decoded = decode_image(data) if max_pixels is None else decode_image(
                    data, max_pixels=max_pixels
                )
            except ValueError as exc:  # ImageDecodeError is a ValueError
                code = "too_expensive" if getattr(exc, "code", None) == "too_many_pixels" else "invalid_image"
                errors["image"] = (code, _image_message(exc))

    getlist = getattr(form, "getlist", None)
    if getlist is not None:  # a field given twice is ambiguous: refuse it
        for name in ("model", "target", "targets", "top_k", *CONFIG_FIELDS):
            if len(getlist(name)) > 1:
                errors[name] = ("invalid_value", f"{name} given more than once")

    if errors:
        raise SubmissionErrors(errors)
    assert config is not None and decoded is not None
    if targets:
        target_index = targets[0]
    return Submission(
        data=data,
        width=int(decoded.width),
        height=int(decoded.height),
        image_format=str(decoded.format),
        filename=clean_filename(getattr(image, "filename", None)),
        model=model,
        target_index=target_index,
        target_label=labels[target_index] if target_index is not None else None,
        config=config,
        targets=targets,
        top_k=top_k if top_k > 1 else None,
    )


def admit(sub: Submission, settings: Any) -> None:
    """Admission control: raise :class:`SubmissionErrors` with code
    ``too_expensive`` on the field to lower when ``sub`` asks for more than
    ``EBB_MAX_ITERATIONS`` iterations (field ``iterations``), or its estimated
    memory or work (:mod:`shared.cost`) is over ``EBB_MAX_JOB_MEMORY`` /
    ``EBB_MAX_JOB_WORK``. Nothing is stored."""
    from shared.cost import TooExpensive, check, estimate

    n = sub.target_count
    cost = estimate(sub.config, sub.model, sub.width, sub.height, n)
    try:
        check(cost, sub.config, max_memory=settings.max_job_memory, max_work=settings.max_job_work,
              n_targets=n, targets_field="targets" if sub.targets else "top_k",
              width=sub.width, height=sub.height)
    except TooExpensive as exc:
        raise SubmissionErrors({exc.field: ("too_expensive", exc.message)}) from None
    cap = getattr(settings, "max_iterations", None)
    if cap is not None and sub.config.iterations > cap:
        raise SubmissionErrors({"iterations": (
            "too_expensive",
            f"iterations must be at most {cap} (EBB_MAX_ITERATIONS), got {sub.config.iterations}")})


def single_image(files: Any) -> Any:
    """The one uploaded ``image`` file of ``files`` (None if absent); several are a 400."""
    images = files.getlist("image")
    if len(images) > 1:
        raise SubmissionErrors({"image": ("invalid_value", "image given more than once")})
    return images[0] if images else None


def _image_message(exc: Exception) -> str:
    text = str(exc).strip() or "the file is not a supported image"
    return text[:300]


# --------------------------------------------------------------------------- create


class QueueUnavailable(Exception):
    pass


def storage_unavailable(error: Exception | str) -> ApiError:
    """The 503 ``storage_unavailable`` answer (the store cannot be reached)."""
    log.warning("store unavailable: %s", error)
    return ApiError(503, "storage_unavailable",
                    "The file store is unavailable right now; nothing was stored. Please retry later.")


_FORCE_TRUE = ("1", "true", "yes", "on", "y")  # "y": the form's checkbox
_FORCE_FALSE = ("", "0", "false", "no", "off")


def parse_force(form: Mapping[str, str]) -> bool:
    """The ``force`` field: ``1``/``true``/``on`` run the job even if an identical
    one succeeded; absent, blank or ``0``/``false`` do not; anything else is a 400."""
    getlist = getattr(form, "getlist", None)
    if getlist is not None and len(getlist("force")) > 1:
        raise ApiError(400, "invalid_value", "force given more than once", field="force")
    raw = form.get("force")
    text = raw.strip().lower() if isinstance(raw, str) else ""
    if text in _FORCE_TRUE:
        return True
    if text in _FORCE_FALSE:
        return False
    raise ApiError(400, "invalid_value", f"force must be 1 or 0, got {str(raw)[:40]!r}", field="force")


def submission_request_key(sub: Submission, sha: str) -> str:
    """``shared.reuse.request_key`` of a submission whose image hashes to ``sha``."""
    from shared import reuse

    return reuse.request_key(image_sha256=sha, model=sub.model, target_index=sub.target_index,
                             targets=sub.targets, top_k=sub.top_k, config=sub.config.to_dict())


def find_reusable(db: Session, settings: Any, request_key: str,
                  owner: str = DEFAULT_OWNER) -> Job | None:
    """The newest succeeded job of ``owner`` (not itself a reuse) with the same
    reuse key under the web's arithmetic settings, or None. Only the owner's own
    jobs are reused: another owner's results (and that they exist) stay theirs."""
    from shared import reuse

    if not reuse.reproducible(settings.arithmetic):
        return None
    key = reuse.reuse_key(request_key, settings.arithmetic)
    return db.scalars(
        select(Job)
        .where(Job.reuse_key == key, Job.status == JobStatus.SUCCEEDED.value,
               Job.reused_from.is_(None), Job.artifacts_key.is_not(None),
               Job.owner == owner)
        .order_by(Job.finished_at.desc())
        .limit(1)
    ).first()


def reuse_job(db: Session, original: Job, sub: Submission, owner: str = DEFAULT_OWNER) -> Job:
    """A new, already succeeded job of ``owner`` sharing ``original``'s artifacts and results."""
    now = utcnow()
    job = Job(
        id=uuid.uuid4(),
        status=JobStatus.SUCCEEDED.value,
        model=original.model,
        target_index=original.target_index,
        target_label=original.target_label,
        targets=original.targets,
        top_k=original.top_k,
        config=original.config,
        image_sha256=original.image_sha256,
        image_width=original.image_width,
        image_height=original.image_height,
        image_filename=sub.filename,
        progress_iteration=original.progress_iteration,
        progress_total=original.progress_total,
        current_score=original.current_score,
        score_before=original.score_before,
        score_after=original.score_after,
        top5=original.top5,
        results=original.results,
        timings=None,
        created_at=now,
        enqueued_at=None,
        started_at=now,
        finished_at=now,
        attempts=0,
        artifacts_key=original.artifacts_key,
        reused_from=original.id,
        owner=owner,
    )
    db.add(job)
    db.commit()
    return job


def storage_error(fault: StorageFault) -> ApiError:
    """The API error for a data store that cannot take an upload: 507
    ``insufficient_storage`` when it is full, else 503 ``storage_unavailable``."""
    if fault.kind == FULL:
        return ApiError(507, "insufficient_storage", fault.message)
    return ApiError(503, "storage_unavailable", fault.message)


def check_store(storage: Any, min_free_mb: float) -> None:
    """:func:`shared.storage_check.check_storage` on the upload folder, as an
    :class:`ApiError` (507/503). A store without a local folder is not checked here."""
    folder = getattr(storage, "uploads_dir", None)
    if folder is None:
        return
    try:
        check_storage(folder, min_free_mb)
    except StorageFault as fault:
        log.warning("upload refused: %s", fault.message)
        raise storage_error(fault) from None


def store_upload(storage: Any, data: bytes, min_free_mb: float) -> tuple[str, bool]:
    """Check the store, then save ``data``; return ``(sha256, created)`` where
    ``created`` says the file was not there before (so it may be removed again).
    A failed write leaves nothing behind and raises :class:`ApiError` 507/503
    (an unreachable S3 store: 503 ``storage_unavailable``)."""
    check_store(storage, min_free_mb)
    sha = hashlib.sha256(data).hexdigest()
    try:
        existed = storage.exists(f"uploads/{sha}")
        return storage.save_upload(data), not existed
    except StorageUnavailable as error:  # the S3 store: one atomic PUT, nothing half-stored
        raise storage_unavailable(error) from None
    except OSError as exc:  # atomic_write removed its temporary file
        fault = classify_os_error(exc)
        log.warning("upload refused: %s (%s)", fault.message, exc)
        raise storage_error(fault) from None


def discard_upload(db: Session, storage: Any, sha: str) -> None:
    """Remove upload ``sha`` unless a job still refers to it (best effort)."""
    try:
        if db.scalar(select(func.count()).select_from(Job).where(Job.image_sha256 == sha)):
            return
        storage.delete(f"uploads/{sha}")
    except Exception:  # noqa: BLE001 - never hide the error being answered
        db.rollback()
        log.warning("could not remove the upload %s of an unqueued job", sha, exc_info=True)


def create_job(db: Session, storage: Any, sub: Submission, min_free_mb: float = 0.0,
               request_key: str | None = None, owner: str = DEFAULT_OWNER) -> Job:
    """Check the data store, store the upload, insert the job (status queued,
    owned by ``owner``) and commit. Nothing stays stored when any of it fails."""
    sha, created = store_upload(storage, sub.data, min_free_mb)
    try:
        return _insert_job(db, sub, sha, request_key, owner)
    except BaseException:
        db.rollback()
        if created:
            discard_upload(db, storage, sha)
        raise


def _insert_job(db: Session, sub: Submission, sha: str, request_key: str | None = None,
                owner: str = DEFAULT_OWNER) -> Job:
    now = utcnow()
    job = Job(
        id=uuid.uuid4(),
        status=JobStatus.QUEUED.value,
        model=sub.model,
        target_index=sub.target_index,
        target_label=sub.target_label,
        targets=list(sub.targets) if sub.targets else None,
        top_k=sub.top_k if sub.top_k and sub.top_k > 1 else None,
        config=sub.config.to_dict(),
        image_sha256=sha,
        image_width=sub.width,
        image_height=sub.height,
        image_filename=sub.filename,
        progress_iteration=0,
        # The worker counts the iterations of every target (a top-3 job of 500
        # iterations counts to 1500); start with the same total.
        progress_total=sub.config.iterations * sub.target_count,
        created_at=now,
        enqueued_at=now,
        reuse_key=request_key,
        owner=owner,
    )
    db.add(job)
    db.commit()
    return job


def enqueue(job: Job) -> None:
    """Send the ``ebb.explain`` task for ``job`` to its model's queue.

    Fails fast (no retries, short connect timeout): raises
    :class:`QueueUnavailable` if the broker cannot be reached.
    """
    from worker.celery_app import TASK_EXPLAIN, queue_for

    state = current_app.extensions["ebb"]
    celery = state.celery
    timeout = float(current_app.config.get("BROKER_CONNECT_TIMEOUT", 2.0))
    try:
        with celery.connection_for_write(
            url=state.settings.redis_url,
            connect_timeout=timeout,
            transport_options={
                "max_retries": 1,
                "interval_start": 0,
                "interval_step": 0.2,
                "interval_max": 0.2,
                "socket_connect_timeout": timeout,
                "socket_timeout": max(timeout, 5.0),
            },
        ) as conn:
            celery.send_task(
                TASK_EXPLAIN,
                args=[str(job.id)],
                queue=queue_for(job.model),
                task_id=str(job.id),
                connection=conn,
                retry=False,
                ignore_result=True,
            )
    except Exception as exc:  # kombu OperationalError, redis ConnectionError, anything
        log.warning("could not queue job %s: %s: %s", job.id, type(exc).__name__, exc)
        raise QueueUnavailable(str(exc)) from exc


def submit(db: Session, storage: Any, sub: Submission, owner: str = DEFAULT_OWNER,
           force: bool = False, min_free_mb: float | None = None) -> Job:
    """Create and queue a job owned by ``owner``; on a queue failure remove the row (and the
    upload, if no other job uses it) and raise :class:`ApiError` 503
    ``queue_unavailable``. ``min_free_mb`` defaults to the app's
    ``EBB_MIN_FREE_MB``; a full or unwritable store raises 507/503 first.

    Unless ``force`` (or ``EBB_REUSE=0``), a submission identical to a job that
    succeeded (same image, model, targets, full config and arithmetic
    settings) and belongs to the same owner is answered at once with a new succeeded job sharing that job's
    artifacts (``reused_from``); nothing is stored or queued.
    """
    settings = current_app.extensions["ebb"].settings
    if min_free_mb is None:
        min_free_mb = settings.min_free_mb
    request_key = submission_request_key(sub, hashlib.sha256(sub.data).hexdigest())
    if settings.reuse and not force:
        original = find_reusable(db, settings, request_key, owner)
        if original is not None:
            job = reuse_job(db, original, sub, owner)
            log.info("job %s answered from job %s (model %s)", job.id, original.id, job.model,
                     extra={"event": "reused", "job_id": str(job.id), "model": job.model,
                            "reused_from": str(original.id)})
            return job
    job = create_job(db, storage, sub, min_free_mb, request_key, owner)
    try:
        enqueue(job)
    except QueueUnavailable:
        sha = job.image_sha256
        try:
            db.execute(Job.__table__.delete().where(Job.id == job.id))
            db.commit()
        except Exception:  # pragma: no cover - the DB failing too
            db.rollback()
            log.exception("could not delete unqueued job %s", job.id)
        else:
            discard_upload(db, storage, sha)
        raise ApiError(
            503,
            "queue_unavailable",
            "The job queue is unavailable right now; nothing was queued. Please retry later.",
        ) from None
    from .metrics import job_submitted

    job_submitted(job.model)
    log.info("job %s submitted (model %s)", job.id, job.model,
             extra={"event": "submitted", "job_id": str(job.id), "model": job.model})
    return job


# --------------------------------------------------------------------------- read


def visible_to(job: Job | None, owner: Any) -> bool:
    """Whether ``owner`` (a :class:`web.auth.Owner`, or None in single-user
    mode) may see ``job``: its own jobs; an admin or single-user mode: all."""
    if job is None:
        return False
    return owner is None or bool(owner.admin) or job.owner == owner.name


def get_job_for_owner(db: Session, job_id: uuid.UUID, owner: Any) -> Job | None:
    """The job if it exists and ``owner`` may see it, else None (another
    owner's job is indistinguishable from a missing one)."""
    job = db.get(Job, job_id)
    return job if visible_to(job, owner) else None


def get_job(db: Session, job_id: uuid.UUID, owner: Any = None) -> Job:
    """The job visible to ``owner`` (see :func:`get_job_for_owner`), else 404 ``not_found``."""
    job = get_job_for_owner(db, job_id, owner)
    if job is None:
        raise ApiError(404, "not_found", f"job {job_id} not found")
    return job


def as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive datetimes, stored as UTC
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def iso(value: datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


@dataclass(frozen=True)
class QueueSpot:
    """A queued job's place: its 1-based ``position`` among its model's queued
    jobs and the iterations (``progress_total``) of those ahead of it."""

    position: int
    work_before: int


def queue_snapshot(db: Session, jobs: Iterable[Job]) -> dict[uuid.UUID, QueueSpot]:
    """The :class:`QueueSpot` of every queued job in ``jobs``, in one query.

    One window query over the queued jobs of their models (``row_number`` and
    a running sum, ordered as :func:`queue_position` counts), kept to the ids
    asked for: a page of 100 jobs with 20,000 queued costs one query, not one
    count per row.
    """
    wanted = {job.id: job.model for job in jobs if job.status == JobStatus.QUEUED.value}
    if not wanted:
        return {}
    key = func.coalesce(Job.enqueued_at, Job.created_at)
    order = (key, Job.id)
    ranked = (
        select(
            Job.id.label("id"),
            func.row_number().over(partition_by=Job.model, order_by=order).label("position"),
            (func.sum(Job.progress_total).over(partition_by=Job.model, order_by=order)
             - Job.progress_total).label("work_before"),
        )
        .where(Job.status == JobStatus.QUEUED.value, Job.model.in_(sorted(set(wanted.values()))))
        .subquery()
    )
    rows = db.execute(select(ranked.c.id, ranked.c.position, ranked.c.work_before)
                      .where(ranked.c.id.in_(list(wanted)))).all()
    return {job_id: QueueSpot(int(position), int(work_before or 0)) for job_id, position, work_before in rows}


def queue_position(db: Session, job: Job) -> int | None:
    """1-based place in the queue: 1 + queued jobs of the same model queued before it.

    Jobs are ordered by when their task was (last) sent, ``enqueued_at``
    (``created_at`` for rows without it), which is the broker's order.
    """
    if job.status != JobStatus.QUEUED.value:
        return None
    mine = job.enqueued_at or job.created_at
    key = func.coalesce(Job.enqueued_at, Job.created_at)
    ahead = db.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.status == JobStatus.QUEUED.value,
            Job.model == job.model,
            Job.id != job.id,
            or_(key < mine, and_(key == mine, Job.id < job.id)),
        )
    )
    return int(ahead or 0) + 1


def elapsed_and_eta(job: Job, now: datetime | None = None) -> tuple[float | None, float | None]:
    started = as_utc(job.started_at)
    if started is None:
        return None, None
    end = as_utc(job.finished_at) or as_utc(now) or datetime.now(timezone.utc)
    elapsed = max(0.0, (end - started).total_seconds())
    eta = None
    if job.status == JobStatus.RUNNING.value and job.progress_iteration and job.progress_total:
        remaining = max(0, job.progress_total - job.progress_iteration)
        eta = elapsed / job.progress_iteration * remaining
    elif job.status == JobStatus.SUCCEEDED.value:
        eta = 0.0
    return round(elapsed, 3), (round(eta, 3) if eta is not None else None)


#: The live preview's artifact name (top-level artifacts of a running job only).
PREVIEW = "preview_png"


def _artifact_filename(name: str) -> str | None:
    if name in ARTIFACTS:
        return ARTIFACTS[name]
    if name in ARTIFACTS.values():
        return name
    return None


def is_artifact_name(name: str) -> bool:
    """Whether ``name`` is an artifact key or file name (the preview included)."""
    return name == PREVIEW or _artifact_filename(name) is not None


def artifacts_prefix(job: Job) -> str:
    """Store key of the folder holding ``job``'s committed artifacts:
    ``Job.artifacts_key``, else (rows before it existed) ``jobs/<id>``."""
    return job.artifacts_key or job_key(job.id)


def artifact_key(job: Job, name: str, k: int = 0) -> str | None:
    """Store key of artifact ``name`` (a key or a file name) of target ``k``
    of ``job`` (``results/<k>/`` for k >= 1); None if the name is unknown."""
    if name == PREVIEW:
        return preview_key(job.id) if k == 0 else None
    filename = _artifact_filename(name)
    if filename is None:
        return None
    base = artifacts_prefix(job)
    return f"{base}/{filename}" if k == 0 else f"{base}/{RESULTS_SUBDIR}/{int(k)}/{filename}"


#: Listings of committed artifact prefixes (immutable once committed), per process.
_LISTINGS: "OrderedDict[str, frozenset[str]]" = OrderedDict()
_LISTINGS_LOCK = threading.Lock()
_LISTINGS_MAX = 2048


def stored_artifacts(storage: Any, job: Job) -> frozenset[str] | None:
    """Keys under a succeeded job's artifacts prefix on an object store (one
    LIST, then cached: a committed prefix never changes); None on the file store.

    Raises :class:`ApiError` 503 ``storage_unavailable`` when the store is down.
    """
    if storage.kind == "file":
        return None
    prefix = artifacts_prefix(job)
    with _LISTINGS_LOCK:
        if prefix in _LISTINGS:
            _LISTINGS.move_to_end(prefix)
            return _LISTINGS[prefix]
    try:
        keys = frozenset(storage.list_keys(prefix))
    except StorageUnavailable as error:
        raise storage_unavailable(error) from None
    with _LISTINGS_LOCK:
        _LISTINGS[prefix] = keys
        while len(_LISTINGS) > _LISTINGS_MAX:
            _LISTINGS.popitem(last=False)
    return keys


def _preview_live(storage: Any, job: Job) -> bool:
    try:
        return storage.exists(preview_key(job.id))
    except (StorageUnavailable, OSError):
        return False


def artifact_urls(storage: Any, job: Job, k: int | None = None) -> dict[str, str | None]:
    """Artifact key -> URL (None unless the job succeeded and the file exists).

    ``k`` None: the job's top-level artifacts (``/artifacts/<name>``); an int:
    those of its ``k``-th result (``/results/<k>/artifacts/<name>``).
    """
    urls: dict[str, str | None] = {}
    done = job.status == JobStatus.SUCCEEDED.value
    listing = stored_artifacts(storage, job) if done else None
    for key in ARTIFACTS:
        object_key = artifact_key(job, key, k or 0) if done else None
        if object_key is None:
            present = False
        elif listing is not None:
            present = object_key in listing
        else:
            present = storage.exists(object_key)
        if not present:
            urls[key] = None
        elif k is None:
            urls[key] = url_for("api.job_artifact", job_id=job.id, name=key)
        else:
            urls[key] = url_for("api.job_result_artifact", job_id=job.id, k=k, name=key)
    if k is None:
        # the live preview of a running job (the worker refreshes it every ~2 s)
        live = job.status == JobStatus.RUNNING.value and _preview_live(storage, job)
        urls[PREVIEW] = url_for("api.job_artifact", job_id=job.id, name=PREVIEW) if live else None
    return urls


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, or None (None, bools, non-numbers, NaN, inf)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    """An int from stored JSON (not a bool, not a float with a fraction), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _str(value: Any, limit: int = 200) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _clean_top5(raw: Any) -> dict[str, list[dict[str, Any]] | None]:
    raw = raw if isinstance(raw, dict) else {}
    out: dict[str, list[dict[str, Any]] | None] = {}
    for key in ("before", "after"):
        rows = raw.get(key)
        if not isinstance(rows, list):
            out[key] = None
            continue
        clean = []
        for row in rows[:MAX_ROWS]:
            if isinstance(row, dict):
                clean.append({
                    "index": _int(row.get("index")),
                    "label": _str(row.get("label")),
                    "prob": finite_number(row.get("prob")),
                })
        out[key] = clean
    return out


def _top5(job: Job) -> dict[str, list[dict[str, Any]] | None]:
    return _clean_top5(job.top5)


#: Caps on what is read back from stored JSON (a result list, a curve, top-5 rows).
MAX_RESULTS = 16
MAX_CURVE_POINTS = 1000
MAX_ROWS = 20
CURVE_KEYS = ("fraction", "deletion", "insertion")


def _clean_curves(raw: Any) -> dict[str, list[float | None]] | None:
    """``{"fraction", "deletion", "insertion"}`` lists of numbers (non-finite or
    non-numeric points become null, so the lists stay aligned); None unless
    all three are lists."""
    if not isinstance(raw, dict):
        return None
    out: dict[str, list[float | None]] = {}
    for key in CURVE_KEYS:
        values = raw.get(key)
        if not isinstance(values, list):
            return None
        out[key] = [finite_number(v) for v in values[:MAX_CURVE_POINTS]]
    return out


def _clean_metrics(raw: Any) -> dict[str, Any] | None:
    """Deletion/insertion scores of one saliency map, or None."""
    if not isinstance(raw, dict):
        return None
    return {
        "deletion_auc": finite_number(raw.get("deletion_auc")),
        "insertion_auc": finite_number(raw.get("insertion_auc")),
        "curves": _clean_curves(raw.get("curves")),
        "seconds": finite_number(raw.get("seconds")),
    }


def _clean_areas(raw: Any) -> list[dict[str, float | None]] | None:
    if not isinstance(raw, list):
        return None
    return [
        {
            "area": finite_number(row.get("area")),
            "area_achieved": finite_number(row.get("area_achieved")),
            "score_after": finite_number(row.get("score_after")),
        }
        for row in raw[:MAX_ROWS]
        if isinstance(row, dict)
    ]


def clean_warnings(raw: Any) -> list[dict[str, str]]:
    """``[{"code", "message"}, ...]`` from stored warnings; malformed entries dropped."""
    if not isinstance(raw, list):
        return []
    out = []
    for w in raw[:20]:
        if isinstance(w, dict) and isinstance(w.get("code"), str) and isinstance(w.get("message"), str):
            out.append({"code": w["code"][:64], "message": w["message"][:1000]})
    return out


def clean_live(raw: Any) -> list[dict[str, Any]] | None:
    """``Job.live`` in its public shape: one entry per target, the primary
    first, or None when the worker has not reported yet."""
    if not isinstance(raw, list) or not raw:
        return None
    out = []
    for e in raw[:MAX_RESULTS]:
        e = e if isinstance(e, dict) else {}
        iteration, total = _int(e.get("iteration")) or 0, _int(e.get("total")) or 0
        out.append({
            "target": {"index": _int(e.get("index")), "label": _str(e.get("label"))},
            "progress": {"iteration": max(0, iteration), "total": max(0, total),
                         "fraction": round(min(1.0, max(0, iteration) / total), 4) if total > 0 else 0.0},
            "score": finite_number(e.get("score")),
            "score_iteration": _int(e.get("score_iteration")),
            "score_before": finite_number(e.get("score_before")),
        })
    return out


def clean_result(raw: Any) -> dict[str, Any]:
    """One entry of ``Job.results`` in its public shape (without artifacts);
    anything malformed becomes null, never an error."""
    raw = raw if isinstance(raw, dict) else {}
    target = raw.get("target") if isinstance(raw.get("target"), dict) else {}
    scores = raw.get("scores") if isinstance(raw.get("scores"), dict) else {}
    return {
        "target": {"index": _int(target.get("index")), "label": _str(target.get("label"))},
        "method": _str(raw.get("method"), 64),
        "scores": {"before": finite_number(scores.get("before")), "after": finite_number(scores.get("after"))},
        "top5": _clean_top5(raw.get("top5")),
        "metrics": _clean_metrics(raw.get("metrics")),
        "gradcam": _clean_metrics(raw.get("gradcam")),
        "areas": _clean_areas(raw.get("areas")),
        "warnings": clean_warnings(raw.get("warnings")),
    }


def stored_results(job: Job) -> list[Any]:
    """The raw ``Job.results`` list (empty when absent or not a list), capped."""
    return list(job.results[:MAX_RESULTS]) if isinstance(job.results, list) else []


def results_to_list(storage: Any, job: Job) -> list[dict[str, Any]]:
    """``Job.results`` cleaned, each with the URLs of its artifacts."""
    return [
        {**clean_result(raw), "artifacts": artifact_urls(storage, job, k)}
        for k, raw in enumerate(stored_results(job))
    ]


def metrics_summary(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The primary target's faithfulness scores (``metrics`` of the job's JSON):
    the perturbation mask's, with the Grad-CAM baseline's under ``gradcam``."""
    if not results:
        return None
    first = results[0]
    mask = first.get("metrics") or {}
    return {
        "deletion_auc": mask.get("deletion_auc"),
        "insertion_auc": mask.get("insertion_auc"),
        "curves": mask.get("curves"),
        "seconds": mask.get("seconds"),
        "gradcam": first.get("gradcam"),
    }


def _targets(job: Job) -> list[int] | None:
    if not isinstance(job.targets, list):
        return None
    out = [i for i in (_int(v) for v in job.targets[:MAX_RESULTS]) if i is not None]
    return out or None


def job_to_dict(db: Session, storage: Any, job: Job,
                snapshot: dict[uuid.UUID, QueueSpot] | None = None) -> dict[str, Any]:
    """The public JSON form of a job (see the OpenAPI document).

    ``snapshot``: :func:`queue_snapshot` of a page of jobs this one belongs
    to (computed here for this job alone when not given)."""
    total = int(job.progress_total or 0)
    iteration = int(job.progress_iteration or 0)
    elapsed, eta = elapsed_and_eta(job)
    if eta is not None and job.status == JobStatus.RUNNING.value:
        eta = round(eta + scoring_estimate_s(db, job.model), 3)  # the scoring after the last step
    if snapshot is None:
        snapshot = queue_snapshot(db, [job])
    spot = snapshot.get(job.id)
    position = spot.position if spot is not None else None
    results = results_to_list(storage, job)
    top_k = _int(job.top_k)
    live = clean_live(job.live)
    targets = _targets(job)
    if targets is None and live and len(live) > 1 and all(e["target"]["index"] is not None for e in live):
        targets = [e["target"]["index"] for e in live]  # top-k: known once the worker ranked them
    return {
        "id": str(job.id),
        "status": job.status,
        "model": job.model,
        "owner": job.owner or DEFAULT_OWNER,
        "target": {"index": job.target_index, "label": job.target_label},
        "targets": targets,
        "top_k": top_k if top_k and top_k > 0 else 1,
        "progress": {
            "iteration": iteration,
            "total": total,
            "fraction": round(min(1.0, iteration / total), 4) if total > 0 else 0.0,
        },
        "scores": {"before": finite_number(job.score_before), "after": finite_number(job.score_after)},
        "top5": _top5(job),
        "config": job.config or {},
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "error": job.error,
        "artifacts": artifact_urls(storage, job),
        "metrics": metrics_summary(results),
        "results": results,
        "warnings": results[0]["warnings"] if results else [],
        "live": live,
        "queue_position": position,
        "queue": queue_info(db, job, position, spot.work_before if spot is not None else None),
        "current_score": finite_number(job.current_score),
        "elapsed_s": elapsed,
        "eta_s": eta,
        "attempts": int(job.attempts or 0),
        "reused_from": str(job.reused_from) if job.reused_from else None,
        "worker": job.worker_hostname,
        "timings": job.timings if isinstance(job.timings, dict) else None,
        "cancel_requested": bool(job.cancel_requested),
        "usage": _usage(db, job),
        "image": {
            "sha256": job.image_sha256,
            "width": job.image_width,
            "height": job.image_height,
            "filename": job.image_filename,
        },
        "links": {
            "self": url_for("api.get_job", job_id=job.id),
            "page": url_for("pages.job", job_id=job.id),
            "image": url_for("pages.job_image", job_id=job.id),
            "thumbnail": url_for("pages.job_thumbnail", job_id=job.id),
        },
    }


def _usage(db: Session, job: Job) -> dict[str, Any]:
    from .quotas import cached_usage, job_owner

    return cached_usage(db, current_app.extensions["ebb"].settings, job_owner(job))


# --------------------------------------------------------------------------- list


def encode_cursor(job: Job) -> str:
    created = as_utc(job.created_at)
    assert created is not None
    raw = json.dumps([created.isoformat(), str(job.id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        if not 0 < len(cursor) <= 200 or not _CURSOR_RE.match(cursor):
            raise ValueError("malformed")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_s, id_s = json.loads(raw.decode())
        created = datetime.fromisoformat(created_s)
        if created.tzinfo is None:
            raise ValueError("naive")
        return created.astimezone(timezone.utc), uuid.UUID(id_s)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "invalid_cursor", "cursor is not valid", field="cursor") from None


def owner_filter(query: Any, owner: Any) -> Any:
    """``query`` on jobs limited to those ``owner`` may see (all for an admin or None)."""
    if owner is None or owner.admin:
        return query
    return query.where(Job.owner == owner.name)


def list_jobs(
    db: Session, *, status: str | None, limit: int, cursor: str | None, owner: Any = None
) -> tuple[list[Job], str | None]:
    query = owner_filter(select(Job), owner)
    if status:
        query = query.where(Job.status == status)
    if cursor is not None:
        created, job_id = decode_cursor(cursor)
        if db.get_bind().dialect.name == "sqlite":
            created = created.replace(tzinfo=None)  # stored naive (UTC) in SQLite
        query = query.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id))
        )
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    rows = list(db.scalars(query))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


# --------------------------------------------------------------------------- delete

#: Seconds ``DELETE`` waits for a cancelled running job to stop before it answers 409.
DELETE_WAIT_S = 5.0


def delete_job(db: Session, storage: Any, job_id: uuid.UUID, owner: Any = None) -> None:
    """Delete ``job_id`` (:func:`shared.retention.delete_job`): its row, its
    artifacts and its upload unless another job uses them. A queued or
    running job is cancelled first; a running one that has not stopped
    within :data:`DELETE_WAIT_S` answers 409 ``job_running`` (retry later).
    404 when it does not exist or ``owner`` may not see it (see
    :func:`get_job_for_owner`)."""
    import time

    from shared.retention import NotFinished
    from shared.retention import delete_job as delete_finished

    job = get_job(db, job_id, owner)
    if job.status not in TERMINAL_STATUSES:
        try:
            cancel_job(db, job_id, owner)
        except ApiError as exc:
            if exc.status != 409:
                raise
        deadline = time.monotonic() + DELETE_WAIT_S
        while job.status not in TERMINAL_STATUSES and time.monotonic() < deadline:
            time.sleep(0.1)
            db.rollback()
            db.refresh(job)
    running = ApiError(
        409, "job_running",
        f"job {job_id} is still {job.status}: its cancel was requested and it stops at its next "
        "step; send the DELETE again in a moment.", headers={"Retry-After": "2"})
    if job.status not in TERMINAL_STATUSES:
        raise running
    from .quotas import record_deleted

    record_deleted(current_app.extensions["ebb"].settings, job)
    try:
        done = delete_finished(db, storage, job_id)
    except NotFinished:
        raise running from None
    if done is None:
        raise ApiError(404, "not_found", f"job {job_id} not found")


# --------------------------------------------------------------------------- cancel


def cancel_job(db: Session, job_id: uuid.UUID, owner: Any = None) -> Job:
    """Cancel a queued job at once, ask a running one to stop; 409 if terminal;
    404 if it does not exist or ``owner`` may not see it."""
    job = get_job(db, job_id, owner)
    now = utcnow()
    result = db.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.CANCELLED.value, finished_at=now, cancel_requested=True,
                error=None)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 0:
        db.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
            .values(cancel_requested=True)
            .execution_options(synchronize_session=False)
        )
    db.commit()
    db.refresh(job)
    if result.rowcount == 1:
        from .metrics import job_cancelled_queued

        job_cancelled_queued(job.model)
        log.info("job %s cancelled while queued (model %s)", job_id, job.model,
                 extra={"event": "cancelled", "job_id": str(job_id), "model": job.model,
                        "status": "cancelled"})
    elif job.status == JobStatus.RUNNING.value:
        log.info("job %s: cancel requested (model %s)", job_id, job.model,
                 extra={"event": "cancel_requested", "job_id": str(job_id), "model": job.model})
    if job.status in TERMINAL_STATUSES and not (
        job.status == JobStatus.CANCELLED.value and result.rowcount == 1
    ):
        raise ApiError(409, "conflict", f"job {job_id} is already {job.status}")
    return job
