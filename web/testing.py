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
    """Delete the keys of ``url`` whose name contains ``needle`` (e.g. a queue
    prefix), and the entries of kombu's shared ``unacked`` hash that mention it."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"*{needle}*"))
        if keys:
            client.delete(*keys)
        mine = [tag for tag, payload in client.hscan_iter("unacked") if needle.encode() in payload]
        if mine:
            client.hdel("unacked", *mine)
            client.zrem("unacked_index", *mine)
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

    def module_fixtures(self):
        """The two autouse fixtures every web test module needs; bind them at
        module level: ``_redis, _dispose_engines = APPS.module_fixtures()``.

        ``_redis`` (module scope) skips without Redis and deletes the module's
        keys afterwards; ``_dispose_engines`` closes each test's apps' database
        connections.
        """
        import pytest

        @pytest.fixture(scope="module", autouse=True)
        def _redis():
            problem = redis_available(self.redis_url)
            if problem:
                pytest.skip(f"Redis not reachable at {self.redis_url}: {problem}")
            yield
            delete_keys(self.redis_url, self.prefix)

        @pytest.fixture(autouse=True)
        def _dispose_engines():
            yield
            self.dispose()

        return _redis, _dispose_engines

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


# --------------------------------------------------------------------------- results


def sample_curves(steps: int = 28, start: float = 0.9, faithful: bool = True) -> dict[str, list]:
    """Deletion/insertion curves as the worker stores them: ``steps + 1`` points."""
    fraction = [i / steps for i in range(steps + 1)]
    fall = 8.0 if faithful else 3.0
    rise = 8.0 if faithful else 3.0
    import math

    deletion = [round(start * math.exp(-fall * f), 6) for f in fraction]
    insertion = [round(start * (1 - math.exp(-rise * f)) / (1 - math.exp(-rise)), 6)
                 for f in fraction]
    return {"fraction": fraction, "deletion": deletion, "insertion": insertion}


def _faithfulness(curves: dict[str, list], seconds: float) -> dict[str, Any]:
    def auc(xs, ys):
        return sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))

    return {
        "deletion_auc": round(auc(curves["fraction"], curves["deletion"]), 6),
        "insertion_auc": round(auc(curves["fraction"], curves["insertion"]), 6),
        "curves": curves,
        "seconds": seconds,
    }


def sample_result(index: int, label: str, *, method: str = "meaningful_perturbation",
                  before: float = 0.9, after: float = 0.02,
                  areas: tuple[float, ...] = (0.05, 0.1, 0.2)) -> dict[str, Any]:
    """One entry of ``Job.results`` in the layout the worker writes."""
    return {
        "target": {"index": index, "label": label},
        "method": method,
        "scores": {"before": before, "after": after},
        "top5": {
            "before": [{"index": index, "label": label, "prob": before},
                       {"index": (index + 1) % 1000, "label": "other", "prob": 0.05}],
            "after": [{"index": (index + 1) % 1000, "label": "other", "prob": 0.3},
                      {"index": index, "label": label, "prob": after}],
        },
        "metrics": _faithfulness(sample_curves(start=before, faithful=True), 0.4),
        "gradcam": _faithfulness(sample_curves(start=before, faithful=False), 0.1),
        "areas": ([{"area": a, "area_achieved": round(a * 1.02, 4),
                    "score_after": round(before * (0.3 + a), 4)} for a in areas]
                  if method == "extremal" else None),
    }


def write_result_files(job_dir: Path, k: int, *, extremal: bool = False,
                       gradcam: bool = True) -> dict[str, bytes]:
    """The artifact files of result ``k`` (``results/<k>/`` for k >= 1), as the
    worker writes them; returns file name -> bytes (each file's bytes differ)."""
    folder = Path(job_dir) if k == 0 else Path(job_dir) / "results" / str(k)
    folder.mkdir(parents=True, exist_ok=True)
    shade = (40 + 50 * k) % 256
    files = {
        "mask.npy": b"\x93NUMPY fake %d" % k,
        "mask.png": image_bytes("PNG", (16, 16), (shade, 10, 10)),
        "heatmap.png": image_bytes("PNG", (16, 16), (10, shade, 10)),
        "overlay.png": image_bytes("PNG", (16, 16), (10, 10, shade)),
        "perturbed.png": image_bytes("PNG", (16, 16), (shade, shade, 10)),
        "result.json": json.dumps({"k": k}).encode(),
    }
    files["saliency.npy"] = b"\x93NUMPY saliency %d" % k
    files["saliency.png"] = image_bytes("PNG", (16, 16), (shade, shade, shade))
    if gradcam:
        files["gradcam.npy"] = b"\x93NUMPY gradcam %d" % k
        files["gradcam.png"] = image_bytes("PNG", (16, 16), (shade, 10, shade))
    if extremal:
        files["areas.png"] = image_bytes("PNG", (48, 16), (10, shade, shade))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def openapi_to_jsonschema(node: Any) -> Any:
    """An OpenAPI 3.0 schema as plain JSON Schema (``nullable: true`` becomes
    ``anyOf [..., null]``), to validate responses with ``jsonschema``."""
    if isinstance(node, dict):
        node = {k: openapi_to_jsonschema(v) for k, v in node.items()}
        if node.pop("nullable", False):
            node = {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [openapi_to_jsonschema(v) for v in node]
    return node
