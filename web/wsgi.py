"""WSGI entry point: ``gunicorn web.wsgi:app``.

Production never runs in debug mode, whatever ``FLASK_DEBUG`` says.
"""

from __future__ import annotations

import logging

from shared.logs import configure_logging

from . import create_app

configure_logging(logging.INFO)  # EBB_LOG_FORMAT=json: one JSON object per line

app = create_app()
app.debug = False
app.config["DEBUG"] = False
app.config["PROPAGATE_EXCEPTIONS"] = False
