"""Throughput and latency of the job-status API (``GET /api/v1/jobs/<id>``)
under load, while jobs are being processed.

What runs (all real, on this machine):

* a fresh PostgreSQL database (created, then dropped), a temporary
  ``DATA_DIR``, Redis database 8 with a queue prefix unique to the run (its
  keys are deleted at the end);
* the web app under gunicorn as deployed (``Dockerfile.web``: 4 sync
  workers, access log on), with API tokens on, so every request pays for the
  token check;
* two ``ebb worker`` processes (``efficientnet_lite0`` on the CPU);
* ``--jobs`` jobs submitted through the API before the measurement; they are
  queued, running or finished while the load runs, so the status reads hit
  every kind of job (a queued job's answer includes its queue position, one
  more query);
* the load generator, `wrk <https://github.com/wg/wrk>`_: ``--connections``
  connections on 2 threads for ``--duration`` seconds, each request the
  status of the next job id from the list (a Lua script), with
  ``Authorization: Bearer``.

wrk is a Debian package (``apt-get install -y wrk``); it is not needed by the
tests nor by CI (benchmarks are not run there).

Usage:
    python benchmarks/load_status_api.py [--jobs 300] [--iterations 20]
        [--duration 30] [--connections 32] [--web-workers 4]

Prints the setup, the exact wrk command, requests/s, p50/p90/p99 latency,
the non-2xx count and how many jobs the workers finished during the run.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_ADMIN_URL = os.environ.get("EBB_TEST_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = "redis://127.0.0.1:6379/8"
MODEL = "efficientnet_lite0"
TOKEN = "bench-" + uuid.uuid4().hex

LUA = r"""
local ids = {}
for line in io.lines("%(ids)s") do ids[#ids + 1] = line end
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/api/v1/jobs/" .. ids[(n %% #ids) + 1])
end
done = function(summary, latency, requests)
  io.write(string.format(
    "RESULT requests=%%d duration_us=%%d non2xx=%%d socket_errors=%%d " ..
    "p50_us=%%d p90_us=%%d p99_us=%%d max_us=%%d\n",
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(index: int) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (96, 72), ((index * 37) % 256, (index * 11) % 256, 90))
    for x in range(0, 96, 6):
        img.putpixel((x, (x + index) % 72), (255, 255, 255))
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def stop(proc: subprocess.Popen) -> None:
    try:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out waiting for {what}")


def status_counts(database_url: str) -> dict[str, int]:
    from sqlalchemy import func, select

    from shared.db.models import Job
    from shared.db.session import session_scope

    with session_scope(database_url) as session:
        rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {status: int(count) for status, count in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300, help="jobs submitted before the run")
    parser.add_argument("--iterations", type=int, default=20,
                        help="iterations per job (keeps the workers busy during the run)")
    parser.add_argument("--duration", type=int, default=30, help="seconds of load")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--web-workers", type=int, default=4, help="gunicorn workers")
    args = parser.parse_args()

    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    import redis
    import requests
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from shared.db.migrations import upgrade_database

    prefix = f"ebbbench-{uuid.uuid4().hex[:8]}"
    db_name = f"ebb_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    database_url = make_url(PG_ADMIN_URL).set(database=db_name).render_as_string(
        hide_password=False)
    work = Path(tempfile.mkdtemp(prefix="ebb-bench-"))
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        upgrade_database(database_url)
        env = {
            **os.environ,
            "DATA_DIR": str(work / "data"), "DATABASE_URL": database_url,
            "REDIS_URL": REDIS_URL, "EBB_MODEL": MODEL, "EBB_MODELS": MODEL,
            "EBB_QUEUE_PREFIX": prefix, "EBB_SECRET_KEY": "bench", "EBB_API_TOKENS": TOKEN,
            "EBB_RATE_LIMIT": "off", "EBB_MAX_QUEUED_PER_OWNER": "1000000", "EBB_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": "",
            "EBB_MAX_BATCH": "4", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        }
        for i in (1, 2):
            (work / f"cwd{i}").mkdir()
            log = open(work / f"worker{i}.log", "wb")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "worker", "--hostname",
                 f"bench{i}-{prefix}@%h"],
                env=env, cwd=work / f"cwd{i}", stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        web_log = open(work / "gunicorn.log", "wb")
        logs.append(web_log)
        gunicorn_cmd = [str(Path(sys.executable).with_name("gunicorn")), "--bind",
                        f"127.0.0.1:{port}", "--workers", str(args.web_workers),
                        "--access-logfile", "-", "web.wsgi:app"]
        procs.append(subprocess.Popen(gunicorn_cmd, env=env, cwd=ROOT, stdout=web_log,
                                      stderr=subprocess.STDOUT, start_new_session=True))

        def web_ready():
            try:
                return requests.get(f"{base}/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(web_ready, 90, "gunicorn")
        for i in (1, 2):
            wait_for(lambda: " ready." in (work / f"worker{i}.log").read_text(errors="replace"),
                     240, f"worker {i}")

        headers = {"Authorization": f"Bearer {TOKEN}"}
        form = {"iterations": str(args.iterations), "input_size": "64", "mask_size": "8"}
        images = [png(i) for i in range(20)]

        def submit(index: int) -> str:
            response = requests.post(f"{base}/api/v1/jobs", headers=headers, data=form,
                                     files={"image": ("b.png", images[index % 20], "image/png")},
                                     timeout=60)
            response.raise_for_status()
            return response.json()["id"]

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(submit, range(args.jobs)))
        ids_file = work / "ids.txt"
        ids_file.write_text("\n".join(ids) + "\n")
        script = work / "status.lua"
        script.write_text(LUA % {"ids": ids_file})

        before = status_counts(database_url)
        cmd = [wrk, "-t2", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
               "-H", "Authorization: Bearer <token>", "-s", str(script),
               f"{base}/api/v1/jobs/"]
        shown = shlex.join(cmd)
        cmd[cmd.index("Authorization: Bearer <token>")] = f"Authorization: Bearer {TOKEN}"
        print(f"setup: {os.cpu_count()} CPUs, gunicorn {args.web_workers} sync workers, "
              f"2 ebb workers ({MODEL}, CPU, batch 4), PostgreSQL, {args.jobs} jobs of "
              f"{args.iterations} iterations at 64 px; status before the run: {before}")
        print(f"command: {shown}")
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60)
        after = status_counts(database_url)
        print(run.stdout)
        match = re.search(r"RESULT (.*)", run.stdout)
        if run.returncode != 0 or match is None:
            print(run.stderr)
            raise SystemExit("wrk failed")
        result = {k: int(v) for k, v in (kv.split("=") for kv in match.group(1).split())}
        rps = result["requests"] / (result["duration_us"] / 1e6)
        finished = sum(after.get(s, 0) for s in ("succeeded", "failed", "cancelled")) - sum(
            before.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
        print(f"requests/s: {rps:.0f}")
        print(f"latency: p50 {result['p50_us'] / 1000:.1f} ms, p90 "
              f"{result['p90_us'] / 1000:.1f} ms, p99 {result['p99_us'] / 1000:.1f} ms, "
              f"max {result['max_us'] / 1000:.1f} ms")
        print(f"non-2xx: {result['non2xx']}, socket errors: {result['socket_errors']}")
        print(f"jobs finished by the workers during the run: {finished}; status after: {after}")
        return 0 if result["non2xx"] == 0 else 1
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            stop(proc)
        for log in logs:
            log.close()
        from shared.db.session import dispose_engines

        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        admin.dispose()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"*{prefix}*"))
        if keys:
            client.delete(*keys)
        mine = [tag for tag, payload in client.hscan_iter("unacked") if prefix.encode() in payload]
        if mine:  # kombu's shared hash of delivered, unacknowledged messages
            client.hdel("unacked", *mine)
            client.zrem("unacked_index", *mine)
        client.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
