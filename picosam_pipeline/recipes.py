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
* :data:`SAMPLE_RUN`: the built-in sample's short run (300 steps of batch 8, 30 warm-up steps), which
  ``recipe.size: auto`` picks for ``dataset.name: sample`` and ``full`` otherwise.

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

# Every key a recipe may fill: params.yaml writes them as `auto` (so DVC tracks them and an override shows).
RECIPE_KEYS = tuple(dict.fromkeys([*RECIPES["picosam3"], *FULL_RUN["picosam3"], *SAMPLE_RUN]))


class RecipeError(ValueError):
    """Raised with a one-paragraph message; ``config`` turns it into a ConfigError."""


def recipe_values(name: str, size: str, dataset_name: str) -> dict[str, Any]:
    """The ``{section.key: value}`` a recipe fills for ``size`` (``auto``: sample for the sample dataset, else full)."""
    if name not in RECIPE_NAMES:
        raise RecipeError(f"recipe.name: expected one of {list(RECIPE_NAMES)}, got {name!r}")
    if size not in SIZES:
        raise RecipeError(f"recipe.size: expected one of {list(SIZES)}, got {size!r}")
    if name == "custom":
        return {}
    if size == AUTO:
        size = "sample" if dataset_name == "sample" else "full"
    return {**RECIPES[name], **(SAMPLE_RUN if size == "sample" else FULL_RUN[name])}


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
