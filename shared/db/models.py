"""SQLAlchemy 2 typed models. The database is the source of truth for jobs."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, Text, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


TERMINAL_STATUSES = tuple(s.value for s in JobStatus if s.terminal)


class Job(Base):
    """One explain job: queued -> running -> succeeded | failed | cancelled."""

    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    status: Mapped[str] = mapped_column(String(16), index=True, default=JobStatus.QUEUED.value)
    model: Mapped[str] = mapped_column(String(64))
    # Requested target as given (index or label), resolved to index + label by the worker
    # when absent (top-1) or by the web when it can.
    target_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    target_label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Several targets in one job: the class indices asked for (the first is
    # ``target_index``), or ``top_k`` > 1 for the k most probable classes.
    targets: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    top_k: Mapped[int | None] = mapped_column(Integer, nullable=True)

    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_width: Mapped[int] = mapped_column(Integer)
    image_height: Mapped[int] = mapped_column(Integer)
    image_filename: Mapped[str] = mapped_column(String(255), default="image")

    progress_iteration: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    current_score: Mapped[float | None] = mapped_column(Float, nullable=True)

    score_before: Mapped[float | None] = mapped_column(Float, nullable=True)
    score_after: Mapped[float | None] = mapped_column(Float, nullable=True)
    # {"before": [{"index", "label", "prob"}...], "after": [...]}
    top5: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # {"seconds": ..., "iterations_run": ..., ...}
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # One entry per explained target (the primary first): its method, scores,
    # deletion/insertion metrics, Grad-CAM baseline and extremal areas; see
    # ``worker.jobs`` for the layout.
    results: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    # Written by the worker while it runs: one entry per target, the primary
    # first: {"index", "label", "iteration", "total", "score", "score_iteration",
    # "score_before"}; see ``worker.jobs.TargetsProgress``.
    live: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(default=False)

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # When the job's task was last sent to the queue; the reaper re-sends jobs
    # queued for too long (e.g. a Redis restart lost the message).
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, default=utcnow)
    # The name of the token that submitted the job (``EBB_API_TOKENS`` entry or
    # ``ebb tokens create``); ``default`` for bare tokens and single-user mode.
    owner: Mapped[str] = mapped_column(String(64), index=True, default="default",
                                       server_default="default")
    worker_hostname: Mapped[str | None] = mapped_column(String(255), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Where the artifacts of a succeeded job live in the store (``jobs/<id>`` on
    # the file store, ``jobs/<id>/<attempt token>`` on S3); set by the same
    # update that marks it succeeded, so a reader never sees half a result.
    # None on rows older than migration 0004: ``jobs/<id>``.
    artifacts_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # sha256 of the inputs (image, model, targets, config) and of the settings
    # that change the arithmetic (``shared.reuse``); set when the job succeeded
    # reproducibly. Identical submissions are answered from such a job.
    reuse_key: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # The succeeded job whose artifacts (and results) this one shares.
    reused_from: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)


class ApiToken(Base):
    """A token made with ``ebb tokens create``: only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LoginSession(Base):
    """A browser login (server side, so that logout revokes it).

    The cookie carries a random session id; only its SHA-256 is stored here,
    with the SHA-256 of the token that logged in (the session ends when that
    token is no longer configured) and the expiry (``EBB_SESSION_HOURS``).
    """

    __tablename__ = "login_sessions"

    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
