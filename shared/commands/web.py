"""``ebb web``: the production web server (gunicorn running ``web.wsgi:app``).

The process replaces itself with
``python -m gunicorn -c python:web.gunicorn_conf [--bind H:P] [--workers N] web.wsgi:app``.
A flag not given is not passed, so :mod:`web.gunicorn_conf` decides:
``EBB_WEB_BIND`` (default ``0.0.0.0:8000``) and ``EBB_WEB_WORKERS``
(default 4). The app migrates the database when it starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

#: The gunicorn configuration module and the WSGI application it serves.
GUNICORN_CONFIG = "python:web.gunicorn_conf"
WSGI_APP = "web.wsgi:app"
DEFAULT_BIND = "0.0.0.0:8000"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ebb web`` to the ``ebb`` parser."""
    p = subparsers.add_parser(
        "web",
        help="run the production web server (gunicorn)",
        description=("Serve the web app and the API with gunicorn (config web/gunicorn_conf.py). "
                     "Defaults come from EBB_WEB_BIND (0.0.0.0:8000) and EBB_WEB_WORKERS (4)."),
    )
    p.add_argument("--host", default=None, help="address to listen on (default: EBB_WEB_BIND's, else 0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help="port (default: EBB_WEB_BIND's, else 8000)")
    p.add_argument("--workers", type=int, default=None,
                   help="gunicorn worker processes (default: EBB_WEB_WORKERS, else 4)")
    p.set_defaults(func=run)


def bind_address(host: str | None, port: int | None, environ: dict[str, str] | None = None) -> str | None:
    """``host:port`` for ``--bind``, the missing half taken from ``EBB_WEB_BIND``
    (else ``0.0.0.0:8000``); None when neither is given (gunicorn_conf decides)."""
    if host is None and port is None:
        return None
    env = os.environ if environ is None else environ
    default_host, _, default_port = (env.get("EBB_WEB_BIND") or DEFAULT_BIND).rpartition(":")
    if host is None:
        host = default_host or "0.0.0.0"
    if port is None:
        port = int(default_port) if default_port.isdigit() else 8000
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return f"{host}:{port}"


def gunicorn_argv(host: str | None = None, port: int | None = None, workers: int | None = None,
                  environ: dict[str, str] | None = None) -> list[str]:
    """The command ``ebb web`` runs (``sys.executable -m gunicorn ...``)."""
    argv = [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONFIG]
    bind = bind_address(host, port, environ)
    if bind is not None:
        argv += ["--bind", bind]
    if workers is not None:
        argv += ["--workers", str(workers)]
    return argv + [WSGI_APP]


def run(args: argparse.Namespace) -> int:
    """Handle ``ebb web``: check the arguments, then exec gunicorn (never returns on success)."""
    if args.port is not None and not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if importlib.util.find_spec("gunicorn") is None:
        raise RuntimeError("gunicorn is not installed: pip install -r requirements-web.txt")
    argv = gunicorn_argv(args.host, args.port, args.workers)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 0  # pragma: no cover - execv does not return
