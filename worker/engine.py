"""Continuous batching of mask optimisations on one device.

One :class:`BatchEngine` per worker process owns the model and steps every
active job's mask together in one forward/backward batch. A job that arrives
while others run joins at the next step; a finished or cancelled job leaves
without disturbing the others. Each job keeps its own iteration count, seed,
config and progress callback; jobs whose ``input_size`` or ``precision``
differs are stepped in separate groups (a bf16 job never turns its fp32
neighbours' step into bf16).

Reproducible under load (``EBB_REPRODUCIBLE=1``, the default): each
Meaningful Perturbation group is stepped in a fixed layout of
``layout_width`` samples (``EBB_LAYOUT_WIDTH``, default ``max_batch`` on a
CPU, at most 8 on a GPU; more jobs fill further batches of that width),
each job in the slot it got on admission and free slots zero-filled,
so a job's mask and scores are bit-for-bit the same alone, beside any other
jobs or submitted together, on the same device, precision, model and
``max_batch`` (torch's CPU kernels give a sample different float rounding in
batches of different sizes; the slot does not matter, measured, but is kept
fixed anyway). The cost is the zero slots' work while the worker is not full
(``benchmarks/reproducibility.py``). ``EBB_REPRODUCIBLE=0`` batches only the
running jobs (equal to solo runs within float tolerance).

On the CPU the engine puts the model's 4-D weights in ``channels_last`` memory
format (oneDNN's native layout): measured 5-35% less time per step for VGG19
and EfficientNet-Lite0 (``benchmarks/device_speedups.py``), results within
float tolerance of the default layout. ``EBB_CHANNELS_LAST`` = ``auto``
(default: on for CPU models with 2-D convolutions), ``1`` or ``0``.

The engine is thread-based: Celery's ``threads`` pool runs one task per thread,
each task calls :meth:`BatchEngine.submit` and waits on the returned future,
while one engine thread runs the optimisation. Progress callbacks run on the
engine thread, between steps.

Extremal runs (``method: extremal``) join the same loop: those of one input
size are stepped together (one batch of all their areas, see
``shared.attribution.extremal.extremal_step_batch``) between the batched
Meaningful Perturbation steps, so neither kind stalls the other. Anything else that must use the
model alone (Grad-CAM registers hooks on it; the faithfulness curves score a
batch of images) goes through :meth:`BatchEngine.call`, which runs a function
on the engine thread between two steps.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from shared.attribution.classifier import Classifier
from shared.attribution.config import PerturbationConfig
from shared.attribution.perturbation import Explanation, MaskOptimisation, OnStep, step_batch

log = logging.getLogger(__name__)

CPU_DEFAULT_BATCH = 4


def default_max_batch(device: str) -> int:
    """Batch cap for ``device``: 4 on a CPU; on a GPU about one job per GiB, at most 64."""
    if not str(device).startswith("cuda"):
        return CPU_DEFAULT_BATCH
    import torch

    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return max(1, min(64, int(total / 2**30)))


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def wants_reproducible(environ: Any = None) -> bool:
    """``EBB_REPRODUCIBLE``: ``1`` (default) steps every group in a fixed
    batch layout (bit-for-bit results under any load), ``0`` in a batch of
    just the running jobs (less work while the worker is not full)."""
    env = os.environ if environ is None else environ
    raw = str(env.get("EBB_REPRODUCIBLE") or "1").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"EBB_REPRODUCIBLE must be 1 or 0, got {raw!r}")


def default_layout_width(max_batch: int, device: str, environ: Any = None) -> int:
    """``EBB_LAYOUT_WIDTH``, else ``max_batch`` on a CPU and ``min(max_batch, 8)``
    on a GPU (so one job alone does not pay for 64 padded samples)."""
    env = os.environ if environ is None else environ
    raw = str(env.get("EBB_LAYOUT_WIDTH") or "").strip()
    if raw:
        try:
            width = int(raw)
        except ValueError:
            raise ValueError(f"EBB_LAYOUT_WIDTH must be a positive integer, got {raw!r}") from None
        if width < 1:
            raise ValueError(f"EBB_LAYOUT_WIDTH must be a positive integer, got {raw!r}")
        return min(width, max_batch)
    return max_batch if not str(device).startswith("cuda") else min(max_batch, 8)


def wants_channels_last(classifier: Classifier, environ: Any = None) -> bool:
    """``EBB_CHANNELS_LAST``: ``1``/``0``, or ``auto`` (default): on for a CPU
    model with 2-D convolutions (not measured on CUDA yet: off there)."""
    env = os.environ if environ is None else environ
    raw = str(env.get("EBB_CHANNELS_LAST") or "auto").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    if raw != "auto":
        raise ValueError(f"EBB_CHANNELS_LAST must be auto, 1 or 0, got {raw!r}")
    import torch

    return classifier.device.type == "cpu" and any(
        isinstance(m, torch.nn.Conv2d) for m in classifier.module.modules()
    )


def device_memory_budget(device: str, setting: int | None = None) -> int | None:
    """Bytes the engine's batch may use: ``setting`` (``EBB_DEVICE_MEMORY``)
    when given, else 90% of what the device reports free now (CUDA:
    ``torch.cuda.mem_get_info``; CPU: ``MemAvailable`` of ``/proc/meminfo``),
    or None when it cannot tell."""
    if setting is not None:
        return int(setting)
    try:
        if str(device).startswith("cuda"):
            import torch

            free, _total = torch.cuda.mem_get_info(torch.device(device))
            return int(free * 0.9)
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * 0.9)
    except Exception:  # noqa: BLE001 - no budget rather than no worker
        log.warning("could not read the device's free memory; batches are not memory-bounded")
    return None


def _plan_key(config: PerturbationConfig) -> tuple:
    """:func:`_group_key` of the run ``config`` will create."""
    if config.method == "extremal":
        return ("extremal", config.input_size)
    return ("mp", config.input_size, config.precision)


def _items(config: PerturbationConfig) -> int:
    """Masks one run of ``config`` puts in its group's batch (one per extremal area)."""
    return len(config.areas) if config.method == "extremal" else 1


@dataclass
class _Pending:
    image: Any
    target: int | None
    config: PerturbationConfig
    on_step: OnStep | None
    future: Future


def _create_run(classifier: Classifier, job: _Pending) -> Any:
    """The run object of a job: a :class:`MaskOptimisation` or, for
    ``method: extremal``, an ``ExtremalOptimisation``."""
    if job.config.method == "extremal":
        from shared.attribution.extremal import ExtremalOptimisation

        return ExtremalOptimisation.from_config(classifier, job.image, job.target, job.config, job.on_step)
    return MaskOptimisation.create(classifier, job.image, job.target, job.config, job.on_step)


def _run_result(classifier: Classifier, run: Any) -> Explanation:
    if isinstance(run, MaskOptimisation):
        return run.result(classifier)
    from shared.attribution.extremal import to_explanation

    return to_explanation(run.result(classifier), run.config, classifier.name)


def _group_key(run: Any) -> tuple:
    """Runs stepped together: Meaningful Perturbation runs by (input size,
    precision), extremal runs by input size."""
    if isinstance(run, MaskOptimisation):
        return ("mp", run.config.input_size, run.config.precision)
    return ("extremal", run.input_size)


def _step_group(classifier: Classifier, runs: list, width: int | None = None,
                slots: list[int] | None = None) -> None:
    if isinstance(runs[0], MaskOptimisation):
        step_batch(classifier, runs, width=width, slots=slots)
    else:
        from shared.attribution.extremal import extremal_step_batch

        extremal_step_batch(classifier, runs)


class BatchEngine:
    """Steps up to ``max_batch`` jobs together on ``classifier``'s device.

    Args:
        classifier: the preloaded model (the engine owns it from now on).
        max_batch: most jobs stepped together (>= 1).
        channels_last: convert the model's 4-D weights to ``channels_last``
            in place; ``None`` (default) = :func:`wants_channels_last`.
        reproducible: step each Meaningful Perturbation group in a fixed
            layout: always ``max_batch`` samples, each job in the slot it got
            on admission (the lowest free one), the free slots zero-filled.
            A job's arithmetic then never depends on its neighbours, so its
            mask is bit-for-bit the same alone, beside other jobs or
            submitted together (same device, precision, model and
            ``max_batch``); on CUDA cuDNN's deterministic kernels are also
            selected. ``None`` (default) = :func:`wants_reproducible`.
        layout_width: samples per forward/backward in the fixed layout;
            slot ``s`` is lane ``s % width`` of batch ``s // width``, so
            more jobs than ``layout_width`` run as several fixed batches.
            ``None`` (default) = :func:`default_layout_width`.
        on_batch: called on the engine thread after every batched step as
            ``on_batch(kind, runs, iterations)``: ``kind`` ``"mp"`` or
            ``"extremal"``, the runs stepped together and the mask-iterations
            done (one run stepped once counts 1, as in
            :attr:`mask_iterations`). The worker's
            metrics hook (:func:`worker.metrics.engine_hook`); its errors are
            logged and ignored.
        memory_budget: bytes the batch may use (``EBB_DEVICE_MEMORY`` or
            :func:`device_memory_budget`); None: unbounded. A job is admitted
            only when the estimated peak memory of the batch with it
            (:meth:`planned_memory`, from :func:`shared.cost.item_memory`)
            stays within the budget; it waits otherwise, and fails alone
            when it would exceed the budget in an empty batch.
        model_name: the model's name in the cost table (default
            ``classifier.name``).
    """

    def __init__(self, classifier: Classifier, max_batch: int = CPU_DEFAULT_BATCH,
                 channels_last: bool | None = None, reproducible: bool | None = None,
                 layout_width: int | None = None,
                 on_batch: Callable[[str, int, int], None] | None = None,
                 memory_budget: int | None = None, model_name: str | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if channels_last is None:
            channels_last = wants_channels_last(classifier)
        if channels_last:
            import torch

            classifier.module.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        if reproducible is None:
            reproducible = wants_reproducible()
        self.reproducible = bool(reproducible)
        if self.reproducible and classifier.device.type == "cuda":
            import torch

            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        if layout_width is None:
            layout_width = default_layout_width(max_batch, str(classifier.device))
        if layout_width < 1:
            raise ValueError(f"layout_width must be at least 1, got {layout_width}")
        self.layout_width = min(int(layout_width), max_batch)
        self._slots: dict[int, int] = {}  # id(run) -> its slot in its group's layout
        self.classifier = classifier
        self.max_batch = max_batch
        self._pending: deque[_Pending] = deque()
        self._calls: deque[tuple[Callable[[Classifier], Any], Future]] = deque()
        self._active: list[tuple[MaskOptimisation, Future]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # batched steps taken, for tests and metrics
        self.max_seen_batch = 0
        #: Mask-iterations done (one job's run stepped once counts 1), and the
        #: seconds spent stepping them: the fleet heartbeat's rates.
        self.mask_iterations = 0
        self.busy_s = 0.0
        self.on_batch = on_batch
        self.memory_budget = memory_budget
        self.model_name = model_name or str(getattr(classifier, "name", "") or "")
        #: Highest :meth:`planned_memory` of a batch the engine formed (bytes).
        self.max_planned_memory = 0

    # ----------------------------------------------------------------- public API

    def start(self) -> "BatchEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ebb-batch-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the engine thread; jobs still pending or active fail with RuntimeError."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(
        self,
        image: Any,
        target: int | None = None,
        config: PerturbationConfig = PerturbationConfig(),
        on_step: OnStep | None = None,
    ) -> "Future[Explanation]":
        """Queue one job; it joins the running batch at the next step.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.
            target: class index or ``None`` (top-1).
            config: the job's own settings.
            on_step: the job's progress callback; returning ``True`` cancels it.
        Returns:
            A future resolving to the job's :class:`Explanation` (or its error).
        """
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the batch engine is stopped")
            self._pending.append(_Pending(image, target, config, on_step, future))
            self._cond.notify_all()
        self.start()
        return future

    def explain(self, image, target=None, config=PerturbationConfig(), on_step=None) -> Explanation:
        """Submit and wait: the drop-in replacement for a direct ``explain`` call."""
        return self.submit(image, target, config, on_step).result()

    def call(self, fn: Callable[[Classifier], Any]) -> "Future[Any]":
        """Run ``fn(classifier)`` on the engine thread, alone, between two steps.

        For work that must not overlap the batched steps on the shared model
        (Grad-CAM hooks its layers) or that should run on the model's device
        in the worker's one stream of work (the faithfulness curves). Calls run
        in the order given, before jobs waiting for a batch slot are admitted.
        Returns a future with ``fn``'s result (or its exception).
        """
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the batch engine is stopped")
            self._calls.append((fn, future))
            self._cond.notify_all()
        self.start()
        return future

    @property
    def active(self) -> int:
        return len(self._active)

    # ----------------------------------------------------------------- engine thread

    def planned_memory(self, configs: list[PerturbationConfig]) -> int:
        """Estimated peak memory (bytes) of a batch of runs of ``configs``.

        Groups are stepped one after the other, so the peak is the largest
        group's: a Meaningful Perturbation group steps chunks of
        ``layout_width`` samples in turn (all of them, padding included, when
        reproducible), an extremal group one batch of all its areas.
        """
        from shared.cost import item_memory

        groups: dict[tuple, list[PerturbationConfig]] = {}
        for config in configs:
            groups.setdefault(_plan_key(config), []).append(config)
        peak = 0
        for key, members in groups.items():
            item = item_memory(self.model_name, key[1], "meaningful_perturbation" if key[0] == "mp" else "extremal")
            if key[0] == "mp":
                width = self.layout_width if self.reproducible else min(len(members), self.max_batch)
                size = item * (width if self.reproducible else min(len(members), width))
            else:
                size = item * sum(_items(c) for c in members)
            peak = max(peak, size)
        return peak

    def _admit(self) -> None:
        """Move pending jobs into the batch while there is room (engine thread):
        at most ``max_batch`` runs, within ``memory_budget``."""
        while True:
            with self._cond:
                if not self._pending or len(self._active) >= self.max_batch:
                    return
                job = self._pending[0]
                if self.memory_budget is not None:
                    active = [r.config for r, _ in self._active]
                    planned = self.planned_memory(active + [job.config])
                    if planned > self.memory_budget:
                        if active:
                            return  # wait for room: jobs are admitted in order
                        self._pending.popleft()
                        from shared.cost import format_bytes

                        if job.future.set_running_or_notify_cancel():
                            job.future.set_exception(MemoryError(
                                f"the job needs about {format_bytes(planned)} in one batch, over the "
                                f"worker's device memory budget of {format_bytes(self.memory_budget)} "
                                f"(EBB_DEVICE_MEMORY); lower input_size or areas"))
                        continue
                    self.max_planned_memory = max(self.max_planned_memory, planned)
                self._pending.popleft()
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                run = _create_run(self.classifier, job)
            except Exception as exc:  # bad job: fail it alone
                job.future.set_exception(exc)
                continue
            key = _group_key(run)
            used = {self._slots[id(r)] for r, _ in self._active if _group_key(r) == key}
            self._slots[id(run)] = min(set(range(self.max_batch)) - used)
            self._active.append((run, job.future))

    def _retire(self) -> None:
        still = []
        for run, future in self._active:
            if not run.done:
                still.append((run, future))
                continue
            self._slots.pop(id(run), None)
            try:
                future.set_result(_run_result(self.classifier, run))
            except Exception as exc:
                future.set_exception(exc)
        self._active = still

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(self.classifier))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    def _report_batch(self, runs: list, before: list[int]) -> None:
        kind = "mp" if isinstance(runs[0], MaskOptimisation) else "extremal"
        masks = sum(r.iteration - b for r, b in zip(runs, before))
        try:
            self.on_batch(kind, len(runs), masks)
        except Exception:  # noqa: BLE001 - metrics never stop the optimisation
            log.exception("on_batch hook failed")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._active and not self._calls:
                    self._cond.wait()
                if self._stopping:
                    break
            self._run_calls()
            self._admit()
            # One forward/backward per (input size, precision): a bf16 job must
            # not turn its fp32 batch-mates' steps into bf16 ones.
            groups: dict[tuple, list[tuple[Any, Future]]] = {}
            for item in self._active:
                groups.setdefault(_group_key(item[0]), []).append(item)
            for items in groups.values():
                runs = [r for r, _ in items]
                before = [r.iteration for r in runs]
                started = time.perf_counter()
                try:
                    if self.reproducible and isinstance(runs[0], MaskOptimisation):
                        w = self.layout_width
                        lanes: dict[int, tuple[list, list[int]]] = {}
                        for r in runs:
                            slot = self._slots[id(r)]
                            chunk = lanes.setdefault(slot // w, ([], []))
                            chunk[0].append(r)
                            chunk[1].append(slot % w)
                        for _, (chunk_runs, chunk_slots) in sorted(lanes.items()):
                            _step_group(self.classifier, chunk_runs, width=w, slots=chunk_slots)
                    else:
                        _step_group(self.classifier, runs)
                except Exception as exc:  # e.g. out of memory: fail this group, keep serving
                    log.exception("batched step failed for %d job(s)", len(runs))
                    for run, future in items:
                        run.cancelled = True
                        future.set_exception(exc)
                    self._active = [a for a in self._active if a not in items]
                    for run in runs:
                        self._slots.pop(id(run), None)
                    continue
                self.steps += 1
                self.mask_iterations += len(runs)
                self.busy_s += time.perf_counter() - started
                self.max_seen_batch = max(self.max_seen_batch, len(runs))
                if self.on_batch is not None:
                    self._report_batch(runs, before)
            self._retire()
        error = RuntimeError("the batch engine stopped before the job finished")
        for _, future in self._active:
            if not future.done():
                future.set_exception(error)
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(error)
        while self._calls:
            _, future = self._calls.popleft()
            if not future.done():
                future.set_exception(error)
        self._active = []
