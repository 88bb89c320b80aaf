"""The OpenAPI 3 document of the JSON API (served at ``/api/v1/openapi.json``)."""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from shared.attribution.config import MAX_AREAS, PerturbationConfig

from .jobs import ARTIFACTS, CHOICES, MAX_TARGETS, STATUSES

_LIMITS = PerturbationConfig.limits()
_DEFAULTS = PerturbationConfig()


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _error_response(description: str, example_code: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/Error"},
                "example": {"error": {"code": example_code, "message": description}},
            }
        },
    }


def _int_param(name: str, description: str) -> dict[str, Any]:
    low, high = _LIMITS[name]
    return {
        "type": "integer",
        "minimum": int(low),
        "maximum": int(high),
        "default": getattr(_DEFAULTS, name),
        "description": description,
    }


def _float_param(name: str, description: str) -> dict[str, Any]:
    low, high = _LIMITS[name]
    return {
        "type": "number",
        "minimum": low,
        "maximum": high,
        "default": getattr(_DEFAULTS, name),
        "description": description,
    }


#: What each artifact is: size, range, meaning (S = the model's input side,
#: e.g. 224; H × W = the uploaded image; m = mask_size, e.g. 28).
ARTIFACT_DESCRIPTIONS = {
    "mask_npy": "The optimised mask, m × m float32 in [0, 1]; 1 = pixel kept, 0 = replaced by "
                "the perturbation (in the deletion game the salient region is where it is low).",
    "mask_png": "The mask upsampled to S × S (the model's square input, the image squashed), "
                "grey levels: white = kept, black = removed.",
    "heatmap_png": "The saliency at S × S (the model's square input, squashed), inferno colours: "
                   "black = 0 (not salient) to light yellow = 1 (most salient).",
    "overlay_png": "The saliency heatmap blended (alpha 0.5) over the image at its original H × W.",
    "perturbed_png": "The S × S image the model saw at the end (squashed; blurred where the mask "
                     "is 0), no noise.",
    "result_json": "Scores, top-5, config, loss history and timings of the target.",
    "gradcam_npy": "The Grad-CAM map of the same class, S × S float32 in [0, 1], 1 = salient; "
                   "null when not computed.",
    "gradcam_png": "The Grad-CAM map as a heatmap over the image at its original H × W.",
    "areas_png": "Extremal jobs: one overlay per target area, side by side, 224 px tiles.",
    "saliency_npy": "The saliency at the image's original H × W, float32 in [0, 1], 1 = salient "
                    "(1 - mask in the deletion game, the mask in the preservation game; the same "
                    "convention as gradcam.npy).",
    "saliency_png": "saliency.npy as an inferno heatmap at the original H × W "
                    "(black = 0, light yellow = 1).",
}

_ARTIFACT_URLS = {
    "type": "object",
    "description": "Absolute-path URLs of the result files; null until the job succeeded. "
                   "`gradcam_npy`, `gradcam_png` (the Grad-CAM baseline), `areas_png` "
                   "(extremal jobs: one overlay per target area) and `saliency_npy`, "
                   "`saliency_png` (jobs run before they existed) are null when the job did "
                   "not compute them. Each property's description says the file's size, "
                   "range and meaning.",
    "properties": {key: _nullable({"type": "string", "description": ARTIFACT_DESCRIPTIONS.get(key, "")})
                   for key in ARTIFACTS},
    "required": list(ARTIFACTS),
}

_NUMBERS = {"type": "array", "items": _nullable({"type": "number"})}

_CURVES = _nullable({
    "type": "object",
    "description": "Deletion and insertion curves: the target probability (`deletion`, "
                   "`insertion`) after removing / revealing the `fraction` of pixels the "
                   "map ranks most salient; aligned lists (a point that is not a finite "
                   "number is null).",
    "properties": {"fraction": _NUMBERS, "deletion": _NUMBERS, "insertion": _NUMBERS},
    "required": ["fraction", "deletion", "insertion"],
})

_FAITHFULNESS_PROPERTIES = {
    "deletion_auc": _nullable({"type": "number",
                               "description": "Area under the deletion curve: lower is "
                                              "more faithful."}),
    "insertion_auc": _nullable({"type": "number",
                                "description": "Area under the insertion curve: higher is "
                                               "more faithful."}),
    "curves": _CURVES,
    "seconds": _nullable({"type": "number", "description": "Time the evaluation took."}),
}

_FAITHFULNESS = {
    "type": "object",
    "properties": _FAITHFULNESS_PROPERTIES,
    "required": list(_FAITHFULNESS_PROPERTIES),
}

_METRICS = _nullable({
    "type": "object",
    "description": "Faithfulness of the primary target's explanation (deletion/insertion "
                   "metrics of the perturbation mask) and of the Grad-CAM baseline "
                   "(`gradcam`); null until the job has results.",
    "properties": {**_FAITHFULNESS_PROPERTIES, "gradcam": _nullable(_FAITHFULNESS)},
    "required": [*_FAITHFULNESS_PROPERTIES, "gradcam"],
})

_TOP5_ROW = {
    "type": "object",
    "properties": {
        "index": _nullable({"type": "integer"}),
        "label": _nullable({"type": "string"}),
        "prob": _nullable({"type": "number"}),
    },
}

_TARGET = {
    "type": "object",
    "properties": {
        "index": _nullable({"type": "integer"}),
        "label": _nullable({"type": "string"}),
    },
    "required": ["index", "label"],
}

_SCORES = {
    "type": "object",
    "description": "Probability of the target class on the original image (before) "
                   "and on the perturbed image (after).",
    "properties": {
        "before": _nullable({"type": "number"}),
        "after": _nullable({"type": "number"}),
    },
    "required": ["before", "after"],
}

_TOP5 = {
    "type": "object",
    "properties": {
        "before": _nullable({"type": "array", "items": _TOP5_ROW}),
        "after": _nullable({"type": "array", "items": _TOP5_ROW}),
    },
    "required": ["before", "after"],
}

_AREA_ROW = {
    "type": "object",
    "properties": {
        "area": _nullable({"type": "number", "description": "Requested area (fraction)."}),
        "area_achieved": _nullable({"type": "number",
                                    "description": "Fraction the mask actually covers."}),
        "score_after": _nullable({"type": "number",
                                  "description": "Target probability with that mask."}),
    },
    "required": ["area", "area_achieved", "score_after"],
}

_WARNINGS = {
    "type": "array",
    "description": "Why this explanation may be weak (empty when nothing was found): "
                   "`low_confidence` (the model's probability of the target was below 0.1 "
                   "before the perturbation), `score_not_halved` (deletion: the score after "
                   "is more than half the score before), `score_not_raised` (preservation: "
                   "the score did not rise), `mask_unchanged` (the mask barely moved from its "
                   "start), `small_input` (the image is much smaller than the model's input, "
                   "so it was upscaled). Each message says why and what to try.",
    "items": {
        "type": "object",
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        "required": ["code", "message"],
    },
}

_LIVE_TARGET = {
    "type": "object",
    "properties": {
        "target": _TARGET,
        "progress": {
            "type": "object",
            "properties": {
                "iteration": {"type": "integer", "minimum": 0},
                "total": {"type": "integer", "minimum": 0},
                "fraction": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["iteration", "total", "fraction"],
        },
        "score": _nullable({"type": "number", "minimum": 0, "maximum": 1,
                            "description": "Live score: the target's probability on the mask "
                                           "at iteration `score_iteration`, without the "
                                           "optimisation's noise (for extremal jobs: on the "
                                           "largest area's mask); null until first measured."}),
        "score_iteration": _nullable({"type": "integer", "minimum": 0}),
        "score_before": _nullable({"type": "number", "minimum": 0, "maximum": 1,
                                   "description": "The target's probability on the original image."}),
    },
    "required": ["target", "progress", "score", "score_iteration", "score_before"],
}

_RESULT = {
    "type": "object",
    "description": "One explained target: its scores, faithfulness metrics, the Grad-CAM "
                   "baseline's, extremal areas and artifact URLs.",
    "properties": {
        "target": _TARGET,
        "method": _nullable({"type": "string",
                             "description": "`meaningful_perturbation` or `extremal`."}),
        "scores": _SCORES,
        "top5": _TOP5,
        "metrics": _nullable({**_FAITHFULNESS,
                              "description": "Deletion/insertion metrics of the "
                                             "perturbation mask."}),
        "gradcam": _nullable({**_FAITHFULNESS,
                              "description": "Deletion/insertion metrics of the Grad-CAM "
                                             "baseline for the same class."}),
        "areas": _nullable({"type": "array", "items": _AREA_ROW,
                            "description": "Extremal jobs: one row per target area."}),
        "warnings": _WARNINGS,
        "artifacts": {**_ARTIFACT_URLS,
                      "description": "URLs of this target's files "
                                     "(`/jobs/{job_id}/results/{k}/artifacts/{name}`); null "
                                     "when absent."},
    },
    "required": ["target", "method", "scores", "top5", "metrics", "gradcam", "areas",
                 "warnings", "artifacts"],
}

_WORKER = {
    "type": "object",
    "required": ["hostname", "model", "device", "precision", "max_batch", "running_jobs",
                 "jobs_done", "iterations_per_s", "started_at", "last_seen", "version"],
    "properties": {
        "hostname": {"type": "string", "description": "Celery node name, as on the jobs it runs."},
        "model": {"type": "string"},
        "device": {"type": "string", "description": "`cpu` or the GPU's name, e.g. `NVIDIA H200`."},
        "precision": {"type": "string", "description": "Default precision of its jobs."},
        "max_batch": {"type": "integer", "minimum": 1},
        "running_jobs": {"type": "integer", "minimum": 0},
        "jobs_done": {"type": "integer", "minimum": 0,
                      "description": "Jobs it finished since it started."},
        "iterations_per_s": {"type": "number", "minimum": 0,
                             "description": "Mask-iterations per second over the last minute."},
        "busy_iterations_per_s": {"type": "number", "minimum": 0,
                                  "description": "Mask-iterations per second of busy time."},
        "started_at": {"type": "string", "format": "date-time"},
        "last_seen": {"type": "string", "format": "date-time"},
        "version": {"type": "string"},
    },
}

_USAGE = {
    "type": "object",
    "description": "An owner's quota usage and limits (the token's name; `default` without "
                   "tokens).",
    "required": ["owner", "active_jobs", "max_active_jobs", "work_last_hour", "work_budget",
                 "work_left", "next_refill_at", "max_iterations"],
    "properties": {
        "owner": {"type": "string"},
        "active_jobs": {"type": "integer", "minimum": 0,
                        "description": "Queued and running jobs."},
        "max_active_jobs": {"type": "integer", "minimum": 1,
                            "description": "`EBB_MAX_QUEUED_PER_OWNER` (default 20)."},
        "work_last_hour": {"type": "integer", "minimum": 0,
                           "description": "Mask-iterations (targets x iterations x areas) of the "
                                          "jobs accepted in the last hour."},
        "work_budget": _nullable({"type": "integer", "minimum": 1,
                                  "description": "`EBB_WORK_BUDGET` per hour; null: none."}),
        "work_left": _nullable({"type": "integer", "minimum": 0}),
        "next_refill_at": _nullable({"type": "string", "format": "date-time",
                                     "description": "When the oldest job of the last hour "
                                                    "leaves the window."}),
        "max_iterations": {"type": "integer", "minimum": 1,
                           "description": "`EBB_MAX_ITERATIONS` (default 2000)."},
    },
}

_JOB = {
    "type": "object",
    "required": [
        "id", "status", "model", "target", "targets", "top_k", "progress", "scores", "top5",
        "config", "created_at", "started_at", "finished_at", "error", "artifacts", "metrics",
        "results", "warnings", "live", "queue_position", "queue", "current_score", "elapsed_s",
        "eta_s", "attempts", "reused_from",
        "worker", "timings", "image", "links",
        "owner",
    ],
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "status": {"type": "string", "enum": list(STATUSES)},
        "model": {"type": "string"},
        "owner": {"type": "string",
                  "description": "Name of the API token that submitted the job (`default` for "
                                 "a bare token and when no tokens are configured)."},
        "target": {
            **_TARGET,
            "description": "Class explained (the primary one when there are several); null "
                           "index/label until the worker resolved the model's top-1 class "
                           "when none was requested (written at its first progress report).",
        },
        "targets": _nullable({
            "type": "array", "items": {"type": "integer"},
            "description": "Class indices requested with `targets` (primary first); for a "
                           "`top_k` job, the k classes once the worker ranked them; else null.",
        }),
        "top_k": {"type": "integer", "minimum": 1,
                  "description": "How many of the most probable classes are explained "
                                 "(1 unless `top_k` was requested)."},
        "progress": {
            "type": "object",
            "properties": {
                "iteration": {"type": "integer", "minimum": 0},
                "total": {"type": "integer", "minimum": 0},
                "fraction": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["iteration", "total", "fraction"],
        },
        "scores": _SCORES,
        "top5": _TOP5,
        "config": {
            "type": "object",
            "description": "The complete validated PerturbationConfig of the job.",
            "additionalProperties": True,
        },
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": _nullable({"type": "string", "format": "date-time"}),
        "finished_at": _nullable({"type": "string", "format": "date-time"}),
        "error": _nullable({"type": "string"}),
        "artifacts": {
            **_ARTIFACT_URLS,
            "properties": {**_ARTIFACT_URLS["properties"],
                           "preview_png": _nullable({"type": "string"})},
            "description": _ARTIFACT_URLS["description"] + " `preview_png` is the live preview of "
                           "a running Meaningful Perturbation job: the current mask's saliency "
                           "(inferno, 1 = salient) over the image, longest side 256 px, rewritten "
                           "by the worker at most every 2 s; null unless running (and until "
                           "the first preview).",
        },
        "metrics": _METRICS,
        "results": {
            "type": "array", "items": _RESULT,
            "description": "One entry per explained target, the primary first (empty until "
                           "the job succeeded, or for jobs run before results existed).",
        },
        "warnings": {**_WARNINGS, "description": "The primary result's `warnings` (empty "
                                                 "until the job succeeded). " + _WARNINGS["description"]},
        "live": _nullable({
            "type": "array", "items": _LIVE_TARGET,
            "description": "Per-target live state written by the worker while it runs (kept "
                           "afterwards), the primary first: progress, the live noise-free "
                           "score and the score before; null until the worker's first report.",
        }),
        "queue_position": _nullable({
            "type": "integer", "minimum": 1,
            "description": "1-based place among the queued jobs of the same model "
                           "(null unless queued).",
        }),
        "queue": _nullable({
            "type": "object",
            "description": "While queued: where the job stands and whether any worker serves "
                           "its model (null once it started). A job for a model with no live "
                           "worker is accepted and waits until one joins.",
            "required": ["position", "workers_online", "eta_s"],
            "properties": {
                "position": _nullable({"type": "integer", "minimum": 1}),
                "workers_online": _nullable({
                    "type": "integer", "minimum": 0,
                    "description": "Live workers serving the job's model (null: the heartbeats "
                                   "cannot be read)."}),
                "eta_s": _nullable({
                    "type": "number", "minimum": 0,
                    "description": "Seconds until the job is done: the work queued ahead of it "
                                   "and its own, at the rate the model's workers measured, plus "
                                   "the usual scoring time (null while no rate is known)."}),
            },
        }),
        "current_score": _nullable({"type": "number",
                                    "description": "Live score of the primary target: its "
                                                   "probability on the current mask without the "
                                                   "optimisation's noise (see `live`); the score "
                                                   "after once succeeded."}),
        "elapsed_s": _nullable({"type": "number", "minimum": 0}),
        "eta_s": _nullable({"type": "number", "minimum": 0,
                            "description": "While running: seconds left, including the scoring "
                                           "after the last iteration."}),
        "attempts": {"type": "integer", "minimum": 0},
        "reused_from": _nullable({"type": "string", "format": "uuid",
                                  "description": "The succeeded job whose results and artifacts "
                                                 "this one shares (an identical submission "
                                                 "answered from the store); else null."}),
        "worker": _nullable({"type": "string"}),
        "timings": _nullable({"type": "object", "additionalProperties": True}),
        "cancel_requested": {"type": "boolean"},
        "usage": _USAGE,
        "image": {
            "type": "object",
            "properties": {
                "sha256": {"type": "string"},
                "width": {"type": "integer"},
                "height": {"type": "integer"},
                "filename": {"type": "string",
                             "description": "Cleaned original file name, for display only."},
            },
            "required": ["sha256", "width", "height", "filename"],
        },
        "links": {
            "type": "object",
            "properties": {
                "self": {"type": "string"},
                "page": {"type": "string"},
                "image": {"type": "string"},
                "thumbnail": {"type": "string"},
            },
            "required": ["self", "page"],
        },
    },
}

_QUOTA_429 = {
    "description": "Over a quota: `too_many_requests` (the request rate, `EBB_RATE_LIMIT`), "
                   "`too_many_jobs` (the owner already has `EBB_MAX_QUEUED_PER_OWNER` queued "
                   "and running jobs) or `work_budget_exceeded` (the job does not fit in what is "
                   "left of the owner's hourly `EBB_WORK_BUDGET`; the message and `refills_at` "
                   "say when it will). Retry after `Retry-After` seconds. Nothing is stored.",
    "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                "description": "Seconds to wait."}},
    "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"},
        "example": {"error": {"code": "work_budget_exceeded",
                              "message": "'default' has used 9000 of its 10000 mask-iterations "
                                         "this hour (EBB_WORK_BUDGET); this job needs 2000. The "
                                         "budget refills enough for it at 2026-01-01T12:30:00Z "
                                         "(in 1200 s).",
                              "retry_after_s": 1200, "refills_at": "2026-01-01T12:30:00Z"}},
    }},
}

_JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "description": "Job UUID; anything else is a 404.",
    "schema": {"type": "string", "format": "uuid"},
}

_DESCRIPTION = """\
Explain an image classifier's decision with Meaningful Perturbation
(Fong & Vedaldi, ICCV 2017): find the smallest, smoothest region whose blurring
destroys the score of the target class.

Submit an image with `POST /jobs` (multipart/form-data). The job is queued and
processed by a worker; poll `GET /jobs/{job_id}` for progress and, once it
succeeded, fetch the result files from `artifacts`.

* All settings are validated before anything is stored or queued; a bad value
  returns 400 with `error.field` naming the form field.
* Omitted settings take their defaults; a blank `model` means the default
  model, a blank `target` the model's top-1 class and a blank `targets` or
  `areas` their defaults. A blank numeric or choice setting is a 400, and so
  is a field given more than once.
* Several classes per job: `targets` (comma-separated indices or labels, 1-5,
  the first is the primary target) or `top_k` (the 2-5 most probable
  classes); either one cannot be combined with `target`, nor with each other.
  Their results are `results[k]`, their files under
  `/jobs/{job_id}/results/{k}/artifacts/{name}`.
* Every finished job carries faithfulness scores (`metrics`: deletion and
  insertion AUCs and curves of the mask, and of a Grad-CAM baseline).
* While a job runs, `live` holds each target's progress and live score (its
  probability on the current mask without the optimisation's noise),
  `target` and `scores.before` are filled in at the worker's first report,
  and `artifacts.preview_png` links a preview of the current mask (every 2 s).
* Every result carries `warnings` (`[{"code", "message"}]`) saying why the
  explanation may be weak; the job's `warnings` are the primary result's.
* The same image, settings and seed give bit-for-bit the same mask and scores
  (Meaningful Perturbation, same worker configuration), whatever else runs.
* **Unknown form fields are ignored.**
* The image is recognised by its content (never by file name or content type).
* The original file name is kept for display only (cleaned: path parts and
  control characters removed, at most 100 characters).
* Errors always have the shape `{"error": {"code", "message", "field"?}}`.
* Liveness and readiness probes live outside the API at `/healthz` and `/readyz`.
"""


def openapi_document(server_url: str = "/api/v1", auth_required: bool = False) -> dict[str, Any]:
    """The document; ``auth_required`` (``EBB_API_TOKENS`` is set) adds the
    top-level ``security`` requirement (bearer token or login session)."""
    return _with_security(_base_document(server_url), auth_required)


_AUTH_DESCRIPTION = """
## Authentication

When the service is configured with API tokens (`EBB_API_TOKENS`), every
operation except `GET /openapi.json` requires either
`Authorization: Bearer <token>` or the session cookie of a browser that logged
in at `/login` (a session's `POST` requests must also send its CSRF token in
`X-CSRFToken`). Without them the answer is 401 with `WWW-Authenticate: Bearer`.
Without tokens configured the service is open and no credentials are needed.
After 5 wrong tokens or logins from one client address within 15 minutes,
every bearer attempt from it is answered 429 with `Retry-After` until then.

Each token has a name, its *owner* (`EBB_API_TOKENS=name:<token>`, or
`name:<token>:admin`): a job records its owner (`owner`), and every job
operation sees only the owner's jobs (another owner's job is a 404
`not_found`, exactly as a missing one); an admin token sees every job.

## Rate limits

Job submissions (`POST /jobs`, shared with the upload form) are limited per
client: per token owner when a token is sent, else per client address
(`EBB_RATE_LIMIT`, default 30 per minute and 500 per hour). Beyond it the
answer is 429 with a `Retry-After` header (seconds); the
`X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` headers
tell where a client stands.
"""


def _with_security(doc: dict[str, Any], auth_required: bool) -> dict[str, Any]:
    doc["info"]["description"] = doc["info"]["description"] + _AUTH_DESCRIPTION
    components = doc.setdefault("components", {})
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "One of the service's API tokens (`EBB_API_TOKENS`).",
        },
        "session": {
            "type": "apiKey",
            "in": "cookie",
            "name": "session",
            "description": "The session cookie of a browser logged in at `/login`.",
        },
    }
    unauthorized = _error_response(
        "Missing or invalid credentials (only when the service requires API tokens).",
        "unauthorized")
    unauthorized["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            if path == "/openapi.json":
                operation["security"] = []  # always public
                continue
            operation["responses"].setdefault("401", deepcopy(unauthorized))
    too_many = _error_response("Too many submissions from this client; retry after "
                               "`Retry-After` seconds.", "too_many_requests")
    too_many["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                           "description": "Seconds to wait."}}
    doc["paths"]["/jobs"]["post"]["responses"].setdefault("429", too_many)
    if auth_required:
        doc["security"] = [{"bearer": []}, {"session": []}]
    return doc


def _base_document(server_url: str) -> dict[str, Any]:
    errors = {
        "400": _error_response("Invalid input.", "invalid_value"),
        "404": _error_response("Not found.", "not_found"),
        "405": _error_response("Method not allowed.", "method_not_allowed"),
        "409": _error_response("The job is already finished.", "conflict"),
        "413": _error_response("The upload is too large.", "payload_too_large"),
        "503": _error_response("The job queue (`queue_unavailable`) or the data store "
                               "(`storage_unavailable`: read-only, unwritable, or an S3 store that cannot be reached) is unavailable; "
                               "nothing was stored.", "queue_unavailable"),
        "507": _error_response("The data store is full (less than `EBB_MIN_FREE_MB` free); "
                               "nothing was stored.", "insufficient_storage"),
        "408": _error_response("The request body was not received within `EBB_WEB_BODY_TIMEOUT` "
                               "seconds.", "request_timeout"),
    }
    job_ref = {"$ref": "#/components/schemas/Job"}
    artifact_name = {"name": "name", "in": "path", "required": True,
                     "description": "Artifact key or file name (see the Job schema's `artifacts` "
                                    "for each file's size, range and meaning); `preview_png`: "
                                    "the live preview of a running job (`/jobs/{job_id}/artifacts/"
                                    "preview_png` only).",
                     "schema": {"type": "string",
                                "enum": list(ARTIFACTS) + list(ARTIFACTS.values()) + ["preview_png"]}}

    def artifact_get(operation_id: str, summary: str) -> dict[str, Any]:
        """The GET operation of an artifact file route."""
        return {
            "operationId": operation_id,
            "summary": summary,
            "parameters": [
                {"name": "download", "in": "query", "required": False,
                 "description": "`1` to get it as an attachment.",
                 "schema": {"type": "string", "enum": ["0", "1"]}},
            ],
            "responses": {
                "200": {
                    "description": "The file.",
                    "content": {
                        "image/png": {"schema": {"type": "string", "format": "binary"}},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                        "application/json": {"schema": {"type": "object"}},
                    },
                },
                "206": {"description": "The requested byte range (`Range: bytes=a-b`).",
                        "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                            "format": "binary"}}}},
                "302": {"description": "With `EBB_PRESIGNED_URLS=1` on an S3 store: a redirect "
                                       "to a short-lived presigned URL of the object.",
                        "headers": {"Location": {"schema": {"type": "string"}}}},
                "304": {"description": "Not modified (conditional request)."},
                "404": errors["404"],
                "405": errors["405"],
                "503": _error_response("The file store is unavailable.", "storage_unavailable"),
            },
        }

    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "explain-black-box API",
            "version": "1.0.0",
            "description": _DESCRIPTION,
        },
        "servers": [{"url": server_url}],
        "paths": {
            "/jobs": {
                "post": {
                    "operationId": "createJob",
                    "summary": "Queue an explain job for an uploaded image.",
                    "description": "Validates every field, stores the upload, records the "
                                   "job and queues it. Unknown fields are ignored.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["image"],
                                    "additionalProperties": True,
                                    "properties": {
                                        "image": {
                                            "type": "string",
                                            "format": "binary",
                                            "description": "The image (JPEG, PNG, WebP, ...).",
                                        },
                                        "model": {
                                            "type": "string",
                                            "description": "One of GET /models; default: the "
                                                           "first served model.",
                                        },
                                        "target": {
                                            "type": "string",
                                            "description": "Class index (0-999) or exact "
                                                           "label; blank: the model's top-1.",
                                        },
                                        "targets": {
                                            "type": "string",
                                            "maxLength": 1000,
                                            "description": (
                                                f"Several classes: 1-{MAX_TARGETS} distinct "
                                                "comma-separated indices or exact labels "
                                                "(e.g. `flute, 683`), the first the primary "
                                                "target. Not with `target` or `top_k` > 1."),
                                        },
                                        "top_k": {
                                            "type": "integer", "minimum": 1,
                                            "maximum": MAX_TARGETS, "default": 1,
                                            "description": "Explain the model's top_k most "
                                                           "probable classes. Not with "
                                                           "`target` or `targets`.",
                                        },
                                        "areas": {
                                            "type": "string",
                                            "maxLength": 1000,
                                            "default": ",".join(
                                                f"{a:g}" for a in _DEFAULTS.areas),
                                            "description": (
                                                f"Extremal method: 1-{MAX_AREAS} distinct "
                                                "comma-separated target areas, fractions "
                                                "strictly between 0 and 1; blank: the "
                                                "default."),
                                        },
                                        "iterations": _int_param("iterations", "Adam steps."),
                                        "learning_rate": _float_param("learning_rate",
                                                                      "Adam learning rate."),
                                        "l1_coeff": _float_param("l1_coeff",
                                                                 "Weight of the sparsity term."),
                                        "tv_coeff": _float_param("tv_coeff",
                                                                 "Weight of the TV term."),
                                        "tv_beta": _float_param("tv_beta", "TV exponent."),
                                        "noise_std": _float_param("noise_std",
                                                                  "Std of the Gaussian noise added to the perturbed input on every step, "
                                                                  "in units of ImageNet's per-channel pixel std (0.229, 0.224, 0.225): "
                                                                  "the same pixel-space noise for every model; 0.2 is the reference's "
                                                                  "noise on VGG19."),
                                        "mask_size": _int_param("mask_size",
                                                                "Side of the mask."),
                                        "input_size": _int_param(
                                            "input_size", "Side of the model's square input."),
                                        "seed": _int_param("seed", "Noise seed."),
                                        "force": {
                                            "type": "string",
                                            "enum": ["0", "1", "true", "false", "on", "off",
                                                     "yes", "no", "y"],
                                            "default": "0",
                                            "description": (
                                                "`1`: run the job even if an identical one "
                                                "(same image, model, targets, config and "
                                                "arithmetic settings) already succeeded. "
                                                "Otherwise such a submission is answered at "
                                                "once with a new job, `status: succeeded`, "
                                                "`reused_from` set, sharing the artifacts."),
                                        },
                                        **{
                                            name: {"type": "string",
                                                   "enum": list(values),
                                                   "default": getattr(_DEFAULTS, name)}
                                            for name, values in CHOICES.items()
                                        },
                                    },
                                },
                                "encoding": {"image": {"contentType": "application/octet-stream"}},
                            }
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "Queued (or, for a submission identical to a "
                                           "succeeded job, already `succeeded` with "
                                           "`reused_from` set). `Location` is the job's URL.",
                            "headers": {"Location": {"schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": job_ref}},
                            "links": {
                                "GetJob": {"operationId": "getJob",
                                           "parameters": {"job_id": "$response.body#/id"}},
                                "CancelJob": {"operationId": "cancelJob",
                                              "parameters": {"job_id": "$response.body#/id"}},
                                "GetArtifact": {"operationId": "getArtifact",
                                                "parameters": {"job_id": "$response.body#/id"}},
                            },
                        },
                        "400": _error_response(
                            "Invalid input (`invalid_value`, `invalid_image`, `invalid_target`, "
                            "`unknown_model`, `missing_field`), or `too_expensive`: the job is "
                            "over an admission limit (estimated memory over `EBB_MAX_JOB_MEMORY`, "
                            "default 4 GiB; mask-iterations = targets x iterations x areas over "
                            "`EBB_MAX_JOB_WORK`, default 100000; decoded pixels over "
                            "`EBB_MAX_PIXELS`, default 25000000, read from the image header; "
                            "iterations over `EBB_MAX_ITERATIONS`, default 2000; work over the "
                            "whole hourly `EBB_WORK_BUDGET`). "
                            "`field` names the input to lower (`input_size`, `iterations`, "
                            "`areas`, `top_k`, `targets` or `image`). Nothing is stored.",
                            "too_expensive"),
                        "405": errors["405"],
                        "408": errors["408"],
                        "413": errors["413"],
                        "429": _QUOTA_429,
                        "503": errors["503"],
                        "507": errors["507"],
                    },
                },
                "get": {
                    "operationId": "listJobs",
                    "summary": "List jobs, newest first (cursor pagination).",
                    "parameters": [
                        {"name": "status", "in": "query", "required": False,
                         "schema": {"type": "string", "enum": list(STATUSES)}},
                        {"name": "limit", "in": "query", "required": False,
                         "schema": {"type": "integer", "minimum": 1, "maximum": 100,
                                    "default": 20}},
                        {"name": "cursor", "in": "query", "required": False,
                         "description": "`next_cursor` of the previous page (opaque).",
                         "schema": {"type": "string", "minLength": 1, "maxLength": 200,
                                    "pattern": "^[A-Za-z0-9_-]+$"}},
                    ],
                    "responses": {
                        "200": {
                            "description": "A page of jobs.",
                            "content": {"application/json": {"schema": {
                                "type": "object",
                                "required": ["jobs", "next_cursor"],
                                "properties": {
                                    "jobs": {"type": "array", "items": job_ref},
                                    "next_cursor": _nullable({"type": "string"}),
                                },
                            }}},
                        },
                        "400": errors["400"],
                        "405": errors["405"],
                    },
                },
            },
            "/jobs/{job_id}": {
                "parameters": [_JOB_ID],
                "get": {
                    "operationId": "getJob",
                    "summary": "A job's status, progress and results.",
                    "responses": {
                        "200": {"description": "The job.",
                                "content": {"application/json": {"schema": job_ref}}},
                        "404": errors["404"],
                        "405": errors["405"],
                    },
                },
            },
            "/jobs/{job_id}/cancel": {
                "parameters": [_JOB_ID],
                "post": {
                    "operationId": "cancelJob",
                    "summary": "Cancel a job.",
                    "description": "A queued job is cancelled at once; a running job is asked "
                                   "to stop (`cancel_requested`) and stops within about a "
                                   "second; a finished job is a 409.",
                    "responses": {
                        "200": {"description": "The job after the request.",
                                "content": {"application/json": {"schema": job_ref}}},
                        "404": errors["404"],
                        "405": errors["405"],
                        "409": errors["409"],
                    },
                },
            },
            "/jobs/{job_id}/artifacts/{name}": {
                "parameters": [
                    _JOB_ID,
                    artifact_name,
                ],
                "get": artifact_get("getArtifact", "One result file of a job (404 until it exists)."),
            },
            "/jobs/{job_id}/results/{k}/artifacts/{name}": {
                "parameters": [
                    _JOB_ID,
                    {"name": "k", "in": "path", "required": True,
                     "description": "Index in `results` (0: the primary target, the same "
                                    "files as `/jobs/{job_id}/artifacts/{name}`); beyond the "
                                    "results: 404.",
                     "schema": {"type": "integer", "minimum": 0}},
                    artifact_name,
                ],
                "get": artifact_get("getResultArtifact",
                                    "One result file of the k-th explained target (404 until it exists)."),
            },
            "/models": {
                "get": {
                    "operationId": "listModels",
                    "summary": "The served models with their labels and input size.",
                    "responses": {
                        "200": {
                            "description": "Models.",
                            "content": {"application/json": {"schema": {
                                "type": "object",
                                "required": ["default", "models"],
                                "properties": {
                                    "default": {"type": "string"},
                                    "models": {"type": "array", "items": {
                                        "type": "object",
                                        "required": ["name", "input_size", "labels"],
                                        "properties": {
                                            "name": {"type": "string"},
                                            "queue": {"type": "string"},
                                            "input_size": {"type": "integer"},
                                            "num_classes": {"type": "integer"},
                                            "labels": {"type": "array",
                                                       "items": {"type": "string"}},
                                            "workers_online": _nullable({
                                                "type": "integer", "minimum": 0,
                                                "description": "Live workers serving the model "
                                                               "(null: heartbeats unreadable)."}),
                                            "queued": {"type": "integer", "minimum": 0,
                                                       "description": "Jobs of the model waiting "
                                                                      "in its queue."},
                                        },
                                    }},
                                },
                            }}},
                        },
                        "405": errors["405"],
                    },
                },
            },
            "/workers": {
                "get": {
                    "operationId": "listWorkers",
                    "summary": "The live workers, from their heartbeats (a worker that misses "
                               "two or three heartbeats is gone).",
                    "responses": {
                        "200": {
                            "description": "The fleet.",
                            "content": {"application/json": {"schema": {
                                "type": "object",
                                "required": ["workers"],
                                "properties": {"workers": {"type": "array", "items": _WORKER}},
                            }}},
                        },
                        "405": errors["405"],
                        "503": _error_response("The heartbeats cannot be read (Redis is down).",
                                               "fleet_unavailable"),
                    },
                },
            },
            "/openapi.json": {
                "get": {
                    "operationId": "getOpenAPI",
                    "summary": "This document.",
                    "responses": {
                        "200": {"description": "OpenAPI 3 document.",
                                "content": {"application/json": {"schema": {"type": "object"}}}},
                        "405": errors["405"],
                    },
                },
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                                "field": {"type": "string",
                                          "description": "The offending input field."},
                            },
                        }
                    },
                },
                "Job": _JOB,
                "Usage": _USAGE,
            }
        },
    }
    doc["paths"]["/jobs/{job_id}"]["delete"] = {
        "operationId": "deleteJob",
        "summary": "Delete a job, its artifacts and its upload.",
        "description": "Deletes the job's row, its artifacts and its uploaded image, unless "
                       "another job still uses them (a job that reused its result, or one "
                       "submitted with the same image). A queued job is cancelled first; a "
                       "running one is asked to stop and deleted once it has (409 "
                       "`job_running` with `Retry-After` if it takes more than 5 s).",
        "responses": {
            "204": {"description": "Deleted."},
            "404": errors["404"],
            "405": errors["405"],
            "409": {**_error_response("The job is still running; retry the DELETE.",
                                      "job_running"),
                    "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}},
        },
    }
    doc["paths"]["/usage"] = {
        "get": {
            "operationId": "getUsage",
            "summary": "The requester's quota usage and limits.",
            "responses": {
                "200": {"description": "Usage and limits of the requesting owner.",
                        "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/Usage"}}}},
                "405": errors["405"],
            },
        },
    }
    return deepcopy(doc)
