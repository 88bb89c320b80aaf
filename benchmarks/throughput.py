"""End-to-end throughput: N jobs through the real API to ONE real worker, batching off vs on.

Starts, in this run, two copies of the service (``benchmarks/_service.py``:
gunicorn web app, one ``ebb worker`` on the CPU, real Redis with a unique
queue prefix, a fresh SQLite or PostgreSQL database, a temporary DATA_DIR):

* ``off``: the worker with ``EBB_MAX_BATCH=1`` (one job at a time: the baseline);
* ``on``: the worker with ``EBB_MAX_BATCH=--batch`` (4 on a CPU): up to that many
  jobs share each forward/backward step (continuous batching).

Each round submits ``--jobs`` jobs (job ``i``: example image ``i % 2``, seed
``i``, the fp32 top-1 class of that image as target, ``--iterations``
iterations) for each variant, one variant after the other (the order rotates
per round so drift hits all alike), and measures jobs per minute from the
first POST to the last job's ``finished_at``. Variants:

* ``off/fp32`` -- the baseline;
* ``on/fp32``  -- batching alone;
* ``on/bf16``  -- batching + bf16 autocast (``precision=bf16`` in the request).

Faithfulness of the fast variants, job by job against the baseline run of the
same job (same image, seed and target): the largest difference of
``score_after`` (target probability on the final perturbation, as the worker
reports it: a bf16 job's is scored with a bf16 forward), of the same
probability re-evaluated here in fp32 from each job's saved mask (the mask's
effect alone), and, for the first ``--auc-jobs`` jobs, of the deletion /
insertion AUCs of the masks (``shared.attribution.metrics.deletion_insertion``,
computed here in fp32 on the same weights), with their means.

Usage:
    python benchmarks/throughput.py --model vgg19 --jobs 4 --iterations 30 --repeats 2
    python benchmarks/throughput.py --model efficientnet_lite0 --jobs 12 --iterations 30 --repeats 3 \
        --auc-jobs 12
    # A/B of a worker setting, e.g. without channels_last:
    python benchmarks/throughput.py ... --worker-env EBB_CHANNELS_LAST=0

``vgg19`` runs with random weights (``torchvision.models.vgg19(weights=None)``,
seed 0, saved once and passed to the worker as ``EBB_WEIGHTS_FILE``).
Prints markdown tables; ``--json`` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _service import ROOT, Service, example_images, in_thread, load_local_model, parse_time  # noqa: E402

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = [("off/fp32", "off", "fp32"), ("on/fp32", "on", "fp32"), ("on/bf16", "on", "bf16")]
BASELINE = "off/fp32"


def targets_for(classifier, images) -> list[int]:
    """The fp32 top-1 class of each example image (as the worker would pick it)."""
    import torch

    from shared.attribution.perturbation import _probabilities, prepare_image
    from shared.imaging.decode import decode_image

    out = []
    with torch.no_grad():
        for _, data in images:
            x = prepare_image(decode_image(data).pixels, classifier.input_size)
            out.append(int(_probabilities(classifier, classifier.normalise(x), "fp32")[0].argmax()))
    return out


def run_batch(service: Service, images, targets, n: int, iterations: int, precision: str) -> dict[str, Any]:
    """Submit ``n`` jobs at once, wait for all; returns timing and per-job results."""
    sent_at, ids = [], []
    for i in range(n):
        job_id, sent = service.submit(images[i % len(images)], target=targets[i % len(images)],
                                      iterations=iterations, seed=i, precision=precision)
        ids.append(job_id)
        sent_at.append(sent)
    jobs = service.wait(ids, interval=0.2)
    finished = max(parse_time(jobs[j]["finished_at"]) for j in ids)
    wall = finished - min(sent_at)
    return {
        "wall_s": wall,
        "jobs_per_min": 60.0 * n / wall,
        "ids": ids,
        "score_after": [jobs[j]["scores"]["after"] for j in ids],
        "worker_seconds": [jobs[j]["timings"].get("seconds") for j in ids],
        "timings": [jobs[j]["timings"] for j in ids],
    }


def saliency_of(mask, size: int):
    """``1 - upsample(mask)``: the deletion game's saliency at the input size."""
    import torch

    from shared.attribution.perturbation import upsample_mask

    m = torch.from_numpy(mask)[None, None].float()
    return 1.0 - upsample_mask(m, size)[0, 0].numpy()


def fp32_scores(classifier, images, targets, service: Service, ids: list[str]) -> list[float]:
    """Each job's target probability on its final perturbation (its saved mask, no
    noise), re-evaluated here with the fp32 model: the mask's effect alone,
    without the bf16 forward the worker used for ``score_after`` of bf16 jobs."""
    import torch

    from shared.attribution.perturbation import _probabilities, blend, perturbation_baseline, prepare_image, \
        upsample_mask
    from shared.imaging.decode import decode_image

    out = []
    with torch.no_grad():
        for i, job_id in enumerate(ids):
            x = prepare_image(decode_image(images[i % len(images)][1]).pixels, classifier.input_size)
            blurred = perturbation_baseline(x, "blur", "mean")
            m = upsample_mask(torch.from_numpy(service.mask(job_id))[None, None].float(), classifier.input_size)
            probs = _probabilities(classifier, blend(classifier.normalise(x), classifier.normalise(blurred), m), "fp32")
            out.append(float(probs[0, targets[i % len(images)]]))
    return out


def aucs(classifier, images, targets, service: Service, ids: list[str], count: int) -> list[tuple[float, float]]:
    from shared.attribution.metrics import deletion_insertion
    from shared.imaging.decode import decode_image

    out = []
    for i, job_id in enumerate(ids[:count]):
        pixels = decode_image(images[i % len(images)][1]).pixels
        scores = deletion_insertion(classifier, pixels, saliency_of(service.mask(job_id), classifier.input_size),
                                    targets[i % len(images)])
        out.append((scores.deletion_auc, scores.insertion_auc))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg19", help="vgg19 (random weights) or efficientnet_lite0")
    parser.add_argument("--jobs", type=int, default=4, help="jobs per variant per round")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1, help="rounds (variants interleaved)")
    parser.add_argument("--batch", type=int, default=4, help="EBB_MAX_BATCH of the 'on' worker")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the worker")
    parser.add_argument("--database", default="sqlite", choices=("sqlite", "postgresql"))
    parser.add_argument("--auc-jobs", type=int, default=2, help="jobs whose deletion/insertion AUCs are compared")
    parser.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment of both workers (A/B experiments, e.g. EBB_CHANNELS_LAST=0)")
    parser.add_argument("--json", help="write the raw results here")
    args = parser.parse_args()
    extra_env = dict(kv.split("=", 1) for kv in args.worker_env)

    import torch

    torch.set_num_threads(max(1, args.threads))
    images = example_images()
    classifier = load_local_model(args.model)
    targets = targets_for(classifier, images)
    print(f"model {args.model}, {args.jobs} jobs x {args.iterations} iterations per variant, {args.repeats} "
          f"round(s); worker threads {args.threads}, batch cap on={args.batch} off=1, database {args.database}; "
          f"images {[n for n, _ in images]}, targets {targets}; worker env {extra_env or '-'}; load average at start "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)

    services = {
        "off": Service(args.model, max_batch=1, threads=args.threads, database=args.database, name="off",
                       extra_env=extra_env),
        "on": Service(args.model, max_batch=args.batch, threads=args.threads, database=args.database, name="on",
                      extra_env=extra_env),
    }
    results: dict[str, list[dict[str, Any]]] = {v: [] for v, _, _ in VARIANTS}
    started = time.monotonic()
    try:
        for s in services.values():
            s.start()
        for s in services.values():
            s.wait_ready()
        # Warm-up (untimed): first-call costs of each worker and precision.
        for name, svc_key, precision in VARIANTS:
            run_batch(services[svc_key], images, targets, 1, 2, precision)
        print(f"services ready and warm after {time.monotonic() - started:.0f} s", flush=True)
        for rnd in range(args.repeats):
            order = VARIANTS[rnd % len(VARIANTS):] + VARIANTS[: rnd % len(VARIANTS)]
            for name, svc_key, precision in order:
                r = run_batch(services[svc_key], images, targets, args.jobs, args.iterations, precision)
                r["round"] = rnd
                results[name].append(r)
                print(f"round {rnd + 1} {name:9s} {r['jobs_per_min']:7.2f} jobs/min ({r['wall_s']:.1f} s)", flush=True)
        # Faithfulness, job by job against the baseline run of the same job:
        # score_after over every round; fp32 re-evaluation and AUCs on the last.
        base = results[BASELINE][-1]
        # (on side threads: see _service.in_thread)
        base_fp32 = in_thread(fp32_scores, classifier, images, targets, services["off"], base["ids"])
        base_auc = in_thread(aucs, classifier, images, targets, services["off"], base["ids"], args.auc_jobs)
        faith: dict[str, dict[str, Any]] = {BASELINE: {"aucs": base_auc}}
        for name, svc_key, _ in VARIANTS[1:]:
            diffs = [abs(a - b) for r, b0 in zip(results[name], results[BASELINE])
                     for a, b in zip(r["score_after"], b0["score_after"])]
            r = results[name][-1]
            evaluated = in_thread(fp32_scores, classifier, images, targets, services[svc_key], r["ids"])
            entry: dict[str, Any] = {
                "score_after": max(diffs), "score_after_median": statistics.median(diffs),
                "score_after_fp32_eval": max(abs(a - b) for a, b in zip(evaluated, base_fp32)),
            }
            if args.auc_jobs > 0:
                got = in_thread(aucs, classifier, images, targets, services[svc_key], r["ids"], args.auc_jobs)
                entry["deletion_auc"] = max(abs(a[0] - b[0]) for a, b in zip(got, base_auc))
                entry["insertion_auc"] = max(abs(a[1] - b[1]) for a, b in zip(got, base_auc))
                entry["aucs"] = got
            faith[name] = entry
    finally:
        for s in services.values():
            s.stop()

    load_end = " ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\ntotal {time.monotonic() - started:.0f} s; load average at end {load_end}\n")
    print(f"### Throughput, {args.model}, {args.iterations} iterations, {args.jobs} jobs per variant and round\n")
    print("| variant | EBB_MAX_BATCH | precision | jobs/min (median) | per round | vs off/fp32 (median of "
          "per-round ratios) |")
    print("|---|---|---|---|---|---|")
    for name, svc_key, precision in VARIANTS:
        per = [r["jobs_per_min"] for r in results[name]]
        ratios = [r["jobs_per_min"] / b["jobs_per_min"] for r, b in zip(results[name], results[BASELINE])]
        print(f"| {name} | {1 if svc_key == 'off' else args.batch} | {precision} | {statistics.median(per):.2f} | "
              f"{', '.join(f'{p:.2f}' for p in per)} | {statistics.median(ratios):.2f}x |")
    n_auc = len(base_auc)
    print(f"\n### Faithfulness against off/fp32, same job (image, seed, target)\n")
    print(f"score_after: {args.jobs} jobs x {args.repeats} round(s); fp32 re-evaluation and AUCs: the last round "
          f"({args.jobs} and {n_auc} jobs)\n")
    print("| variant | max \\|Δ score_after\\| (median) | max \\|Δ score_after\\|, masks re-evaluated in fp32 | "
          "max \\|Δ deletion AUC\\| | max \\|Δ insertion AUC\\| | mean deletion AUC (lower is better) | "
          "mean insertion AUC (higher is better) |")
    print("|---|---|---|---|---|---|---|")
    mean = lambda xs, k: statistics.fmean(x[k] for x in xs) if xs else float("nan")  # noqa: E731
    print(f"| off/fp32 | (reference) | (reference) | - | - | {mean(base_auc, 0):.4f} | {mean(base_auc, 1):.4f} |")
    for name, _, _ in VARIANTS[1:]:
        f = faith[name]
        got = f.get("aucs", [])
        d_auc = f"{f['deletion_auc']:.4f}" if "deletion_auc" in f else "-"
        i_auc = f"{f['insertion_auc']:.4f}" if "insertion_auc" in f else "-"
        print(f"| {name} | {f['score_after']:.4f} ({f['score_after_median']:.4f}) | "
              f"{f['score_after_fp32_eval']:.4f} | {d_auc} | {i_auc} | {mean(got, 0):.4f} | {mean(got, 1):.4f} |")
    print("\nworker-side medians per job (from the jobs' timings): optimisation wall (all its steps, "
          "shared with its batch-mates), per mask-iteration, artifacts (save_s), setup_s")
    for name, _, _ in VARIANTS:
        ts = [t for r in results[name] for t in r["timings"]]
        med = lambda key: statistics.median(float(t.get(key) or 0.0) for t in ts)  # noqa: E731
        print(f"  {name}: optimisation {med('seconds'):.2f} s, {1000 * med('seconds') / args.iterations:.0f} ms/iteration, "
              f"save_s {med('save_s'):.3f} s, setup_s {med('setup_s'):.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "faithfulness": faith,
                                               "targets": targets}, indent=1))


if __name__ == "__main__":
    main()
