"""Service overhead: one job end to end against a bare ``explain()`` call, and start latency.

Starts the real service once (``benchmarks/_service.py``: gunicorn web app, one
``ebb worker`` on the CPU, real Redis with a unique queue prefix, a fresh
SQLite or PostgreSQL database, a temporary DATA_DIR), then in the same run:

1. **Overhead ratio.** ``--repeats`` times, interleaved: the bare call
   ``explain(model, pixels, target, config)`` in this process (same weights
   and memory format, same torch thread count as the worker, same image,
   target, iterations and seed, on a side thread as in the worker), then the same job through the service: ``POST /api/v1/jobs`` →
   database row → Redis → worker (claim, decode, optimise, artifacts, final
   write). End to end is measured from just before the POST is sent to the
   job's ``finished_at`` (written by the worker after the artifacts are on
   disk). Ratio = end to end / bare, median over the pairs. On a busy shared
   machine the two timings of a pair differ by more than the service adds, so
   the script also reports the service time alone (end to end minus the
   worker's own ``explain`` time, ``timings.seconds``: web, queue, claim,
   decode, artifacts, final write) and ``1 + service time / bare``.
2. **Start latency.** ``--latency-jobs`` short jobs, one at a time, each to an
   idle worker: the time from sending the POST to the start of the job's first
   optimisation step = (``created_at`` - send time) + ``timings.first_step_s``
   (recorded by the worker: ``created_at`` → first step), with its parts
   (web request, broker queue and claim, decode, batch-engine wait, setup:
   resize + blur + scoring the clean image).

Usage:
    python benchmarks/overhead.py [--model efficientnet_lite0] [--iterations 100]
        [--repeats 5] [--latency-jobs 20] [--threads 2] [--database sqlite]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _service import ROOT, Service, example_images, in_thread, load_local_model, parse_time  # noqa: E402

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="bare / end-to-end pairs")
    parser.add_argument("--latency-jobs", type=int, default=20)
    parser.add_argument("--latency-iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=4, help="the worker's EBB_MAX_BATCH")
    parser.add_argument("--database", default="sqlite", choices=("sqlite", "postgresql"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()

    import torch

    from shared.attribution.config import PerturbationConfig
    from shared.attribution.perturbation import explain
    from shared.imaging.decode import decode_image

    torch.set_num_threads(max(1, args.threads))
    name, data = example_images()[0]
    pixels = decode_image(data).pixels
    classifier = load_local_model(args.model)
    from worker.engine import wants_channels_last

    layout = "channels_last" if wants_channels_last(classifier) else "contiguous"
    if layout == "channels_last":  # the model as the worker's batch engine sets it up
        classifier.module.to(memory_format=torch.channels_last)
    config = PerturbationConfig(iterations=args.iterations, seed=args.seed)
    target = in_thread(explain, classifier, pixels, None, config.replace(iterations=1)).target  # warms up
    print(f"model {args.model}, image {name}, target {target}, {args.iterations} iterations, seed {args.seed}; "
          f"threads {args.threads} and {layout} weights (bare and worker), worker EBB_MAX_BATCH {args.batch}, database "
          f"{args.database}; load average at start {' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)

    service = Service(args.model, max_batch=args.batch, threads=args.threads, database=args.database,
                      name="overhead")
    pairs: list[dict[str, float]] = []
    latency: list[dict[str, float]] = []
    started = time.monotonic()
    try:
        service.start().wait_ready()
        for i in range(2):  # warm-up: first-call costs of the worker
            job_id, _ = service.submit((name, data), target=target, iterations=2, seed=i)
            service.wait([job_id], interval=0.05)
        print(f"service ready and warm after {time.monotonic() - started:.0f} s", flush=True)

        # 2. start latency: one job at a time, idle worker.
        for i in range(args.latency_jobs):
            time.sleep(0.3)  # let the worker go idle (its last writes, the poll)
            job_id, sent = service.submit((name, data), target=target, iterations=args.latency_iterations, seed=i)
            job = service.wait([job_id], interval=0.05)[job_id]
            t = job["timings"]
            created = parse_time(job["created_at"])
            web = created - sent
            latency.append({
                "web_s": web,
                "queued_s": t["queued_s"],
                "queue_wait_s": t["queue_wait_s"],
                "setup_s": t["setup_s"],
                "first_step_s": t["first_step_s"],
                "send_to_first_step_s": web + t["first_step_s"],
                # claim -> engine: decode, config, hand-over, then the engine wait
                "claim_to_run_s": t["first_step_s"] - t["queued_s"] - t["to_first_step_s"],
                "to_first_step_s": t["to_first_step_s"],
            })
        print("latency jobs done", flush=True)

        # 1. overhead ratio: bare vs end to end, interleaved.
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            bare = in_thread(explain, classifier, pixels, target, config)  # a side thread, as the worker
            bare_s = time.perf_counter() - t0
            time.sleep(0.3)
            job_id, sent = service.submit((name, data), target=target, iterations=args.iterations, seed=args.seed)
            job = service.wait([job_id], interval=0.1)[job_id]
            e2e = parse_time(job["finished_at"]) - sent
            t = job["timings"]
            pairs.append({"bare_s": bare_s, "e2e_s": e2e, "ratio": e2e / bare_s,
                          # what the service adds around the optimisation the worker ran
                          "service_s": e2e - t["seconds"], "ratio_fixed": 1 + (e2e - t["seconds"]) / bare_s,
                          "worker_total_s": t["total_s"], "optimise_s": t["seconds"], "save_s": t["save_s"],
                          "first_step_s": t["first_step_s"] + parse_time(job["created_at"]) - sent,
                          "score_bare": bare.score_after, "score_e2e": job["scores"]["after"]})
            print(f"pair {rep + 1}: bare {bare_s:.2f} s, end to end {e2e:.2f} s, ratio {e2e / bare_s:.3f}", flush=True)
    finally:
        service.stop()

    print(f"\ntotal {time.monotonic() - started:.0f} s; load average at end "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}\n")
    print(f"### Overhead: one {args.model} job, {args.iterations} iterations ({args.repeats} interleaved pairs)\n")
    print("| measure | median | min | max |")
    print("|---|---|---|---|")
    rows = [("bare explain() (s)", "bare_s"), ("end to end: POST sent → finished_at (s)", "e2e_s"),
            ("ratio end to end / bare", "ratio"),
            ("service time: end to end − the worker's explain time (s)", "service_s"),
            ("ratio 1 + service time / bare (compute noise removed)", "ratio_fixed"),
            ("worker: job total (claim→saved) (s)", "worker_total_s"),
            ("worker: optimisation (s)", "optimise_s"), ("worker: artifacts (save_s) (s)", "save_s"),
            ("POST sent → first step (s)", "first_step_s")]
    for label, key in rows:
        v = [p[key] for p in pairs]
        print(f"| {label} | {statistics.median(v):.3f} | {min(v):.3f} | {max(v):.3f} |")
    d = max(abs(p["score_bare"] - p["score_e2e"]) for p in pairs)
    print(f"\nsame job, same result: max |score_after(bare) - score_after(service)| = {d:.2e}")

    print(f"\n### Start latency: POST sent → first optimisation step, idle worker ({len(latency)} jobs, "
          f"{args.latency_iterations} iterations each)\n")
    print("| part | p50 (ms) | p90 (ms) | max (ms) |")
    print("|---|---|---|---|")
    parts = [("total: POST sent → first step", "send_to_first_step_s"),
             ("web: POST sent → row created (request, decode check, upload, insert)", "web_s"),
             ("created → claimed by the worker (enqueue, Redis, Celery, claim)", "queued_s"),
             ("claimed → run created (decode, hand-over to the batch engine)", "claim_to_run_s"),
             ("  of which batch-engine wait", "queue_wait_s"),
             ("run created → first step (resize, blur, score clean image)", "to_first_step_s"),
             ("  of which setup_s", "setup_s")]
    for label, key in parts:
        v = [x[key] * 1000 for x in latency]
        print(f"| {label} | {pct(v, 0.5):.0f} | {pct(v, 0.9):.0f} | {max(v):.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "pairs": pairs, "latency": latency}, indent=1))


if __name__ == "__main__":
    main()
