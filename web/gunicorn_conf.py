"""gunicorn settings of the web front end.

Used by ``ebb web``, ``Dockerfile.web`` and the compose file as
``gunicorn -c python:web.gunicorn_conf web.wsgi:app``; command-line flags
(``--bind``, ``--workers``) override what is set here.
"""

from __future__ import annotations

import os

bind = os.environ.get("EBB_WEB_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("EBB_WEB_WORKERS", "4") or 4)
accesslog = "-"
