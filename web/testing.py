"""Helpers for testing the web app against real services (no mocks).

Used by ``tests/unit/test_web_*.py`` and ``tests/e2e``: building the
environment of an app on a temporary data folder, making image files, and
reading the messages a job submission put on a Redis queue.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
#: A port nothing listens on, to simulate "Redis is down".
DEAD_REDIS_URL = "redis://127.0.0.1:6390/0"
TEST_MODELS = ("efficientnet_lite0", "vgg19")


def app_env(data_dir: Path, redis_db: int, **overrides: str) -> dict[str, str]:
    """Environment variables of a test app: SQLite + uploads under ``data_dir``."""
    env = {
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": f"sqlite:///{data_dir / 'ebb.sqlite3'}",
        "REDIS_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}",
        "EBB_MODEL": TEST_MODELS[0],
        "EBB_MODELS": ",".join(TEST_MODELS),
        "EBB_MAX_UPLOAD_MB": "2",
        "EBB_SECRET_KEY": "test-secret-key",
        # Rate limiting stays on (counters in Redis under <EBB_QUEUE_PREFIX>-ratelimit)
        # but far above what a test submits; tests of the limit set a small one.
        "EBB_RATE_LIMIT": "1000/minute",
    }
    env.update(overrides)
    return env


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48), color=(200, 60, 30)) -> bytes:
    """A small real image file encoded with Pillow."""
    from PIL import Image

    img = Image.new("RGB", size, color)
    # Some structure so that JPEG/PNG are not trivially tiny.
    for x in range(0, size[0], 4):
        for y in range(0, size[1], 4):
            img.putpixel((x, y), ((x * 7) % 256, (y * 5) % 256, 128))
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


def queue_messages(redis_url: str, queue: str) -> list[dict[str, Any]]:
    """The Celery messages waiting on ``queue`` (oldest first), decoded.

    Each is ``{"task", "id", "args", "kwargs", "routing_key", "raw", "bytes"}``
    (``raw``: the decoded envelope; ``bytes``: the list item as stored).
    """
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    out = []
    for item in reversed(raw):  # kombu LPUSHes; the consumer BRPOPs
        message = json.loads(item)
        body = json.loads(base64.b64decode(message["body"]))
        out.append({
            "task": message["headers"]["task"],
            "id": message["headers"]["id"],
            "args": body[0],
            "kwargs": body[1],
            "routing_key": message["properties"]["delivery_info"]["routing_key"],
            "raw": message,
            "bytes": item,
        })
    return out


def redis_available(url: str) -> str | None:
    """None when Redis at ``url`` answers PING, else the reason."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        client.ping()
        client.close()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def delete_keys(url: str, needle: str) -> None:
    """Delete the keys of ``url`` whose name contains ``needle`` (e.g. a queue prefix)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"*{needle}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


class TestApps:
    """Flask apps for one test module: its own Redis DB and queue prefix.

    Wraps the fixture plumbing the web test modules share: skip without Redis,
    delete the module's keys afterwards, build apps from :func:`app_env`, and
    dispose of their database engines after each test.
    """

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, redis_db: int, prefix: str):
        self.redis_db = redis_db
        self.redis_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"
        self.prefix = prefix
        self._apps: list = []

    def redis_scope(self):
        """Body of a module-scoped fixture: skip without Redis, clean up after."""
        import pytest

        problem = redis_available(self.redis_url)
        if problem:
            pytest.skip(f"Redis not reachable at {self.redis_url}: {problem}")
        yield
        delete_keys(self.redis_url, self.prefix)

    def make(self, tmp_path: Path, monkeypatch, *, clear: tuple[str, ...] = (), reset: bool = True,
             **env: str):
        """A test app on this module's Redis DB and prefix; ``clear`` unsets env variables."""
        from web import create_app

        monkeypatch.setenv("EBB_QUEUE_PREFIX", self.prefix)
        for name in clear:
            monkeypatch.delenv(name, raising=False)
        for key, value in app_env(tmp_path / "data", self.redis_db, **env).items():
            monkeypatch.setenv(key, value)
        if reset:
            delete_keys(self.redis_url, self.prefix)
        app = create_app({"TESTING": True})
        self._apps.append(app)
        return app

    def dispose(self) -> None:
        """Close every app's database connections (engines are cached per URL)."""
        while self._apps:
            self._apps.pop().extensions["ebb"].session_factory.kw["bind"].dispose()
