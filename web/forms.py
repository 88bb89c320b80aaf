"""The upload form (Flask-WTF, CSRF protected).

Values are validated by :func:`web.jobs.parse_submission`, the same code as
the API, so the form and the API accept exactly the same inputs; the WTForms
fields here render the inputs and carry their error messages.
"""

from __future__ import annotations

from flask_wtf import FlaskForm
from flask_wtf.file import FileField
from wtforms import BooleanField, SelectField, StringField

from shared.attribution.config import BLURS, MAX_AREAS, PerturbationConfig

from .jobs import CHOICE_FIELDS, CHOICES, MAX_TARGETS

try:  # WTForms >= 3.3 deprecates (value, label) tuples
    from wtforms.fields.choices import SelectChoice as _Choice
except ImportError:  # pragma: no cover - older WTForms
    def _Choice(value: str, label: str):  # type: ignore[misc]
        return (value, label)

_DEFAULTS = PerturbationConfig()
#: Fields shown under the method choice (the rest of the choices are advanced).
_METHOD_FIELDS = ("method", "areas")
_LIMITS = PerturbationConfig.limits()


def _number(name: str, step: str) -> dict:
    low, high = _LIMITS[name]
    attrs = {"type": "number", "step": step, "inputmode": "decimal" if step == "any" else "numeric"}
    if low is not None:
        attrs["min"] = f"{low:g}"
    if high is not None and high < 1e12:
        attrs["max"] = f"{high:g}"
    return attrs


class JobForm(FlaskForm):
    image = FileField("Image", render_kw={"accept": "image/*"})
    model = SelectField("Model", choices=[], validate_choice=False)
    target = StringField(
        "Target class",
        render_kw={"list": "labels", "placeholder": "Top-1 of the model on this image",
                   "autocomplete": "off", "spellcheck": "false", "maxlength": "200"},
    )
    targets = StringField(
        "Several target classes",
        render_kw={"placeholder": "e.g. flute, oboe or 558, 683", "autocomplete": "off",
                   "spellcheck": "false", "maxlength": "1000"},
    )
    top_k = StringField("Top-k classes", default="1",
                        render_kw={"type": "number", "step": "1", "inputmode": "numeric",
                                   "min": "1", "max": str(MAX_TARGETS)})
    method = SelectField("Method", choices=[
        _Choice("meaningful_perturbation", "Meaningful perturbation (2017)"),
        _Choice("extremal", "Extremal perturbations (2019)"),
    ], default=_DEFAULTS.method, validate_choice=False)
    areas = StringField("Extremal areas", default=", ".join(f"{a:g}" for a in _DEFAULTS.areas),
                        render_kw={"placeholder": "0.05, 0.1, 0.2", "autocomplete": "off",
                                   "spellcheck": "false", "maxlength": "1000",
                                   "inputmode": "decimal"})
    iterations = StringField("Iterations", default=str(_DEFAULTS.iterations),
                             render_kw=_number("iterations", "1"))
    learning_rate = StringField("Learning rate", default=f"{_DEFAULTS.learning_rate:g}",
                                render_kw=_number("learning_rate", "any"))
    l1_coeff = StringField("L1 coefficient", default=f"{_DEFAULTS.l1_coeff:g}",
                           render_kw=_number("l1_coeff", "any"))
    tv_coeff = StringField("TV coefficient", default=f"{_DEFAULTS.tv_coeff:g}",
                           render_kw=_number("tv_coeff", "any"))
    tv_beta = StringField("TV beta", default=f"{_DEFAULTS.tv_beta:g}",
                          render_kw=_number("tv_beta", "any"))
    noise_std = StringField("Noise std", default=f"{_DEFAULTS.noise_std:g}",
                            render_kw=_number("noise_std", "any"))
    mask_size = StringField("Mask size", default=str(_DEFAULTS.mask_size),
                            render_kw=_number("mask_size", "1"))
    input_size = StringField("Input size", default=str(_DEFAULTS.input_size),
                             render_kw=_number("input_size", "1"))
    seed = StringField("Seed", default=str(_DEFAULTS.seed), render_kw=_number("seed", "1"))
    blur = SelectField("Blur", choices=list(BLURS), default=_DEFAULTS.blur,
                       validate_choice=False)
    game = SelectField("Game", choices=list(CHOICES["game"]), default=_DEFAULTS.game,
                       validate_choice=False)
    perturbation = SelectField("Perturbation", choices=list(CHOICES["perturbation"]),
                               default=_DEFAULTS.perturbation, validate_choice=False)
    precision = SelectField("Precision", choices=list(CHOICES["precision"]),
                            default=_DEFAULTS.precision, validate_choice=False)
    force = BooleanField("Run again even if an identical job already succeeded", false_values=("", "0", "false", "no", "off"))

    #: Shown next to the target: several classes in one job.
    MULTI = ("targets", "top_k")
    #: Shown under the method.
    METHOD = _METHOD_FIELDS
    ADVANCED = ("learning_rate", "l1_coeff", "tv_coeff", "tv_beta", "noise_std",
                "mask_size", "input_size", "seed",
                *tuple(name for name in CHOICE_FIELDS if name not in _METHOD_FIELDS))
    HELP = {
        "target": "Leave blank to explain the class the model predicts; otherwise type to "
                  "search the 1000 ImageNet labels (or give a class index 0-999).",
        "targets": f"Explain up to {MAX_TARGETS} classes side by side: comma-separated "
                   "labels or indices, the first being the main one. Leave blank to use "
                   "the target above.",
        "top_k": f"Or explain the model's k most probable classes (1-{MAX_TARGETS}); "
                 "leave at 1 when a target is given.",
        "method": "Meaningful perturbation: one smooth mask balancing size and score. "
                  "Extremal: one mask of each fixed area below (the 2019 method).",
        "areas": f"Extremal only: 1-{MAX_AREAS} comma-separated fractions of the image "
                 "between 0 and 1, e.g. 0.05, 0.1, 0.2. Blank: the default.",
        "iterations": "Optimisation steps (1-10000). More steps give a cleaner mask.",
        "learning_rate": "Adam learning rate of the mask.",
        "l1_coeff": "Sparsity: how strongly the mask is pushed to keep pixels.",
        "tv_coeff": "Smoothness: total-variation penalty of the mask.",
        "tv_beta": "Exponent of the total-variation term (1-10).",
        "noise_std": "Gaussian noise added to the perturbed image on every step, in units of "
                     "ImageNet's pixel std (0.2 = the reference's noise on VGG19; the same "
                     "pixel noise on every model). Lower it if the mask stays all ones.",
        "mask_size": "Side of the low-resolution mask (4-224, at most the input size).",
        "input_size": "Side of the square image fed to the model (32-1024).",
        "seed": "Seed of the noise. Meaningful perturbation: the same image, settings and "
                "seed give bit-for-bit the same mask and scores, alone or beside other jobs, "
                "on a worker with the same model, device and batch layout; extremal: the "
                "same within float rounding.",
        "blur": "How the blurred copy is made (used by the blur perturbation).",
        "game": "deletion: the smallest region whose removal destroys the class; "
                "preservation: the smallest region that alone keeps it.",
        "perturbation": "What replaces the removed pixels: a blurred copy, the mean colour "
                        "or noise.",
        "precision": "fp32 (reference) or bf16 autocast: faster on GPUs and recent CPUs.",
    }
