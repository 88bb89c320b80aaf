"""WSGI entry point: ``gunicorn web.wsgi:app``.

Production never runs in debug mode, whatever ``FLASK_DEBUG`` says.
"""

from __future__ import annotations

import logging

from . import create_app

logging.basicConfig(
    level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
)

app = create_app()
app.debug = False
app.config["DEBUG"] = False
app.config["PROPAGATE_EXCEPTIONS"] = False
