"""``ebb submit IMAGE...``: send images to a running service (through :class:`shared.client.ExplainClient`).

* Every argument is an image file or a folder (its images, sorted by name,
  not recursive). All paths are checked before anything is sent.
* Only the submission fields given as flags are sent; the server's defaults
  apply to the others, and the server validates them: its errors are shown as
  it words them, ``ebb submit: error: <message> (field: <field>)``.
* A refused image (the server blames the ``image`` field: not an image, too
  large) is reported and the others are still sent; any other refusal (a bad
  option, a missing token, the server unreachable) would refuse every image
  alike, so submitting stops there (jobs already
  submitted keep running, and are waited for with ``--wait``). The rate
  limit (429) is waited out first, following its ``Retry-After``.
* Without ``--wait``: one line per job, ``IMAGE  ID  PAGE-URL``.
* With ``--wait``: one progress bar over all the jobs' iterations, then each
  succeeded job's artifacts are downloaded into ``DIR/<image stem>/``
  (``--out DIR``, default ``./ebb-out``; a repeated stem gets ``-2``, ``-3``)
  and a summary line per job is printed.

Exit status: 0 when every image was accepted (and, with ``--wait``, every
job succeeded and was downloaded); 1 when a job failed, was cancelled or did
not finish within ``--timeout``; 2 when a submission was refused or an
argument is wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

#: File suffixes taken from a folder argument.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
#: Default ``--out`` folder of ``--wait``.
DEFAULT_OUT = "ebb-out"
#: A submission refused by the rate limit (429) is retried after its
#: ``Retry-After`` this many times, when that is at most this many seconds.
RATE_LIMIT_RETRIES = 10
RATE_LIMIT_MAX_WAIT_S = 120.0

#: (flag, API field, help) of every submission field; the values are sent as
#: typed, so the server does all the validation and words all the errors.
FIELD_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--model", "model", "registry name of the model (default: the server's first model)"),
    ("--target", "target", "class INDEX or exact LABEL (default: the model's top-1)"),
    ("--targets", "targets", "several classes, comma-separated indices or labels (1-5)"),
    ("--top-k", "top_k", "explain the K most probable classes (1-5)"),
    ("--iterations", "iterations", "optimisation steps (server default 500)"),
    ("--learning-rate", "learning_rate", "Adam learning rate (default 0.1)"),
    ("--l1-coeff", "l1_coeff", "L1 weight (default 0.01)"),
    ("--tv-coeff", "tv_coeff", "total-variation weight (default 0.2)"),
    ("--tv-beta", "tv_beta", "total-variation exponent (default 3)"),
    ("--noise-std", "noise_std", "noise sigma added to the mask (default 0.2)"),
    ("--mask-size", "mask_size", "mask side in cells (default 28)"),
    ("--input-size", "input_size", "model input side in pixels (default 224)"),
    ("--seed", "seed", "noise seed (default 0)"),
    ("--blur", "blur", "mean | gaussian | median"),
    ("--game", "game", "deletion | preservation"),
    ("--perturbation", "perturbation", "blur | constant | noise"),
    ("--precision", "precision", "fp32 | bf16"),
    ("--method", "method", "meaningful_perturbation | extremal"),
    ("--areas", "areas", "extremal target areas, comma-separated fractions, e.g. 0.05,0.1,0.2"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ebb submit`` to the ``ebb`` parser."""
    p = subparsers.add_parser(
        "submit",
        help="submit images to a running service (optionally wait and download the results)",
        description=(
            "Submit IMAGE files (or every image in a folder) to the service at --url. "
            "Only the options given are sent; the server's defaults apply otherwise."
        ),
        epilog=("Exit status: 0 all accepted (and with --wait all succeeded and downloaded), "
                "1 a job failed, was cancelled or timed out, 2 a submission was refused."),
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files or folders of images")
    add_connection_arguments(p)
    fields = p.add_argument_group("submission fields (sent only when given; see the README's API section)")
    for flag, field, help_text in FIELD_FLAGS:
        fields.add_argument(flag, dest=field, default=None, metavar=field.upper(), help=help_text)
    p.add_argument("--force", action="store_true",
                   help="run the job even if an identical one already succeeded "
                        "(else it is answered at once from that job's artifacts)")
    p.add_argument("--wait", action="store_true",
                   help="wait for every job (one progress bar), then download their artifacts")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT),
                   help=f"with --wait: artifacts go to OUT/<image stem>/ (default ./{DEFAULT_OUT})")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between progress polls (default 1)")
    p.add_argument("--timeout", type=float, default=None,
                   help="with --wait: give up after this many seconds (default: no limit)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    """``--url`` and ``--token`` (defaults ``EBB_URL`` / ``EBB_TOKEN``, resolved by the client)."""
    p.add_argument("--url", default=None,
                   help="the service's base URL (default: EBB_URL, else http://127.0.0.1:8000)")
    p.add_argument("--token", default=None, help="API bearer token (default: EBB_TOKEN)")


def submission_fields(args: argparse.Namespace) -> dict[str, str]:
    """The API fields the user gave on the command line (and only those)."""
    fields = {field: getattr(args, field) for _, field, _ in FIELD_FLAGS if getattr(args, field, None) is not None}
    if getattr(args, "force", False):
        fields["force"] = "1"
    return fields


def collect_images(paths: list[Path]) -> list[Path]:
    """The image files named by ``paths``: files as given, folders' images sorted.

    Raises ``ValueError`` for a missing path or a folder without images.
    """
    images: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
            images.extend(found)
        elif path.is_file():
            images.append(path)
        else:
            raise ValueError(f"no such file or folder: {path}")
    return images


def output_names(images: list[Path]) -> list[str]:
    """One distinct folder name per image: its stem, then ``stem-2``, ``stem-3`` on repeats."""
    seen: dict[str, int] = {}
    names = []
    for image in images:
        stem = image.stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def _error(message: str) -> None:
    print(f"ebb submit: error: {message}", file=sys.stderr)


class _Progress:
    """One tqdm bar over the iterations of several jobs (stderr)."""

    def __init__(self, jobs: list[dict[str, Any]], disable: bool) -> None:
        from tqdm import tqdm

        self.total = self._total(jobs)
        self.done = 0
        self.bar = tqdm(total=self.total, unit="it", desc=f"{len(jobs)} job(s)",
                        disable=disable, dynamic_ncols=True)

    @staticmethod
    def _total(jobs: list[dict[str, Any]]) -> int:
        return sum(max(1, int((job.get("progress") or {}).get("total") or 0)) for job in jobs)

    @staticmethod
    def _done(job: dict[str, Any]) -> int:
        progress = job.get("progress") or {}
        total = max(1, int(progress.get("total") or 0))
        if job.get("status") in ("succeeded", "failed", "cancelled"):
            return total  # a finished job's share of the bar is complete
        return min(total, int(progress.get("iteration") or 0))

    def __call__(self, jobs: list[dict[str, Any]]) -> None:
        total = self._total(jobs)
        if total != self.total:
            self.total = self.bar.total = total
        done = sum(self._done(job) for job in jobs)
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job["status"]] = counts.get(job["status"], 0) + 1
        self.bar.set_postfix_str(", ".join(f"{n} {status}" for status, n in sorted(counts.items())), refresh=False)
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        self.bar.close()


def _submit(client: Any, image: Path, fields: dict[str, str]) -> dict[str, Any]:
    """``client.submit``, waiting out the rate limit (429 with ``Retry-After``,
    up to :data:`RATE_LIMIT_RETRIES` times, each wait at most
    :data:`RATE_LIMIT_MAX_WAIT_S`)."""
    import time

    from shared.client import ExplainClientError

    for attempt in range(RATE_LIMIT_RETRIES + 1):
        try:
            return client.submit(image, **fields)
        except ExplainClientError as error:
            wait = error.retry_after
            if (error.status != 429 or wait is None or wait > RATE_LIMIT_MAX_WAIT_S
                    or attempt == RATE_LIMIT_RETRIES):
                raise
            print(f"ebb submit: {error}; retrying in {wait:g} s", file=sys.stderr, flush=True)
            time.sleep(max(wait, 0.5))
    raise AssertionError("unreachable")  # pragma: no cover


def _summary_line(name: str, job: dict[str, Any]) -> str:
    target = job.get("target") or {}
    scores = job.get("scores") or {}
    if job["status"] == "succeeded":
        label = f"{target.get('label')} ({target.get('index')})"
        before, after = scores.get("before"), scores.get("after")
        score = (f"score {before:.3f} -> {after:.3f}"
                 if isinstance(before, (int, float)) and isinstance(after, (int, float)) else "")
        return f"{name}: succeeded, {label} {score}".rstrip()
    reason = job.get("error") or ""
    return f"{name}: {job['status']}{': ' + reason if reason else ''}"


def run(args: argparse.Namespace) -> int:
    """Handle ``ebb submit``."""
    from shared.client import ExplainClient, ExplainClientError, WaitTimeout

    try:
        images = collect_images(args.images)
    except ValueError as error:
        _error(str(error))
        return 2
    fields = submission_fields(args)
    client = ExplainClient(args.url, args.token)
    names = dict(zip(images, output_names(images)))

    submitted: list[tuple[Path, dict[str, Any]]] = []
    refused = False
    for image in images:
        try:
            job = _submit(client, image, fields)
        except OSError as error:
            _error(f"{image}: {error.strerror or error}")
            refused = True
            continue
        except ExplainClientError as error:
            refused = True
            if error.field == "image":
                _error(f"{image}: {error}")
                continue
            _error(str(error))
            if len(images) > 1:
                print(f"ebb submit: stopped; {len(submitted)} of {len(images)} image(s) submitted",
                      file=sys.stderr)
            break
        submitted.append((image, job))
        if not args.wait:
            print(f"{image}\t{job['id']}\t{client.absolute(job['links']['page'])}", flush=True)

    if not args.wait or not submitted:
        return 2 if refused else 0

    progress = _Progress([job for _, job in submitted], disable=args.quiet)
    try:
        finals = client.wait([job["id"] for _, job in submitted], poll=args.poll, timeout=args.timeout,
                             on_progress=progress)
    except WaitTimeout as error:
        progress.close()
        _error(str(error))
        for (image, _), job in zip(submitted, error.jobs):
            print(f"{image}: {job['status']} ({job['id']})")
        return 2 if refused else 1
    except ExplainClientError as error:
        progress.close()
        _error(str(error))
        return 2
    except KeyboardInterrupt:
        progress.close()
        print("\nebb submit: interrupted; the jobs keep running on the server:", file=sys.stderr)
        for image, job in submitted:
            print(f"{image}\t{job['id']}", file=sys.stderr)
        return 130
    progress.close()

    all_ok = True
    for (image, _), job in zip(submitted, finals):
        line = _summary_line(image.name, job)
        if job["status"] != "succeeded":
            all_ok = False
            print(line)
            continue
        out_dir = args.out / names[image]
        try:
            files = client.download(job["id"], out_dir, job=job)
        except (ExplainClientError, OSError) as error:
            all_ok = False
            print(f"{line}; download failed: {error}")
            continue
        print(f"{line}; {len(files)} file(s) in {out_dir}")
    if refused:
        return 2
    return 0 if all_ok else 1
