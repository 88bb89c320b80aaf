"""The worker process's state: its one preloaded model, and the optimisation entry point.

A worker serves exactly one model (``EBB_MODEL``). :func:`load_runtime` loads
it once, before the worker consumes its first message (from the Celery
``worker_init`` signal, see :mod:`worker.tasks`); every task thread then
shares it through :func:`get_runtime`.

All optimisation goes through :meth:`Runtime.optimise`, the single place to
swap the one-job-per-thread call for a continuous-batching engine.

Environment (besides :mod:`shared.settings`):
    ``EBB_DEVICE``: ``cpu``, ``cuda``, ``cuda:1``... (default: CUDA if available).
    ``EBB_TEST_SLOW_LOAD_SECONDS``: sleep this long while loading the model
        (tests of slow start-up).
    ``EBB_HEARTBEAT_TIMEOUT``: seconds without heartbeat before the reaper
        considers a running job lost (default 120).
    ``EBB_MAX_ATTEMPTS``: deliveries of one job before it fails (default 3).
    ``EBB_GRADCAM``: ``1`` (default) to compute the Grad-CAM baseline and its
        faithfulness scores on every job, ``0`` to skip it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from shared import settings as settings_mod
from shared.storage import Storage, open_storage

if TYPE_CHECKING:  # pragma: no cover
    from worker.engine import BatchEngine
    import numpy as np

    from shared.attribution.classifier import Classifier
    from shared.attribution.config import PerturbationConfig
    from shared.attribution.perturbation import Explanation

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_TIMEOUT_S = 120.0
DEFAULT_MAX_ATTEMPTS = 3
#: Worker threads (jobs in flight) when ``EBB_MAX_BATCH`` is 0 (automatic).
DEFAULT_CONCURRENCY_CPU = 4
DEFAULT_CONCURRENCY_CUDA = 8


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def heartbeat_timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """``EBB_HEARTBEAT_TIMEOUT`` (seconds), default 120."""
    return _env_float(os.environ if environ is None else environ, "EBB_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT_S)


def max_attempts(environ: Mapping[str, str] | None = None) -> int:
    """``EBB_MAX_ATTEMPTS``, default 3."""
    return int(_env_float(os.environ if environ is None else environ, "EBB_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS))


def gradcam_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """``EBB_GRADCAM``: ``1``/``true``/``yes``/``on`` (default) or ``0``/``false``/``no``/``off``."""
    env = os.environ if environ is None else environ
    raw = str(env.get("EBB_GRADCAM") or "1").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"EBB_GRADCAM must be 1 or 0, got {raw!r}")


def choose_device(environ: Mapping[str, str] | None = None) -> str:
    """``EBB_DEVICE`` if set, else ``cuda`` when available, else ``cpu`` (imports torch)."""
    env = os.environ if environ is None else environ
    if env.get("EBB_DEVICE"):
        return env["EBB_DEVICE"]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_concurrency(settings: settings_mod.Settings, device: str) -> int:
    """Jobs a worker runs at once, = its batch cap: ``EBB_MAX_BATCH``, else 4 on
    a CPU and about one job per GiB of GPU memory (at most 64) on CUDA."""
    if settings.max_batch > 0:
        return settings.max_batch
    if not device.startswith("cuda"):
        return DEFAULT_CONCURRENCY_CPU
    from worker.engine import default_max_batch

    return default_max_batch(device)


def worker_hostname(model: str, device: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """Celery node name ``<model>.<devices>@<host>``: ``vgg19.gpu0@box``, ``vgg19.cpu@box``.

    ``<devices>`` is ``cpu`` on the CPU, else ``gpu`` + ``CUDA_VISIBLE_DEVICES``
    (``gpu0-1``), or ``gpu`` when that is unset.
    """
    env = os.environ if environ is None else environ
    device = device or env.get("EBB_DEVICE") or ""
    visible = (env.get("CUDA_VISIBLE_DEVICES") or "").strip()
    if device.startswith("cpu") or (not device and visible in ("", "-1")):
        devices = "cpu"
    else:
        devices = "gpu" + "-".join(v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1")
    return f"{model}.{devices}@{socket.gethostname()}"


@dataclass
class Runtime:
    """Everything a task needs: the model and where to read and write.

    Attributes:
        model_name: the registry name the worker serves.
        classifier: the loaded model (eval mode, frozen parameters).
        device: where it lives.
        settings: the process's settings.
        storage: uploads and artifacts under ``settings.data_dir``.
        hostname: recorded on jobs as ``worker_hostname``.
        stopping: set when the worker shuts down; running jobs then stop at
            their next progress report and are re-queued.
    """

    model_name: str
    classifier: "Classifier"
    device: str
    settings: settings_mod.Settings
    storage: Storage
    hostname: str
    heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    stopping: threading.Event = field(default_factory=threading.Event)
    engine: "BatchEngine | None" = None
    #: Compute the Grad-CAM baseline next to every mask (``EBB_GRADCAM``).
    gradcam: bool = True
    #: ``{job id: attempt}`` of the jobs this process runs now (claimed and
    #: not yet ended): :class:`worker.heartbeat.JobHeartbeat` keeps them alive.
    held: dict = field(default_factory=dict)
    _held_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def hold(self, job_id: Any, attempt: int) -> None:
        """Register a claimed job (its heartbeat is kept from now on)."""
        with self._held_lock:
            self.held[job_id] = attempt

    def release(self, job_id: Any) -> None:
        """The job ended here (finished, handed back or superseded)."""
        with self._held_lock:
            self.held.pop(job_id, None)

    def held_jobs(self) -> dict:
        """A copy of :attr:`held`."""
        with self._held_lock:
            return dict(self.held)

    @property
    def database_url(self) -> str:
        return self.settings.database_url

    def optimise(
        self,
        pixels: "np.ndarray",
        target: int | None,
        config: "PerturbationConfig",
        on_step: Callable[[int, int, Mapping[str, float]], Any] | None = None,
    ) -> "Explanation":
        """Run one job's mask optimisation on the preloaded model.

        The one entry point tasks use. With an engine (the default), the job
        joins the continuous batch of every job this worker runs and this call
        blocks until it is done; ``on_step`` runs on the engine thread.
        """
        return self.optimise_many(pixels, [target], config, [on_step])[0]

    def optimise_many(
        self,
        pixels: "np.ndarray",
        targets: "list[int | None]",
        config: "PerturbationConfig",
        on_steps: "list[Callable[[int, int, Mapping[str, float]], Any] | None]",
    ) -> "list[Explanation]":
        """One explanation per target of the same image, optimised together.

        With the engine every target joins the batch at once (a top-3 job is
        three masks in one forward/backward per step); without it they run
        one after the other. ``config.method`` picks Meaningful Perturbation
        or extremal perturbations (an ``ExtremalExplanation``).
        """
        if len(targets) != len(on_steps):
            raise ValueError("targets and on_steps must have the same length")
        if self.engine is not None:
            futures = [self.engine.submit(pixels, t, config, cb) for t, cb in zip(targets, on_steps)]
            return [f.result() for f in futures]
        from shared.attribution.methods import run_method

        out = [run_method(self.classifier, pixels, t, config, cb) for t, cb in zip(targets, on_steps)]
        return out

    def exclusive(self, fn: "Callable[[Classifier], Any]") -> Any:
        """``fn(classifier)`` with the model to itself (on the engine thread
        between two steps when there is an engine); returns its result."""
        if self.engine is not None:
            return self.engine.call(fn).result()
        return fn(self.classifier)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def _freeze(classifier: "Classifier") -> None:
    """Eval mode and no parameter gradients, for good: threads share the module."""
    classifier.module.eval()
    for p in classifier.module.parameters():
        p.requires_grad_(False)


def load_runtime(settings: settings_mod.Settings | None = None, environ: Mapping[str, str] | None = None) -> Runtime:
    """Load the worker's model once (idempotent, thread-safe) and return the runtime.

    Raises whatever the registry raises (e.g. ``WeightsUnavailableError``,
    ``ValueError`` for an unknown model).
    """
    global _runtime
    with _runtime_lock:
        if _runtime is not None:
            return _runtime
        env = os.environ if environ is None else environ
        settings = settings or settings_mod.load(dict(env))
        from shared.models.registry import load_model
        from worker.engine import BatchEngine, device_memory_budget
        from worker.metrics import engine_hook

        device = choose_device(env)
        started = time.perf_counter()
        log.info("loading model %s on %s", settings.model, device)
        slow = _env_float(env, "EBB_TEST_SLOW_LOAD_SECONDS", 0.0)
        if slow > 0:
            log.warning("EBB_TEST_SLOW_LOAD_SECONDS=%s: sleeping during model load", slow)
            time.sleep(slow)
        classifier = load_model(settings.model, device=device, weights_file=settings.weights_file)
        _freeze(classifier)
        _runtime = Runtime(
            model_name=settings.model,
            classifier=classifier,
            device=device,
            settings=settings,
            storage=open_storage(settings),
            hostname=worker_hostname(settings.model, device, env),
            heartbeat_timeout_s=heartbeat_timeout_s(env),
            max_attempts=max_attempts(env),
            gradcam=gradcam_enabled(env),
            engine=BatchEngine(classifier, max_batch=default_concurrency(settings, device),
                               on_batch=engine_hook(settings.model),
                               memory_budget=device_memory_budget(device, settings.device_memory),
                               model_name=settings.model).start(),
        )
        log.info("model %s ready on %s in %.1f s", settings.model, device, time.perf_counter() - started)
        return _runtime


def get_runtime() -> Runtime:
    """The loaded runtime (loading it now if the start-up hook did not)."""
    return _runtime if _runtime is not None else load_runtime()


def set_runtime(runtime: Runtime | None) -> None:
    """Install (or clear) the process runtime; for tests and embedding."""
    global _runtime
    with _runtime_lock:
        _runtime = runtime
