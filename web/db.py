"""One SQLAlchemy session per request, closed in teardown."""

from __future__ import annotations

from flask import Flask, current_app, g
from sqlalchemy.orm import Session


def state():
    """The :class:`web.WebState` of the current application."""
    return current_app.extensions["ebb"]


def get_db() -> Session:
    """The request's session (created on first use)."""
    if "db" not in g:
        g.db = state().session_factory()
    return g.db


def close_db(exc: BaseException | None = None) -> None:
    db = g.pop("db", None)
    if db is not None:
        try:
            if exc is not None:
                db.rollback()
        finally:
            db.close()


def init_app(app: Flask) -> None:
    app.teardown_appcontext(close_db)
