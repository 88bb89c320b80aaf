"""The cost of honest live numbers: the noise-free live score and the live preview.

Runs Meaningful Perturbation jobs through the worker's real job body
(``worker.jobs.run_job``: SQLite database, storage, progress writes) on the
offline pretrained ``efficientnet_lite0``, with the live score and the live
preview each on or off, variants alternated over ``--repeats`` rounds, and
prints per variant the median optimisation time of a job and its ratio to
the variant with neither; then, from the jobs' own timings, the share of the
optimisation spent computing live scores (``live_score_s``) and writing
previews (``preview_s``), which is the cost without the shared machine's
noise.

Usage:
    python benchmarks/live_cost.py [--iterations 150] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import uuid
from pathlib import Path

import torch
from _local import IMAGES, add_machine_options, apply_machine_options, worker_model

VARIANTS = ("neither", "live score", "preview", "both (default)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    add_machine_options(parser)
    args = parser.parse_args()
    apply_machine_options(args)
    from shared import settings as settings_mod
    from shared.attribution.config import PerturbationConfig
    from shared.db.migrations import upgrade_database
    from shared.db.models import Job, utcnow
    from shared.db.session import session_scope
    from shared.storage import Storage
    from worker import jobs
    from worker.runtime import Runtime

    classifier = worker_model("efficientnet_lite0", args.device)
    tmp = Path(tempfile.mkdtemp(prefix="ebb-live-cost-"))
    url = f"sqlite:///{tmp / 'jobs.sqlite3'}"
    upgrade_database(url)
    settings = settings_mod.load({"DATA_DIR": str(tmp / "data"), "DATABASE_URL": url,
                                  "EBB_MODEL": "efficientnet_lite0", "EBB_GRADCAM": "0"})
    runtime = Runtime(model_name="efficientnet_lite0", classifier=classifier, device=args.device,
                      settings=settings, storage=Storage(settings.data_dir), hostname="bench@local")
    image = (IMAGES / "flute.jpg").read_bytes()
    sha = runtime.storage.save_upload(image)
    config = PerturbationConfig(iterations=args.iterations)
    defaults = (jobs.LIVE_SCORE_INTERVAL_S, jobs.PREVIEW_INTERVAL_S)
    print(f"efficientnet_lite0 on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"flute.jpg, {args.iterations} iterations per job, {args.repeats} rounds")

    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    shares: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for round_ in range(args.repeats):
        order = VARIANTS if round_ % 2 == 0 else tuple(reversed(VARIANTS))
        for name in order:
            live = name in ("live score", "both (default)")
            preview = name in ("preview", "both (default)")
            jobs.LIVE_SCORE_INTERVAL_S = defaults[0] if live else float("inf")
            jobs.PREVIEW_INTERVAL_S = defaults[1] if preview else 0.0
            job_id = uuid.uuid4()
            with session_scope(url) as s:
                s.add(Job(id=job_id, status="queued", model="efficientnet_lite0", config=config.to_dict(),
                          image_sha256=sha, image_width=1, image_height=1, image_filename="flute.jpg",
                          progress_iteration=0, progress_total=config.iterations, created_at=utcnow()))
            assert jobs.run_job(job_id, runtime) == "succeeded"
            with session_scope(url) as s:
                timings = s.get(Job, job_id).timings
            optimise = float(timings["optimise_s"])
            seconds[name].append(optimise)
            shares[name].append((float(timings.get("live_score_s", 0.0)) / optimise,
                                 float(timings.get("preview_s", 0.0)) / optimise))
            print(f"  round {round_ + 1} {name:15s}: optimisation {optimise:6.2f} s, live score "
                  f"{timings.get('live_score_s', 0.0) * 1000:6.1f} ms, previews "
                  f"{timings.get('preview_s', 0.0) * 1000:6.1f} ms", flush=True)
    jobs.LIVE_SCORE_INTERVAL_S, jobs.PREVIEW_INTERVAL_S = defaults
    base = statistics.median(seconds["neither"])
    print()
    print("| variant | optimisation s (median) | vs neither | live score share | preview share |")
    print("|---|---|---|---|---|")
    for name in VARIANTS:
        med = statistics.median(seconds[name])
        live_share = statistics.median(a for a, _ in shares[name])
        preview_share = statistics.median(b for _, b in shares[name])
        print(f"| {name} | {med:.2f} | {med / base:.3f}× | {live_share:.2%} | {preview_share:.2%} |")


if __name__ == "__main__":
    main()
