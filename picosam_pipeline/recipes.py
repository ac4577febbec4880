"""The two papers as one switch each: ``recipe.name`` in params.yaml decides every key its paper fixes.

A recipe is a table of params keys (``section.key``) and values, applied to the raw params before they are
typed (``config.load_config``): a key the params leave out or set to ``auto`` takes the recipe's value, a key
given a value keeps it (an individual override, e.g. ``train.temperature: 0.5`` for an ablation).

* :data:`RECIPES`: what makes a run PicoSAM2 or PicoSAM3 (``docs/papers.md`` sections 1-2):
  the crop convention (``teacher.prompt``: PicoSAM2's 96-px point window, PicoSAM3's padded box ROI), the student,
  the loss temperature, the area term and the lambda rule. Both papers' code weights the teacher by the batch mean
  of the clamped confidences (PicoSAM2 multiplies per-sample confidences into batch-scalar losses, which is the same).
* :data:`FULL_RUN`: the papers' training settings for a run on COCO: one epoch (``train.steps: epoch``, resolved
  from the train shards' size by the train stage), 1000 warm-up steps, batch 8 (PicoSAM2) / 64 (PicoSAM3),
  AdamW 3e-4, constant schedule, no gradient clipping. Val IoU every ~64k samples (the best checkpoint's grain).
* :data:`SAMPLE_RUN`: a short run that trains on any dataset (300 steps of batch 8, 30 warm-up steps).

``recipe.size: auto`` chooses by the size of the train split, not by the dataset's name: ``full`` when one epoch
of the papers' run lasts at least twice its warm-up (:func:`size_for_samples`: PicoSAM3 at batch 64 needs 128,000
train instances, PicoSAM2 at batch 8 16,000; COCO 2017 has ~860,000), else ``sample``. A smaller dataset under
the full run would end inside its 1,000 warm-up steps with an untrained student. The size is known only once the
shards are packed, so :func:`apply_recipe` fills the size keys provisionally (``sample`` for ``dataset.name:
sample``, ``full`` otherwise) and the train stage settles them on the train shards' sample count
(:func:`settle_auto_size`); the built-in sample (a few dozen instances) stays ``sample`` either way.
:data:`MIN_TRAIN_STEPS` is the shortest run the trainer accepts without warning that the student is untrained; the
functions at the end carry that flag from the student checkpoint through the ONNX files of quantize, export and
package (each of which says it again, :mod:`picosam_pipeline.untrained`).

``recipe.name: custom`` applies nothing and allows any student on any crops (ablations); it is what a params file
without a ``recipe`` section gets (the dataclass defaults in ``config.py`` are PicoSAM3's sample run).
:func:`check_pairing` refuses a student on the crops of the other paper, naming the keys and where they came from.
"""

from __future__ import annotations

from typing import Any

RECIPE_NAMES = ("picosam3", "picosam2", "custom")
STUDENT_CONVENTION = {"picosam2": "point", "picosam3": "roi"}  # student -> the crops its paper trains it on
SIZES = ("auto", "sample", "full")
AUTO = "auto"


RECIPES: dict[str, dict[str, Any]] = {
    "picosam2": {
        "teacher.prompt": "point",
        "train.student": "picosam2",
        "train.temperature": 1.0,
        "train.area_weight": 0.0,
        "train.lambda_mode": "confidence_batch_mean",
    },
    "picosam3": {
        "teacher.prompt": "roi",
        "train.student": "picosam3",
        "train.temperature": 0.2,
        "train.area_weight": 0.4,
        "train.lambda_mode": "confidence_batch_mean",
    },
}

FULL_RUN: dict[str, dict[str, Any]] = {
    "picosam2": {
        "train.steps": "epoch",
        "train.batch_size": 8,
        "train.warmup_steps": 1000,
        "train.grad_clip": 0.0,
        "train.eval_every": 8000,
        "train.checkpoint_every": 1000,
    },
    "picosam3": {
        "train.steps": "epoch",
        "train.batch_size": 64,
        "train.warmup_steps": 1000,
        "train.grad_clip": 0.0,
        "train.eval_every": 1000,
        "train.checkpoint_every": 1000,
    },
}

SAMPLE_RUN: dict[str, Any] = {
    "train.steps": 300,
    "train.batch_size": 8,
    "train.warmup_steps": 30,
    "train.grad_clip": 1.0,
    "train.eval_every": 100,
    "train.checkpoint_every": 100,
}

# The shortest run that trains measurably: the sample's student goes from val IoU 0.394 (step 0) to 0.542 in its
# first 100 steps of batch 8. Shorter runs (or runs that end inside their warm-up) are flagged untrained.
MIN_TRAIN_STEPS = 100
# recipe.size auto: full when one epoch of the papers' run has at least this many times its warm-up steps.
FULL_RUN_WARMUPS_PER_EPOCH = 2

# Every key a recipe may fill: params.yaml writes them as `auto` (so DVC tracks them and an override shows).
RECIPE_KEYS = tuple(dict.fromkeys([*RECIPES["picosam3"], *FULL_RUN["picosam3"], *SAMPLE_RUN]))


class RecipeError(ValueError):
    """Raised with a one-paragraph message; ``config`` turns it into a ConfigError."""


def recipe_values(name: str, size: str, dataset_name: str) -> dict[str, Any]:
    """The ``{section.key: value}`` a recipe fills for ``size`` (``auto``: provisionally sample for the sample
    dataset, else full; the train stage settles it on the dataset's size, :func:`settle_auto_size`)."""
    if name not in RECIPE_NAMES:
        raise RecipeError(f"recipe.name: expected one of {list(RECIPE_NAMES)}, got {name!r}")
    if size not in SIZES:
        raise RecipeError(f"recipe.size: expected one of {list(SIZES)}, got {size!r}")
    if name == "custom":
        return {}
    if size == AUTO:
        size = provisional_size(dataset_name)
    return {**RECIPES[name], **size_values(name, size)}


def provisional_size(dataset_name: str) -> str:
    """What ``recipe.size: auto`` stands for before the dataset's size is known: sample for the built-in sample."""
    return "sample" if dataset_name == "sample" else "full"


def size_values(name: str, size: str) -> dict[str, Any]:
    """The training keys of ``size`` (sample | full) under recipe ``name`` (picosam2 | picosam3)."""
    return dict(SAMPLE_RUN if size == "sample" else FULL_RUN[name])


def full_run_min_samples(name: str) -> int:
    """The fewest train instances for which ``recipe.size: auto`` picks the papers' full run under recipe ``name``:
    one epoch at its batch size must last :data:`FULL_RUN_WARMUPS_PER_EPOCH` times its warm-up steps."""
    full = FULL_RUN[name]
    return FULL_RUN_WARMUPS_PER_EPOCH * full["train.warmup_steps"] * full["train.batch_size"]


def size_for_samples(name: str, train_samples: int) -> str:
    """``recipe.size: auto`` for a train split of ``train_samples`` instances: full or sample."""
    return "full" if train_samples >= full_run_min_samples(name) else "sample"


def settle_auto_size(
    name: str, dataset_name: str, train_samples: int, current: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """``recipe.size: auto`` settled on the train split's size: ``(size, {section.key: new value})``.

    ``current`` holds the size keys as :func:`apply_recipe` left them (the provisional size's values, or the
    params' own). When the dataset's size calls for the other size, every key still at the provisional value
    takes the chosen size's; a key the params set to another value keeps it (one set to that very value is taken
    for the recipe's: ``recipe.size: sample`` or ``full`` settles it). The answer is empty when nothing changes
    (always for the built-in sample).
    """
    size = size_for_samples(name, train_samples)
    provisional = provisional_size(dataset_name)
    if size == provisional:
        return size, {}
    was, now = size_values(name, provisional), size_values(name, size)
    return size, {key: now[key] for key, value in was.items() if current.get(key) == value and now[key] != value}


def apply_recipe(raw: dict[str, Any]) -> dict[str, str]:
    """Fill ``raw`` (params as loaded, overrides applied) in place with the recipe's values.

    Returns where each recipe key's value came from (``{key: "recipe picosam2" | "params"}``), for messages.
    A key left out or set to ``auto`` takes the recipe's value; ``teachers.NAME.prompt: auto`` too.

    Raises:
        RecipeError: an unknown recipe or size; ``auto`` left for a key under recipe ``custom``.
    """
    recipe = raw.get("recipe") or {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe: expected a mapping such as {{name: picosam3, size: auto}}, got {recipe!r}")
    name, size = recipe.get("name", "custom"), recipe.get("size", AUTO)  # no recipe section: keys as given
    dataset = raw.get("dataset") if isinstance(raw.get("dataset"), dict) else {}
    values = recipe_values(name, size, dataset.get("name", "sample"))
    sources: dict[str, str] = {}
    for dotted in RECIPE_KEYS:
        section, key = dotted.split(".")
        node = raw.setdefault(section, {})
        if not isinstance(node, dict):
            continue  # the typed build names the bad section
        if node.get(key, AUTO) != AUTO:
            sources[dotted] = "params"
        elif dotted in values:
            node[key] = values[dotted]
            sources[dotted] = f"recipe {name}"
        elif key in node:
            raise RecipeError(
                f"{dotted}: auto takes its value from the recipe, but recipe.name is custom; give "
                f"{dotted} a value or choose recipe.name picosam2 / picosam3"
            )
    teachers = raw.get("teachers")
    if isinstance(teachers, dict):
        for entry in teachers.values():
            if isinstance(entry, dict) and entry.get("prompt") == AUTO:
                if "teacher.prompt" not in values:
                    raise RecipeError("teachers.*.prompt: auto needs recipe.name picosam2 or picosam3; give a prompt")
                entry["prompt"] = values["teacher.prompt"]
    return sources


def check_pairing(recipe: str, student: str, prompts: dict[str, str], sources: dict[str, str]) -> None:
    """Refuse a student trained on the other paper's crops (unless the recipe is ``custom``).

    ``prompts``: ``{params key: convention}`` of every teacher pass the shards take (``teacher.prompt``,
    ``teachers.NAME.prompt``); ``sources``: :func:`apply_recipe`'s answer (``{}`` when unknown).
    """
    if recipe == "custom":
        return
    want = STUDENT_CONVENTION[student]
    for key, prompt in prompts.items():
        if prompt != want:
            where = lambda k: sources.get(k, "params")  # noqa: E731
            raise RecipeError(
                f"train.student={student} ({where('train.student')}) and {key}={prompt} ({where(key)}) do not go "
                f"together under recipe.name={recipe}: the {student} student is trained on {want} crops "
                f"(picosam2: point, picosam3: roi). Set recipe.name to the paper you want and leave both keys at "
                "auto, or set recipe.name=custom to train any student on any crops"
            )
