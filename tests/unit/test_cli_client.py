"""``ebb submit`` / ``ebb workers`` / ``ebb web`` argument handling and output
formatting, and the pure parts of :mod:`shared.client` (no server needed)."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from shared.cli import build_parser
from shared.client import ExplainClient, ExplainClientError, SUBMISSION_FIELDS, artifact_filename
from shared.commands import submit, web, workers


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


# --------------------------------------------------------------------------- ebb submit


def test_submit_sends_only_the_fields_given():
    args = parse("submit", "a.jpg", "b.png")
    assert args.images == [Path("a.jpg"), Path("b.png")]
    assert submit.submission_fields(args) == {}
    assert not args.wait and args.out == Path(submit.DEFAULT_OUT) and args.url is None and args.token is None


def test_submit_every_api_field_is_a_dash_named_flag():
    argv = ["submit", "x.jpg"]
    for flag, field, _ in submit.FIELD_FLAGS:
        assert flag == "--" + field.replace("_", "-")
        argv += [flag, f"v-{field}"]
    args = parse(*argv)
    assert submit.submission_fields(args) == {field: f"v-{field}" for _, field, _ in submit.FIELD_FLAGS}
    # ``force`` is the one boolean field: the flag ``--force`` sends force=1
    assert {field for _, field, _ in submit.FIELD_FLAGS} | {"force"} == set(SUBMISSION_FIELDS)
    assert "force" not in submit.submission_fields(args)
    assert submit.submission_fields(parse("submit", "x.jpg", "--force")) == {"force": "1"}


def test_submit_values_are_passed_through_for_the_server_to_validate():
    args = parse("submit", "x.jpg", "--iterations", "many", "--learning-rate", "0.05", "--targets", "flute, 683",
                 "--target", "558", "--wait", "--out", "results", "--url", "http://h:1", "--token", "t")
    assert submit.submission_fields(args) == {"iterations": "many", "learning_rate": "0.05",
                                              "targets": "flute, 683", "target": "558"}
    assert args.wait and args.out == Path("results") and args.url == "http://h:1" and args.token == "t"


def test_submit_needs_an_image():
    with pytest.raises(SystemExit) as exit_info:
        parse("submit")
    assert exit_info.value.code == 2


def test_collect_images_takes_files_and_sorted_folder_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.PNG", "a.jpg", "notes.txt", "c.webp"):
        (folder / name).write_bytes(b"x")
    (folder / "sub").mkdir()
    single = tmp_path / "z.gif"
    single.write_bytes(b"x")
    assert submit.collect_images([single, folder]) == [single, folder / "a.jpg", folder / "b.PNG", folder / "c.webp"]
    with pytest.raises(ValueError, match="no such file"):
        submit.collect_images([tmp_path / "missing.jpg"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        submit.collect_images([empty])


def test_output_names_are_stems_made_distinct():
    images = [Path("a/flute.jpg"), Path("b/flute.png"), Path("dog.jpg"), Path("c/flute.gif")]
    assert submit.output_names(images) == ["flute", "flute-2", "dog", "flute-3"]


def test_submit_missing_file_exits_2_before_sending(tmp_path, capsys):
    from shared.cli import main

    assert main(["submit", str(tmp_path / "nope.jpg"), "--url", "http://127.0.0.1:9"]) == 2
    assert "ebb submit: error: no such file or folder" in capsys.readouterr().err


def test_submit_unreachable_server_is_a_readable_error(tmp_path, capsys):
    from shared.cli import free_port, main

    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG")
    assert main(["submit", str(image), "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert "ebb submit: error: cannot reach http://127.0.0.1:" in err and "Traceback" not in err


# --------------------------------------------------------------------------- ebb workers


NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)
FLEET = [
    {"hostname": "vgg19.cuda0@gpu-box", "model": "vgg19", "device": "cuda:0", "precision": "bf16",
     "max_batch": 32, "running_jobs": 3, "jobs_done": 1204, "iterations_per_s": 412.53,
     "started_at": "2026-11-29T09:30:00+00:00", "last_seen": "2026-12-01T11:59:58Z", "version": "0.1.0"},
    {"hostname": "efficientnet_lite0.cpu@laptop", "model": "efficientnet_lite0", "device": "cpu",
     "precision": "fp32", "max_batch": 4, "running_jobs": 0, "jobs_done": 7, "iterations_per_s": 0.0,
     "started_at": "2026-12-01T11:55:55", "last_seen": "2026-12-01T11:59:30+00:00", "version": "0.1.0"},
]


def test_workers_table():
    lines = workers.format_workers_table(FLEET, now=NOW).splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["HOSTNAME", "MODEL", "DEVICE", "PRECISION", "BATCH", "RUNNING", "DONE",
                                "IT/S", "UP", "LAST", "SEEN", "VERSION"]
    # sorted by model: efficientnet_lite0 first
    assert lines[1].split() == ["efficientnet_lite0.cpu@laptop", "efficientnet_lite0", "cpu", "fp32", "4", "0",
                                "7", "0.0", "4m05s", "30s", "ago", "0.1.0"]
    assert lines[2].split() == ["vgg19.cuda0@gpu-box", "vgg19", "cuda:0", "bf16", "32", "3", "1204", "412.5",
                                "2d02h", "2s", "ago", "0.1.0"]
    # columns line up: every row's MODEL cell starts where the header's does
    start = lines[0].index("MODEL")
    assert lines[1][start:].startswith("efficientnet_lite0") and lines[2][start:].startswith("vgg19")
    # right-aligned numbers end where their header ends
    end = lines[0].index("DONE") + len("DONE")
    assert lines[2][:end].endswith("1204") and lines[1][:end].endswith("7")


def test_workers_table_empty_and_missing_values():
    assert workers.format_workers_table([]) == workers.EMPTY_FLEET
    row = workers.worker_row({"hostname": "w@h", "started_at": "garbage", "iterations_per_s": None}, NOW)
    assert row == ["w@h", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-"]


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.9, "59s"), (60, "1m00s"), (3599, "59m59s"),
                                           (3600, "1h00m"), (86399, "23h59m"), (90000, "1d01h"), (-5, "0s")])
def test_format_duration(seconds, text):
    assert workers.format_duration(seconds) == text


def test_workers_parses_url_and_token():
    args = parse("workers", "--url", "http://h:8000", "--token", "t")
    assert args.func is workers.run and args.url == "http://h:8000" and args.token == "t"


# --------------------------------------------------------------------------- ebb web


def test_web_command_line():
    args = parse("web", "--host", "127.0.0.1", "--port", "9000", "--workers", "3")
    assert web.gunicorn_argv(args.host, args.port, args.workers) == [
        sys.executable, "-m", "gunicorn", "-c", "python:web.gunicorn_conf",
        "--bind", "127.0.0.1:9000", "--workers", "3", "web.wsgi:app"]


def test_web_defaults_are_left_to_gunicorn_conf():
    args = parse("web")
    assert (args.host, args.port, args.workers) == (None, None, None)
    assert web.gunicorn_argv() == [sys.executable, "-m", "gunicorn", "-c", "python:web.gunicorn_conf",
                                   "web.wsgi:app"]


@pytest.mark.parametrize("host, port, env, bind", [
    (None, 9000, {}, "0.0.0.0:9000"),
    ("10.0.0.1", None, {}, "10.0.0.1:8000"),
    (None, 9000, {"EBB_WEB_BIND": "127.0.0.1:7000"}, "127.0.0.1:9000"),
    ("::1", None, {"EBB_WEB_BIND": "127.0.0.1:7000"}, "[::1]:7000"),
])
def test_web_bind_takes_the_missing_half_from_ebb_web_bind(host, port, env, bind):
    assert web.bind_address(host, port, env) == bind


def test_web_rejects_bad_numbers(capsys):
    from shared.cli import main

    assert main(["web", "--workers", "0"]) == 2
    assert "ebb web: error: --workers must be at least 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- the client's pure parts


def test_client_defaults_from_the_environment(monkeypatch):
    monkeypatch.setenv("EBB_URL", "http://example:8123/")
    monkeypatch.setenv("EBB_TOKEN", "secret")
    client = ExplainClient()
    assert client.url == "http://example:8123"
    assert client.session.headers["Authorization"] == "Bearer secret"
    monkeypatch.delenv("EBB_URL")
    monkeypatch.delenv("EBB_TOKEN")
    client = ExplainClient()
    assert client.url == "http://127.0.0.1:8000" and "Authorization" not in client.session.headers
    assert ExplainClient("http://h/prefix").absolute("/prefix/api/v1/jobs/1") == "http://h/prefix/api/v1/jobs/1"


def test_error_wording():
    error = ExplainClientError(400, "invalid_value", "iterations must be an integer", "iterations")
    assert str(error) == "iterations must be an integer (field: iterations)"
    assert str(ExplainClientError(404, "not_found", "job x not found")) == "job x not found"


def test_artifact_links_cover_every_result():
    assert artifact_filename("overlay_png") == "overlay.png"
    assert artifact_filename("result_json") == "result.json"
    job = {
        "artifacts": {"mask_npy": "/api/v1/jobs/j/artifacts/mask_npy", "areas_png": None},
        "results": [
            {"artifacts": {"mask_npy": "/api/v1/jobs/j/results/0/artifacts/mask_npy"}},
            {"artifacts": {"gradcam_png": "/api/v1/jobs/j/results/1/artifacts/gradcam_png", "areas_png": None}},
        ],
    }
    assert ExplainClient.artifact_links(job) == {
        "mask.npy": "/api/v1/jobs/j/artifacts/mask_npy",
        "results/1/gradcam.png": "/api/v1/jobs/j/results/1/artifacts/gradcam_png",
    }
    assert ExplainClient.artifact_links({"artifacts": {}, "results": []}) == {}


def test_submit_summary_lines():
    ok = {"status": "succeeded", "target": {"index": 558, "label": "flute"}, "scores": {"before": 0.977, "after": 0.4}}
    assert submit._summary_line("flute.jpg", ok) == "flute.jpg: succeeded, flute (558) score 0.977 -> 0.400"
    failed = {"status": "failed", "error": "the model ran out of memory"}
    assert submit._summary_line("x.png", failed) == "x.png: failed: the model ran out of memory"
    assert submit._summary_line("x.png", {"status": "cancelled", "error": None}) == "x.png: cancelled"


def test_submit_progress_bar_sums_every_jobs_iterations():
    def job(status, iteration, total):
        return {"status": status, "progress": {"iteration": iteration, "total": total}}

    bar = submit._Progress([job("queued", 0, 100), job("queued", 0, 200)], disable=True)
    assert bar.total == 300
    bar([job("running", 40, 100), job("queued", 0, 200)])
    assert bar.done == 40
    bar([job("failed", 50, 100), job("running", 20, 200)])  # a finished job counts in full
    assert bar.done == 120
    bar([job("failed", 50, 100), job("succeeded", 200, 200)])
    assert bar.done == bar.total == 300
    bar.close()
