"""Running one explain job against the database: claim, optimise, save, finish.

:func:`run_job` is the body of the ``ebb.explain`` task, kept free of Celery
so it can be tested directly. It is idempotent: a redelivered message for a
finished, cancelled or (freshly) running job does nothing. Every write after
the claim is conditional on the claimed attempt number, so a run that was
superseded (the reaper re-queued it) cannot overwrite the newer one.

A job explains one or more targets (``Job.targets``, or the ``Job.top_k``
most probable classes, else ``target_index`` / the top-1) of one image with
one method (``config.method``); all its masks join the worker's batch
together. Right after the masks are done each is scored (deletion and
insertion curves, RISE) together with Grad-CAM's map for the same class, on
the worker's device. ``Job.results`` then holds one entry per target, the
primary first::

    {"target": {"index", "label"}, "method": "meaningful_perturbation" | "extremal",
     "scores": {"before", "after"}, "top5": {"before": [...], "after": [...]},
     "metrics": {"deletion_auc", "insertion_auc", "seconds",
                 "curves": {"fraction": [...], "deletion": [...], "insertion": [...]}} | null,
     "gradcam": {same keys as metrics} | null,
     "areas": [{"area", "area_achieved", "score_after"}, ...] | null,   # extremal only
     "warnings": [{"code", "message"}, ...]}   # shared.attribution.warnings

and the artifacts of target k >= 1 are written to ``results/<k>/`` of the
job's folder (target 0's at its top), all in one atomic rename.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Mapping

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from shared.db.models import TERMINAL_STATUSES, Job, JobStatus, utcnow
from shared.db.session import retrying, session_factory
from shared.storage import StorageUnavailable, _retry, job_key, parse_job_id, preview_key
from shared.storage_check import disk_full_message, disk_low_message, free_mb, is_disk_full

log = logging.getLogger(__name__)

#: Minimum seconds between two progress writes (the last step always writes).
PROGRESS_INTERVAL_S = 0.5
MAX_ERROR_CHARS = 500
#: Pause before handing back a message received while the worker stops.
STOPPING_REQUEUE_DELAY_S = 0.2


class JobError(Exception):
    """A job cannot run (bad input); its message is shown to the user as is."""


class Superseded(Exception):
    """This run no longer owns the job (re-queued elsewhere); drop it silently."""


def as_utc(value: datetime | None) -> datetime | None:
    """``value`` as an aware UTC datetime (SQLite returns naive ones)."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def one_line(error: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    """A readable one-line message for ``error`` (no traceback)."""
    if isinstance(error, JobError):
        text = str(error)
    else:
        detail = " ".join(str(error).split())
        text = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Claim:
    """What a run needs from the job row, read when it was claimed."""

    job_id: uuid.UUID
    attempt: int
    image_sha256: str
    config: dict[str, Any]
    target_index: int | None
    progress_floor: int
    queued_s: float | None
    #: ``time.perf_counter()`` when the job was claimed (the ``queued_s`` instant).
    claimed_perf: float | None = None
    model: str = ""
    #: Several targets: the class indices asked for, or the k most probable.
    targets: tuple[int, ...] | None = None
    top_k: int | None = None
    #: The web's ``shared.reuse.request_key`` of the submission (None: not reusable).
    request_key: str | None = None


def _write(session: Session, fn: Callable[[], Any], attempts: int = 8) -> Any:
    """Run ``fn`` then commit, retrying transient database errors."""

    def unit():
        result = fn()
        session.commit()
        return result

    return retrying(unit, attempts=attempts, on_retry=lambda _e: session.rollback())


@dataclass(frozen=True)
class Skip:
    """Why :func:`_claim` did not claim the job: its status then (``None``: no
    such job), its error, and whether this claim itself ended it."""

    status: str | None
    error: str | None = None
    ended_here: bool = False
    model: str | None = None


def _claim(session: Session, job_id: uuid.UUID, runtime, hostname: str) -> Claim | Skip:
    """Mark the job running for this attempt, or return a :class:`Skip`."""
    session.expire_all()
    job = session.get(Job, job_id)
    if job is None:
        log.warning("job %s not found; dropping the message", job_id)
        return Skip(None)
    if job.status in TERMINAL_STATUSES:
        log.info("job %s already %s; nothing to do", job_id, job.status)
        return Skip(job.status, job.error, model=job.model)
    now, now_perf = utcnow(), time.perf_counter()
    # A duplicate message while another worker runs the job (it handles cancel).
    if job.status == JobStatus.RUNNING.value:
        beat = as_utc(job.heartbeat_at)
        if beat is not None and now - beat < timedelta(seconds=runtime.heartbeat_timeout_s):
            log.warning("job %s is running elsewhere (heartbeat %s); skipping duplicate", job_id, beat)
            return Skip(job.status, model=job.model)
    if job.cancel_requested:
        job.status, job.finished_at = JobStatus.CANCELLED.value, now
        return Skip(job.status, ended_here=True, model=job.model)
    if job.model != runtime.model_name:
        job.status, job.error, job.finished_at = (
            JobStatus.FAILED.value,
            f"job for model {job.model!r} reached a worker for {runtime.model_name!r}",
            now,
        )
        return Skip(job.status, job.error, ended_here=True, model=job.model)
    if job.attempts >= runtime.max_attempts:
        job.status, job.error = JobStatus.FAILED.value, f"gave up after {job.attempts} attempts"
        job.finished_at = now
        return Skip(job.status, job.error, ended_here=True, model=job.model)
    seen_attempts, seen_status = job.attempts, job.status
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempts == seen_attempts, Job.status == seen_status)
        .values(
            status=JobStatus.RUNNING.value,
            attempts=seen_attempts + 1,
            started_at=now,
            heartbeat_at=now,
            worker_hostname=hostname[:255],
            error=None,
            # every attempt starts from 0: no high point of an earlier one is shown
            progress_iteration=0,
            live=None,
            current_score=None,
        )
    )
    if result.rowcount != 1:
        log.info("job %s was claimed concurrently; skipping", job_id)
        return Skip(JobStatus.RUNNING.value, model=job.model)
    return Claim(
        job_id=job_id,
        attempt=seen_attempts + 1,
        image_sha256=job.image_sha256,
        config=dict(job.config or {}),
        target_index=job.target_index,
        progress_floor=0,
        queued_s=(now - as_utc(job.created_at)).total_seconds() if job.created_at else None,
        claimed_perf=now_perf,
        model=job.model,
        targets=tuple(int(t) for t in job.targets) if isinstance(job.targets, list) and job.targets else None,
        top_k=int(job.top_k) if job.top_k else None,
        request_key=job.reuse_key,
    )


def _owned(claim: Claim):
    """WHERE clause: the row still belongs to this run."""
    return (Job.id == claim.job_id, Job.attempts == claim.attempt, Job.status == JobStatus.RUNNING.value)


class ProgressReporter:
    """The ``on_step`` callback: throttled progress + heartbeat writes and cancel checks.

    Writes at most every :data:`PROGRESS_INTERVAL_S` and on the last step; at
    each write reads ``cancel_requested``. Returns ``True`` (stop) when the
    job was cancelled, superseded, or the worker is shutting down.
    ``values`` (extra columns to write, e.g. the live per-target state) is
    only built when a write is due.
    """

    def __init__(self, session: Session, claim: Claim, stopping, interval_s: float | None = None,
                 deadline: float | None = None):
        self.session = session
        self.claim = claim
        self.stopping = stopping
        self.interval_s = PROGRESS_INTERVAL_S if interval_s is None else interval_s
        self.writes = 0
        self._last = float("-inf")
        self.cancel_requested = False
        self.superseded = False
        #: ``time.monotonic()`` past which the job is over its time budget (None: no budget).
        self.deadline = deadline
        self.timed_out = False

    def expired(self) -> bool:
        """Whether the job is over its time budget (remembered in ``timed_out``)."""
        if not self.timed_out and self.deadline is not None and time.monotonic() > self.deadline:
            self.timed_out = True
        return self.timed_out

    def due(self, iteration: int, total: int) -> bool:
        """Whether a call with these numbers would write."""
        return iteration >= total or time.monotonic() - self._last >= self.interval_s

    def __call__(self, iteration: int, total: int, losses: Mapping[str, float],
                 values: Callable[[], dict[str, Any]] | None = None) -> bool | None:
        now = time.monotonic()
        if iteration < total and now - self._last < self.interval_s:
            return None
        self._last = now
        floor = self.claim.progress_floor
        if values is not None:
            extra = values()
        else:
            extra = {"current_score": float(losses["score"])}

        def write():
            result = self.session.execute(
                update(Job)
                .where(*_owned(self.claim))
                .values(
                    progress_iteration=max(iteration, floor),
                    progress_total=total,
                    heartbeat_at=utcnow(),
                    **extra,
                )
            )
            cancel = self.session.execute(
                select(Job.cancel_requested).where(Job.id == self.claim.job_id)
            ).scalar_one_or_none()
            return result.rowcount, cancel

        try:
            rowcount, cancel = _write(self.session, write, attempts=3)
        except Exception as error:  # noqa: BLE001 - progress is best effort
            log.warning("job %s: progress update failed: %s", self.claim.job_id, one_line(error))
            self.session.rollback()
            return True if self.stopping.is_set() else None
        self.writes += 1
        if rowcount != 1:
            self.superseded = True
            return True
        if cancel:
            self.cancel_requested = True
            return True
        if self.stopping.is_set():
            return True
        return None


#: Seconds between two live previews of the primary target's mask.
PREVIEW_INTERVAL_S = 2.0
#: Longest side of the live preview in pixels.
PREVIEW_SIZE = 256


class PreviewWriter:
    """Writes the live preview of a running job: the current saliency over the
    image (inferno heatmap, alpha 0.5, longest side :data:`PREVIEW_SIZE`) as
    ``previews/<job id>.png``, atomically, at most every :data:`PREVIEW_INTERVAL_S`."""

    def __init__(self, storage, job_id: uuid.UUID, pixels):
        from shared.imaging.render import _cv2

        h, w = pixels.shape[:2]
        scale = min(1.0, PREVIEW_SIZE / max(h, w))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        self.image = pixels if scale == 1.0 else _cv2().resize(pixels, size, interpolation=_cv2().INTER_AREA)
        self.storage = storage
        self.key = preview_key(job_id)
        self._last = float("-inf")
        self.writes = 0
        self.seconds = 0.0

    def maybe_write(self, saliency: Callable[[], Any] | None) -> None:
        now = time.monotonic()
        if saliency is None or now - self._last < PREVIEW_INTERVAL_S:
            return
        self._last = now
        start = time.perf_counter()
        try:
            import numpy as np

            from shared.imaging.render import encode_png, overlay

            data = encode_png(overlay(self.image, 1.0 - np.clip(saliency(), 0.0, 1.0)))
            self.storage.put(self.key, data, "image/png")
            self.writes += 1
        except Exception as error:  # noqa: BLE001 - a preview is best effort
            log.warning("live preview not written: %s", one_line(error))
        self.seconds += time.perf_counter() - start

    @staticmethod
    def remove_for(storage, job_id: uuid.UUID) -> None:
        try:
            storage.delete(preview_key(job_id))
        except (OSError, ValueError, StorageUnavailable):
            pass


#: The live (noise-free) score of a target is re-evaluated at most every this many seconds...
LIVE_SCORE_INTERVAL_S = 1.0
#: ...and at most this fraction of the time (one extra batch-1 forward pass each).
LIVE_SCORE_BUDGET = 0.02


class TargetsProgress:
    """One ``on_step`` callback per target of a job, reporting their sum and each.

    The job's progress is the iterations done over all its targets (a top-3
    job of 500 iterations counts to 1500); ``Job.live`` holds each target's
    own state (see :meth:`snapshot`). The live score is the target's
    probability on the current mask *without* noise (``losses["live_score"]``,
    an extra forward pass), re-evaluated when a progress write is due, at most
    every :data:`LIVE_SCORE_INTERVAL_S` and :data:`LIVE_SCORE_BUDGET` of the
    time, and always at a target's last step. Once the reporter sees a cancel,
    a superseded run or a stopping worker, every target stops at its next step.
    """

    def __init__(self, reporter: ProgressReporter, totals: list[int], preview: PreviewWriter | None = None):
        self.reporter = reporter
        self.preview = preview
        self.done = [0] * len(totals)
        self.totals = list(totals)
        self.entries: list[dict[str, Any]] = [
            {"index": None, "label": None, "iteration": 0, "total": t, "score": None,
             "score_iteration": None, "score_before": None} for t in totals]
        self._scored_at = [float("-inf")] * len(totals)
        self._score_cost = [0.0] * len(totals)
        self.live_seconds = 0.0  # time spent on live scores, for timings

    def stop_all(self) -> bool:
        r = self.reporter
        return r.cancel_requested or r.superseded or r.stopping.is_set() or r.expired()

    def snapshot(self) -> dict[str, Any]:
        """Columns to write: ``live`` (one entry per target, the primary first:
        ``index``, ``label``, ``iteration``, ``total``, ``score`` (noise-free
        probability at iteration ``score_iteration``), ``score_before``), and
        the primary target's ``current_score``, ``target_index``,
        ``target_label`` and ``score_before`` once known."""
        first = self.entries[0]
        values: dict[str, Any] = {"live": [dict(e) for e in self.entries]}
        if first["score"] is not None:
            values["current_score"] = first["score"]
        if first["index"] is not None:
            values.update(target_index=first["index"], target_label=(first["label"] or "")[:200],
                          score_before=first["score_before"])
        return values

    def _live_score(self, index: int, iteration: int, total: int, losses: Mapping[str, float]) -> None:
        if "live_score" not in losses:
            return
        now = time.monotonic()
        since = now - self._scored_at[index]
        last = iteration >= total
        if not last and (since < LIVE_SCORE_INTERVAL_S or since * LIVE_SCORE_BUDGET < self._score_cost[index]):
            return
        start = time.perf_counter()
        score = float(losses["live_score"])
        self._score_cost[index] = time.perf_counter() - start
        self.live_seconds += self._score_cost[index]
        self._scored_at[index] = now
        self.entries[index].update(score=score, score_iteration=iteration)

    def callback(self, index: int) -> Callable[[int, int, Mapping[str, float]], bool | None]:
        def on_step(iteration: int, total: int, losses: Mapping[str, float]) -> bool | None:
            self.done[index], self.totals[index] = iteration, total
            entry = self.entries[index]
            entry["iteration"], entry["total"] = iteration, total
            if entry["index"] is None and getattr(losses, "target", None) is not None:
                entry.update(index=int(losses.target), label=getattr(losses, "label", None),
                             score_before=getattr(losses, "score_before", None))
            done, totals = sum(self.done), sum(self.totals)
            if self.reporter.due(done, totals) or iteration >= total:
                self._live_score(index, iteration, total, losses)
            if index == 0 and self.preview is not None:
                self.preview.maybe_write(getattr(losses, "saliency", None))
            stop = self.reporter(done, totals, losses, values=self.snapshot)
            return True if stop or self.stop_all() else None

        return on_step


def _finish(session: Session, claim: Claim, *, where: tuple = (), **values: Any) -> bool:
    """Conditional final write (also on ``where``); ``False`` if the run was superseded."""
    now = utcnow()
    values.setdefault("finished_at", now)
    values.setdefault("heartbeat_at", now)

    def write():
        return session.execute(update(Job).where(*_owned(claim), *where).values(**values)).rowcount

    return _write(session, write, attempts=12) == 1


def _decode(runtime, claim: Claim, on_retry: Callable[[], Any] | None = None):
    from shared.imaging.decode import ImageDecodeError, decode_image

    try:
        data = _retry(lambda: runtime.storage.read_upload(claim.image_sha256),
                      _storage_retries(runtime), "reading the upload", on_retry=on_retry)
    except (FileNotFoundError, ValueError):
        raise JobError(f"the uploaded image is missing (sha256 {claim.image_sha256[:12]}…)") from None
    except StorageUnavailable as error:
        raise JobError(f"could not read the uploaded image from the store: {error}") from None
    try:
        return decode_image(data, max_pixels=int(runtime.settings.max_pixels))
    except ImageDecodeError as error:
        raise JobError(f"could not decode the image: {error}") from None


def _storage_retries(runtime) -> int:
    settings = getattr(runtime, "settings", None)
    return int(getattr(settings, "storage_retries", 8) or 1)


def _heartbeat(session: Session, claim: Claim) -> None:
    """Write the job's heartbeat (between two store retries: the job is alive)."""
    try:
        _write(session, lambda: session.execute(
            update(Job).where(*_owned(claim)).values(heartbeat_at=utcnow())), attempts=2)
    except Exception as error:  # noqa: BLE001 - best effort
        session.rollback()
        log.warning("job %s: heartbeat not written: %s", claim.job_id, one_line(error))


def _committed_reuse_key(claim: Claim, runtime) -> str | None:
    """The reuse key to store with a succeeded job: its request key combined
    with this worker's arithmetic settings; None when its result is not
    bit-for-bit reproducible (``EBB_REPRODUCIBLE=0``, or an extremal job:
    equal only within float rounding, see the README)."""
    from shared import reuse

    settings = getattr(runtime, "settings", None)
    arithmetic = tuple(getattr(settings, "arithmetic", ()) or ())
    if not claim.request_key or not reuse.reproducible(arithmetic):
        return None
    if claim.config.get("method") == "extremal":
        return None
    return reuse.reuse_key(claim.request_key, arithmetic)


def _config(claim: Claim):
    from shared.attribution.config import PerturbationConfig

    try:
        return PerturbationConfig.from_dict(claim.config)
    except (TypeError, ValueError) as error:
        raise JobError(f"invalid settings: {error}") from None


def _start_timings(claim: Claim, optimising: float, returned: float, explanation) -> dict[str, float]:
    """How long the job waited before its mask optimisation started.

    ``queue_wait_s``: from handing the job to the optimiser (the worker's
    batch engine) to the creation of its run, i.e. the wait for a batch slot.
    ``first_step_s``: from the job's ``created_at`` (submission) to the start
    of its first optimisation step (broker queue, claim, image decode, engine
    wait, blur and scoring of the clean image). Both are omitted when unknown.
    """
    extra = explanation.timings or {}
    # The run was created elapsed_s before it returned its result.
    created = returned - float(explanation.elapsed_s)
    out = {"queue_wait_s": max(0.0, created - optimising)}
    if "to_first_step_s" in extra and claim.queued_s is not None and claim.claimed_perf is not None:
        first_step = created + float(extra["to_first_step_s"])
        out["first_step_s"] = max(0.0, claim.queued_s + first_step - claim.claimed_perf)
    return out


def _event(level: int, message: str, *args: Any, event: str, job_id: uuid.UUID, model: str | None,
           **fields: Any) -> None:
    """One log line per job event, its fields also as ``extra`` (JSON logs)."""
    extra = {"event": event, "job_id": str(job_id), "model": model}
    extra.update({k: v for k, v in fields.items() if v is not None})
    log.log(level, message, *args, extra=extra)


def _ended(claim: Claim, status: str, runtime, **fields: Any) -> None:
    """Count and log the end of a claimed attempt (``status``: the job's, or ``requeued``)."""
    from worker import metrics

    duration = time.perf_counter() - claim.claimed_perf if claim.claimed_perf is not None else None
    model = claim.model or runtime.model_name
    if status == "requeued":
        metrics.job_requeued(model)
    else:
        metrics.job_finished(model, status, duration)
    _event(logging.WARNING if status == JobStatus.FAILED.value else logging.INFO,
           "job %s %s (model %s, attempt %d, %.2f s)%s", claim.job_id, status, model, claim.attempt,
           duration or 0.0, f": {fields['error']}" if fields.get("error") else "",
           event=status, job_id=claim.job_id, model=model, attempt=claim.attempt,
           duration_s=round(duration, 3) if duration is not None else None, status=status, **fields)


def run_job(job_id: str | uuid.UUID, runtime, hostname: str | None = None,
            requeue: Callable[[uuid.UUID, str], Any] | None = None,
            details: dict[str, Any] | None = None) -> str:
    """Run job ``job_id`` to completion on ``runtime``; returns what happened.

    Returns one of ``succeeded``, ``failed``, ``cancelled``, ``requeued``
    (worker shutting down; ``requeue(job_id, model)`` re-sent it),
    ``skipped`` (nothing to do) or ``superseded``. Job errors never propagate:
    they end the job ``failed`` with a one-line message. Only a database that
    stays unreachable through all retries raises (the reaper recovers those).

    ``details``, when given, receives ``job_status`` (the job's status in the
    database as this run left or found it; ``None``: no such job) and
    ``error`` (its message when failed): the task reports them to Celery.
    """
    info: dict[str, Any] = details if details is not None else {}
    info.update(job_status=None, error=None)
    try:
        jid = parse_job_id(job_id)
    except ValueError:
        log.error("dropping message with invalid job id %r", job_id)
        return "skipped"
    hostname = hostname or runtime.hostname
    if runtime.stopping.is_set():
        # A message fetched during a warm shutdown: hand it back untouched
        # (after a pause, so a consumer that is still draining does not spin).
        time.sleep(STOPPING_REQUEUE_DELAY_S)
        if requeue is not None:
            requeue(jid, runtime.model_name)
        log.info("job %s: worker shutting down; message re-queued", jid)
        info["job_status"] = JobStatus.QUEUED.value
        return "requeued"
    session = session_factory(runtime.database_url)()
    claim = None
    try:
        claim = _write(session, lambda: _claim(session, jid, runtime, hostname))
        if isinstance(claim, Skip):
            info.update(job_status=claim.status, error=claim.error)
            if claim.ended_here:
                from worker import metrics

                metrics.job_finished(claim.model or runtime.model_name, claim.status, None)
                _event(logging.INFO if claim.status == JobStatus.CANCELLED.value else logging.WARNING,
                       "job %s %s before it started (model %s)%s", jid, claim.status, claim.model,
                       f": {claim.error}" if claim.error else "", event=claim.status, job_id=jid,
                       model=claim.model, status=claim.status, error=claim.error)
            return "skipped"
        hold = getattr(runtime, "hold", None)
        if hold is not None:
            hold(claim.job_id, claim.attempt)
        from worker import metrics

        metrics.job_started(claim.model or runtime.model_name, claim.queued_s)
        _event(logging.INFO, "job %s started (model %s, attempt %d, queued %.2f s)", jid, claim.model,
               claim.attempt, claim.queued_s or 0.0, event="started", job_id=jid, model=claim.model,
               attempt=claim.attempt,
               queued_s=round(claim.queued_s, 3) if claim.queued_s is not None else None)
        try:
            outcome = _execute(session, claim, runtime, requeue)
        except Superseded:
            log.warning("job %s: attempt %d superseded; dropping its result", jid, claim.attempt)
            info["job_status"] = JobStatus.RUNNING.value
            return "superseded"
        except JobError as error:
            message = one_line(error)
        except Exception as error:  # noqa: BLE001 - the worker must carry on
            log.exception("job %s failed", jid)
            message = one_line(JobError(disk_full_message(error))) if is_disk_full(error) else one_line(error)
        else:
            info["job_status"] = JobStatus.QUEUED.value if outcome == "requeued" else outcome
            _ended(claim, outcome, runtime)
            return outcome
        session.rollback()
        _finish(session, claim, status=JobStatus.FAILED.value, error=message)
        info.update(job_status=JobStatus.FAILED.value, error=message)
        _ended(claim, JobStatus.FAILED.value, runtime, error=message)
        return "failed"
    finally:
        if isinstance(claim, Claim):
            release = getattr(runtime, "release", None)
            if release is not None:
                release(claim.job_id)
            # the live preview is for running jobs only (it outlives the optimisation,
            # so the page shows the final mask while the job is being scored)
            PreviewWriter.remove_for(runtime.storage, claim.job_id)
        session.close()


def _targets(claim: Claim, runtime, pixels, config) -> list[int | None]:
    """The classes this job explains, the primary first."""
    if claim.targets:
        return list(claim.targets)
    if claim.top_k and claim.top_k > 1:
        from shared.attribution.evaluation import top_classes

        try:
            return runtime.exclusive(lambda clf: top_classes(clf, pixels, claim.top_k, config.input_size))
        except ValueError as error:
            raise JobError(f"invalid top_k: {error}") from None
    return [claim.target_index]


def _scores_json(scores) -> dict[str, Any] | None:
    if scores is None:
        return None
    data = scores.to_json()
    data.pop("target", None)
    return data


def _result_entry(explanation, evaluation, image_shape=None) -> dict[str, Any]:
    """One target's entry of ``Job.results`` (JSON; layout in the module docstring)."""
    from shared.attribution.warnings import explanation_warnings

    areas = getattr(explanation, "area_summary", None)
    return {
        "target": {"index": explanation.target, "label": explanation.label[:200]},
        "method": explanation.config.method,
        "scores": {"before": explanation.score_before, "after": explanation.score_after},
        "top5": {"before": explanation.top5_before, "after": explanation.top5_after},
        "metrics": _scores_json(evaluation.metrics) if evaluation is not None else None,
        "gradcam": (
            {**_scores_json(evaluation.gradcam), "seconds": evaluation.gradcam_s}
            if evaluation is not None and evaluation.gradcam is not None else None
        ),
        "areas": areas() if callable(areas) else None,
        "warnings": explanation_warnings(explanation, image_shape),
    }


def _evaluate(runtime, pixels, explanation):
    """Faithfulness of ``explanation`` and of Grad-CAM, on the model's device;
    ``None`` (logged) if scoring fails: the mask is still worth keeping."""
    from shared.attribution.evaluation import evaluate

    try:
        return runtime.exclusive(lambda clf: evaluate(clf, pixels, explanation, gradcam=runtime.gradcam))
    except Exception:  # noqa: BLE001 - a scoring bug must not lose the mask
        log.exception("faithfulness scoring failed for target %s", explanation.target)
        return None


class Cancelled(Exception):
    """The job was cancelled; seen at a :class:`Checkpoint` (``args[0]``: where)."""


def _n_targets(claim: Claim) -> int:
    if claim.targets:
        return len(claim.targets)
    return claim.top_k if claim.top_k and claim.top_k > 1 else 1


def _admission(claim: Claim, runtime, decoded, config) -> tuple[Any, float]:
    """Check the job against this worker's limits again (they may differ from
    the web's); returns its estimated cost and its time budget in seconds."""
    from shared.cost import TooExpensive, check, estimate, timeout_for

    settings = runtime.settings
    n = _n_targets(claim)
    cost = estimate(config, claim.model or runtime.model_name, decoded.width, decoded.height, n)
    try:
        check(cost, config, max_memory=settings.max_job_memory, max_work=settings.max_job_work,
              n_targets=n, targets_field="targets" if claim.targets else "top_k",
              width=decoded.width, height=decoded.height)
    except TooExpensive as error:
        raise JobError(f"refused by the worker's limits: {error.message}") from None
    return cost, timeout_for(cost, settings.job_timeout_s)


def _timeout_message(budget_s: float, cost) -> str:
    return (f"stopped: the job ran longer than its time budget of {budget_s:.0f} s "
            f"(EBB_JOB_TIMEOUT; the cost model estimated {cost.seconds:.0f} s)")


class Checkpoint:
    """A check between two phases of a job (before and after scoring, between
    targets, before the final commit): writes a heartbeat, then raises
    :class:`Cancelled` when a cancel was requested, :class:`Superseded` when
    the run lost the job, :class:`JobError` when it is over its time budget."""

    def __init__(self, session: Session, claim: Claim, reporter: ProgressReporter, message: str):
        self.session = session
        self.claim = claim
        self.reporter = reporter
        self.message = message
        self.passed: list[str] = []

    def __call__(self, stage: str) -> None:
        if self.reporter.expired():
            raise JobError(self.message)

        def write():
            owned = self.session.execute(
                update(Job).where(*_owned(self.claim)).values(heartbeat_at=utcnow())).rowcount
            cancel = self.session.execute(
                select(Job.cancel_requested).where(Job.id == self.claim.job_id)).scalar_one_or_none()
            return owned, cancel

        owned, cancel = _write(self.session, write)
        if owned != 1:
            raise Superseded()
        if cancel:
            self.reporter.cancel_requested = True
            raise Cancelled(stage)
        self.passed.append(stage)


def _discard_artifacts(runtime, claim: Claim, key: str | None) -> None:
    """Delete what this attempt stored: its prefix on S3 (a failed upload
    already removed its own), ``jobs/<id>`` on the file store. Best effort:
    the sweeper removes S3 leftovers later."""
    if key is None and runtime.storage.kind != "file":
        return
    try:
        runtime.storage.delete_prefix(key or job_key(claim.job_id))
    except (StorageUnavailable, OSError):
        log.warning("job %s: could not delete the artifacts of attempt %d", claim.job_id, claim.attempt)


def _check_disk(runtime) -> None:
    """Fail the job at once, rather than after its whole run, when ``DATA_DIR``
    has less than ``EBB_MIN_FREE_MB`` free (:class:`JobError`, saying to resubmit)."""
    settings = getattr(runtime, "settings", None)
    data_dir = getattr(getattr(runtime, "storage", None), "data_dir", None)
    if settings is None or data_dir is None:
        return
    try:
        free = free_mb(data_dir)
    except OSError:
        return  # not there yet: the writes will tell
    if free < settings.min_free_mb:
        raise JobError(disk_low_message(free, settings.min_free_mb))


def _execute(session: Session, claim: Claim, runtime, requeue) -> str:
    started = time.perf_counter()
    _check_disk(runtime)
    decoded = _decode(runtime, claim, on_retry=lambda: _heartbeat(session, claim))
    config = _config(claim)
    cost, budget_s = _admission(claim, runtime, decoded, config)
    reporter = ProgressReporter(session, claim, runtime.stopping, deadline=time.monotonic() + budget_s)
    checkpoint = Checkpoint(session, claim, reporter, _timeout_message(budget_s, cost))
    targets = _targets(claim, runtime, decoded.pixels, config)
    preview = PreviewWriter(runtime.storage, claim.job_id, decoded.pixels) if PREVIEW_INTERVAL_S > 0 else None
    progress = TargetsProgress(reporter, [config.iterations] * len(targets), preview)
    optimising = time.perf_counter()
    explanations = runtime.optimise_many(
        decoded.pixels, targets, config, [progress.callback(i) for i in range(len(targets))]
    )
    returned = time.perf_counter()
    if reporter.superseded:
        raise Superseded()
    if reporter.timed_out and not reporter.cancel_requested:
        raise JobError(checkpoint.message)
    explanation = explanations[0]
    timings: dict[str, Any] = {
        "seconds": explanation.elapsed_s,
        "iterations_run": sum(e.iterations_run for e in explanations),
        **{k: float(v) for k, v in (explanation.timings or {}).items()},
    }
    if claim.queued_s is not None:
        timings["queued_s"] = max(0.0, claim.queued_s)
    timings.update(_start_timings(claim, optimising, returned, explanation))
    common = dict(target_index=explanation.target, target_label=explanation.label[:200])
    cancelled = any(e.cancelled for e in explanations)

    if cancelled and not reporter.cancel_requested:
        # The worker is stopping: hand the job back to the queue. A clean
        # hand-back is not an attempt (the count goes back down) and the next
        # attempt starts from 0.
        if not _finish(session, claim, status=JobStatus.QUEUED.value, finished_at=None, enqueued_at=utcnow(),
                       heartbeat_at=None, attempts=claim.attempt - 1, progress_iteration=0, live=None,
                       current_score=None):
            raise Superseded()
        if requeue is not None:
            requeue(claim.job_id, runtime.model_name)
        log.info("job %s: re-queued (worker shutting down)", claim.job_id)
        return "requeued"
    if cancelled:
        timings["total_s"] = time.perf_counter() - started
        if not _finish(session, claim, status=JobStatus.CANCELLED.value, timings=timings, **common):
            raise Superseded()
        return "cancelled"

    artifacts_key: str | None = None  # set once this attempt's artifacts are all stored
    saved = False
    try:
        # Faithfulness of every mask (and of Grad-CAM), right after the masks;
        # a cancel or the time budget takes effect between two targets.
        checkpoint("before scoring")
        scoring = time.perf_counter()
        evaluations = []
        for e in explanations:
            if runtime.settings.test_slow_scoring_s > 0:  # test hook (EBB_TEST_SLOW_SCORING_SECONDS)
                time.sleep(runtime.settings.test_slow_scoring_s)
            evaluations.append(_evaluate(runtime, decoded.pixels, e))
            checkpoint("scoring")
        found = [ev for ev in evaluations if ev is not None]
        timings["metrics_s"] = sum(ev.metrics.seconds for ev in found)
        timings["gradcam_s"] = sum(ev.gradcam_s for ev in found)
        timings["scoring_s"] = time.perf_counter() - scoring
        results = [_result_entry(e, ev, decoded.pixels.shape) for e, ev in zip(explanations, evaluations)]

        from shared.imaging.render import save_artifacts

        def extras(e, ev) -> dict[str, Any]:
            return {"gradcam": ev.gradcam_saliency if ev is not None else None,
                    "area_masks": getattr(e, "area_masks", None)}

        saving = time.perf_counter()

        def render(folder):
            save_artifacts(
                folder, decoded.pixels, explanation,
                **extras(explanation, evaluations[0]),
                results=[{"explanation": e, **extras(e, ev)} for e, ev in zip(explanations[1:], evaluations[1:])],
                max_side=int(runtime.settings.max_artifact_side),
            )

        # Every object is written (a fresh per-attempt prefix on S3) before the
        # row names it: the update below is the commit point.
        saved = True
        try:
            artifacts_key = runtime.storage.write_artifacts(
                claim.job_id, claim.attempt, render, retries=_storage_retries(runtime),
                on_retry=lambda: _heartbeat(session, claim))
        except StorageUnavailable as error:
            raise JobError(f"could not write the artifacts to the store: {error}") from None
        timings["save_s"] = time.perf_counter() - saving
        checkpoint("before commit")
    except Cancelled as stop:
        if saved:
            _discard_artifacts(runtime, claim, artifacts_key)
        timings["total_s"] = time.perf_counter() - started
        log.info("job %s: cancelled %s", claim.job_id, stop.args[0] if stop.args else "")
        if not _finish(session, claim, status=JobStatus.CANCELLED.value, timings=timings, **common):
            raise Superseded() from None
        return "cancelled"
    except JobError:
        if saved:
            _discard_artifacts(runtime, claim, artifacts_key)
        raise
    timings["live_score_s"] = progress.live_seconds
    if preview is not None:
        timings["preview_s"] = preview.seconds
    timings["total_s"] = time.perf_counter() - started
    ok = _finish(
        session,
        claim,
        # a cancel that lands after the last checkpoint still wins
        where=(or_(Job.cancel_requested.is_(None), Job.cancel_requested.is_(False)),),
        status=JobStatus.SUCCEEDED.value,
        progress_iteration=max(timings["iterations_run"], claim.progress_floor),
        progress_total=config.iterations * len(explanations),
        current_score=explanation.score_after,
        score_before=explanation.score_before,
        score_after=explanation.score_after,
        top5={"before": explanation.top5_before, "after": explanation.top5_after},
        timings=timings,
        results=results,
        error=None,
        artifacts_key=artifacts_key,
        reuse_key=_committed_reuse_key(claim, runtime),
        **common,
    )
    if not ok:
        session.rollback()
        try:
            checkpoint("commit")
        except Cancelled:
            _discard_artifacts(runtime, claim, artifacts_key)
            if not _finish(session, claim, status=JobStatus.CANCELLED.value, timings=timings, **common):
                raise Superseded() from None
            return "cancelled"
        if runtime.storage.kind != "file":  # this attempt's own prefix; never the committed one
            _discard_artifacts(runtime, claim, artifacts_key)
        raise Superseded()
    log.debug("job %s: %d target(s), score %.3f -> %.3f", claim.job_id, len(explanations),
              explanation.score_before, explanation.score_after)
    return "succeeded"
