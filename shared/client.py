"""A small Python client of the explain-black-box HTTP API.

Usable from any script (it needs ``requests`` only: no torch, Flask or
Celery)::

    from shared.client import ExplainClient

    client = ExplainClient("http://127.0.0.1:8000", token="...")
    job = client.submit("flute.jpg", model="efficientnet_lite0", iterations=100)
    job = client.wait(job["id"])
    if job["status"] == "succeeded":
        client.download(job["id"], "out/flute")

``url`` defaults to ``EBB_URL`` (else ``http://127.0.0.1:8000``) and
``token`` to ``EBB_TOKEN``. Every error the server answers is raised as
:class:`ExplainClientError` with the server's ``status``, ``code``,
``message`` and ``field``, exactly as worded by the server. The client never
prints: progress is reported through ``wait(on_progress=...)``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urljoin

import requests

__all__ = [
    "DEFAULT_URL",
    "SUBMISSION_FIELDS",
    "TERMINAL_STATUSES",
    "ExplainClient",
    "ExplainClientError",
    "WaitTimeout",
    "artifact_filename",
]

#: Where the client connects without ``url`` and ``EBB_URL``.
DEFAULT_URL = "http://127.0.0.1:8000"
#: A job in one of these states does not change any more.
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
#: The multipart fields ``POST /api/v1/jobs`` accepts besides ``image``
#: (see the README's "The API"); :meth:`ExplainClient.submit` sends any of them.
SUBMISSION_FIELDS = (
    "model", "target", "targets", "top_k", "iterations", "learning_rate", "l1_coeff", "tv_coeff",
    "tv_beta", "noise_std", "mask_size", "input_size", "seed", "method", "blur", "game",
    "perturbation", "precision", "areas", "force",
)


class ExplainClientError(Exception):
    """An error answered by the server (or the server could not be reached).

    Attributes are the server's own: ``status`` (the HTTP status; None when
    no answer came), ``code`` (e.g. ``invalid_value``, ``not_found``;
    ``connection_error`` when unreachable), ``message`` and ``field`` (the
    form field at fault, or None). ``retry_after`` holds the seconds of a
    429's ``Retry-After`` header, when given.
    """

    def __init__(self, status: int | None, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.message} (field: {self.field})" if self.field else self.message

    def __repr__(self) -> str:
        return (f"ExplainClientError(status={self.status!r}, code={self.code!r}, "
                f"message={self.message!r}, field={self.field!r})")


class WaitTimeout(ExplainClientError, TimeoutError):
    """:meth:`ExplainClient.wait` ran out of time; ``jobs`` are the last states seen."""

    def __init__(self, message: str, jobs: list[dict[str, Any]]) -> None:
        super().__init__(None, "timeout", message)
        self.jobs = jobs


def artifact_filename(key: str) -> str:
    """The file name of artifact ``key``: ``overlay_png`` -> ``overlay.png``,
    ``result_json`` -> ``result.json`` (the names the worker writes)."""
    stem, sep, ext = key.rpartition("_")
    return f"{stem}.{ext}" if sep and stem and ext else key


def _describe(error: requests.RequestException) -> str:
    """A short reason for a failed request (``Connection refused``, ``timed out``)."""
    if isinstance(error, requests.Timeout):
        return "timed out"
    found = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", str(error))
    return found[-1].strip() if found else (str(error) or type(error).__name__)


def _field_value(value: Any) -> str:
    """A form value: lists/tuples comma-joined, booleans ``1``/``0``, others ``str()``."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


class ExplainClient:
    """Client of one explain-black-box server.

    :param url: the server's base URL (default ``EBB_URL``, else
        :data:`DEFAULT_URL`); a path prefix (``https://host/ebb``) is kept.
    :param token: bearer token for servers with ``EBB_API_TOKENS`` (default
        ``EBB_TOKEN``; none when empty).
    :param timeout: seconds each HTTP request may take (connect and read).
    :param session: a ``requests.Session`` to use (default: a new one).
    """

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0,
                 session: requests.Session | None = None) -> None:
        self.url = (url or os.environ.get("EBB_URL") or DEFAULT_URL).rstrip("/")
        token = os.environ.get("EBB_TOKEN") if token is None else token
        self.token = token or None
        self.timeout = timeout
        self.session = session or requests.Session()
        if self.token:
            self.session.headers["Authorization"] = f"Bearer {self.token}"

    def __repr__(self) -> str:
        return f"ExplainClient(url={self.url!r})"

    def close(self) -> None:
        """Close the underlying HTTP session."""
        self.session.close()

    def __enter__(self) -> "ExplainClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ HTTP

    def absolute(self, link: str) -> str:
        """``link`` (e.g. a job's ``links.page``, an artifact URL) as an absolute URL.

        The server's links are host-absolute paths (they already carry any
        path prefix), so they are resolved against the server's origin.
        """
        return urljoin(self.url + "/", link)

    def _api(self, path: str) -> str:
        return f"{self.url}/api/v1/{path.lstrip('/')}"

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """Send a request; raise :class:`ExplainClientError` unless it answers 2xx."""
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self.session.request(method, url, **kwargs)
        except requests.RequestException as error:
            raise ExplainClientError(None, "connection_error",
                                     f"cannot reach {self.url}: {_describe(error)}") from error
        if response.status_code >= 400:
            raise self._error(response)
        return response

    @staticmethod
    def _error(response: requests.Response) -> ExplainClientError:
        """The :class:`ExplainClientError` of an error response (JSON or not)."""
        retry_after = None
        header = response.headers.get("Retry-After")
        if header:
            try:
                retry_after = float(header)
            except ValueError:
                retry_after = None
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return ExplainClientError(response.status_code, str(error.get("code") or "error"),
                                      error["message"], error.get("field"), retry_after)
        text = " ".join((response.text or "").split())[:200]
        message = f"HTTP {response.status_code} {response.reason or ''}".rstrip()
        return ExplainClientError(response.status_code, f"http_{response.status_code}",
                                  f"{message}: {text}" if text else message, None, retry_after)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, self._api(path), **kwargs).json()

    # ------------------------------------------------------------------ jobs

    def submit(self, image_path: str | os.PathLike[str], **fields: Any) -> dict[str, Any]:
        """Submit ``image_path`` for explanation; return the new job's JSON (status ``queued``).

        ``fields`` are submission fields (:data:`SUBMISSION_FIELDS`, e.g.
        ``model="efficientnet_lite0"``, ``iterations=100``,
        ``targets=["flute", 683]``); None values are left out, so the
        server's defaults apply. Lists are sent comma-separated.
        ``force=True`` runs the job even when an identical one already
        succeeded (else the server answers at once with a succeeded job whose
        ``reused_from`` names it).
        """
        path = Path(image_path)
        form = {name: _field_value(value) for name, value in fields.items() if value is not None}
        with open(path, "rb") as handle:
            return self._request("POST", self._api("jobs"), data=form,
                                 files={"image": (path.name, handle)}).json()

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's current JSON (``GET /api/v1/jobs/<id>``)."""
        return self._json("GET", f"jobs/{job_id}")

    def list_jobs(self, status: str | None = None, limit: int = 20, cursor: str | None = None) -> dict[str, Any]:
        """One page of jobs, newest first: ``{"jobs": [...], "next_cursor": ...}``."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if cursor:
            params["cursor"] = cursor
        return self._json("GET", "jobs", params=params)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one at once, a running one at its next step.

        Returns the job's JSON; a job already finished is a 409 ``conflict``.
        """
        return self._json("POST", f"jobs/{job_id}/cancel")

    def wait(self, job_ids: str | Iterable[str], poll: float = 1.0, timeout: float | None = None,
             on_progress: Callable[[list[dict[str, Any]]], None] | None = None,
             max_errors: int = 5) -> Any:
        """Poll jobs until every one is succeeded, failed or cancelled.

        :param job_ids: one job id (then one job dict is returned) or several
            (then a list of job dicts, in the same order).
        :param poll: seconds between polling rounds.
        :param timeout: give up after this many seconds with
            :class:`WaitTimeout` (None: wait as long as it takes).
        :param on_progress: called after every polling round with the latest
            JSON of all the jobs (finished ones included).
        :param max_errors: polling rounds in a row that may fail with a
            transient error (server unreachable, 5xx: e.g. a web restart)
            before that error is raised; 4xx errors are raised at once.
        """
        single = isinstance(job_ids, str)
        ids = [job_ids] if single else [str(j) for j in job_ids]
        latest: dict[str, dict[str, Any]] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        errors = 0
        while True:
            try:
                for job_id in ids:
                    if latest.get(job_id, {}).get("status") not in TERMINAL_STATUSES:
                        latest[job_id] = self.get(job_id)
                errors = 0
            except ExplainClientError as error:
                transient = error.status is None or error.status >= 500
                errors += 1
                if not transient or errors > max_errors or (deadline is not None and time.monotonic() >= deadline):
                    raise
                time.sleep(poll)
                continue
            jobs = [latest[j] for j in ids]
            if on_progress is not None:
                on_progress(jobs)
            if all(job["status"] in TERMINAL_STATUSES for job in jobs):
                return jobs[0] if single else jobs
            if deadline is not None and time.monotonic() >= deadline:
                pending = sum(job["status"] not in TERMINAL_STATUSES for job in jobs)
                raise WaitTimeout(f"{pending} job(s) not finished after {timeout:g} s", jobs)
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    # ------------------------------------------------------------------ artifacts

    @staticmethod
    def artifact_links(job: Mapping[str, Any]) -> dict[str, str]:
        """Relative file path -> URL of every artifact a job's JSON links.

        The primary target's files (``artifacts``) keep their names
        (``overlay.png``, ``result.json``, ...); the other targets' go under
        ``results/<k>/`` as on the server. ``results[0]`` is the primary
        target again and is not repeated.
        """
        links: dict[str, str] = {}
        for key, url in (job.get("artifacts") or {}).items():
            if url:
                links[artifact_filename(key)] = url
        for k, result in enumerate(job.get("results") or []):
            if k == 0:
                continue
            for key, url in ((result or {}).get("artifacts") or {}).items():
                if url:
                    links[f"results/{k}/{artifact_filename(key)}"] = url
        return links

    def download_artifact(self, url: str, destination: str | os.PathLike[str]) -> Path:
        """Download one artifact URL to ``destination`` (written to a temporary
        name, then renamed, so a file never appears half-written)."""
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(f".{destination.name}.part")
        response = self._request("GET", self.absolute(url), stream=True)
        try:
            with open(partial, "wb") as handle:
                for chunk in response.iter_content(chunk_size=1 << 16):
                    handle.write(chunk)
            os.replace(partial, destination)
        finally:
            response.close()
            partial.unlink(missing_ok=True)
        return destination

    def download(self, job_id: str, out_dir: str | os.PathLike[str],
                 job: Mapping[str, Any] | None = None) -> list[Path]:
        """Download every artifact of a job into ``out_dir``; return the files written.

        Layout (see :meth:`artifact_links`): ``out_dir/mask.png``, ...,
        ``out_dir/result.json`` for the primary target and
        ``out_dir/results/<k>/...`` for the k-th other target. Only a
        succeeded job has artifacts; ``job`` (its JSON, when already
        fetched) saves one request.
        """
        job = job if job is not None else self.get(job_id)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return [self.download_artifact(url, out / relative)
                for relative, url in sorted(self.artifact_links(job).items())]

    # ------------------------------------------------------------------ service

    def models(self) -> dict[str, Any]:
        """The models the server offers: ``{"default": name, "models": [...]}``."""
        return self._json("GET", "models")

    def workers(self) -> list[dict[str, Any]]:
        """The connected workers (``GET /api/v1/workers``): one dict each with
        ``hostname``, ``model``, ``device``, ``precision``, ``max_batch``,
        ``running_jobs``, ``jobs_done``, ``iterations_per_s``, ``started_at``,
        ``last_seen`` and ``version``."""
        return list(self._json("GET", "workers").get("workers") or [])
