"""What the pipeline's runs came to, in words: the ``summary`` command's table and the line ``run-stage`` ends with.

:func:`summarize` reads each stage's ``metrics/<stage>.json`` (and, where the headline lacks a number people ask
for, the stage's ``report.json``, its ``config.resolved.json`` or the run log) into one row per stage: the one to
three numbers that matter and where they came from (dataset, recipe, teacher model and whether it had random
weights). :func:`format_summary` lays the rows out in at most :data:`WIDTH` columns; :func:`stage_line` turns the
dict a stage's ``run`` returns into the one line ``run-stage`` prints when the stage ends.
"""

from __future__ import annotations

import itertools
import os
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from picosam_pipeline.config import Config
from picosam_pipeline.outputs import MARKER, REPORT_FILE
from picosam_pipeline.recipes import AUTO
from picosam_pipeline.reports import last_run
from picosam_pipeline.stages import STAGES
from picosam_pipeline.untrusted import json_file_or_none

WIDTH = 100  # a terminal split in two, or a PR comment: every line of the summary fits it
MAX_JSON_BYTES = 16 << 20  # the largest report.json (evaluate's, per category on LVIS) is a few MiB
NOT_RUN = "not run"
MIB = 2**20
MIN_SOURCE_WIDTH = 27  # the "from" column: a teacher model or a file name, wrapped in it when longer


@dataclass
class Row:
    """One stage of the summary: its name, whether its metrics exist, their words, where they came from."""

    stage: str
    ran: bool
    result: str = NOT_RUN
    source: str = ""
    metrics: dict[str, Any] | None = None


@dataclass
class Summary:
    """Every stage's row, the dataset and recipe the run used, the teacher passes that had random weights, and
    whether the trainer flagged its student untrained."""

    rows: list[Row]
    dataset: str | None
    recipe: str | None
    random_weights: list[str]
    untrained: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is missing or is not such an object (a summary never fails on
    one file: the stage then reads as not run, or loses the detail the file gave)."""
    data = json_file_or_none(path, MAX_JSON_BYTES)
    return data if isinstance(data, dict) else None


def _out_dirs(cfg: Config) -> dict[str, str]:
    """Each stage's output folder (where its ``config.resolved.json`` and ``report.json`` are), by stage name."""
    dirs = {
        "sample": cfg.sample.out_dir,
        "prepare": cfg.prepare.out_dir,
        "pack": cfg.pack.out_dir,
        "train": cfg.train.out_dir,
        "evaluate": cfg.evaluate.out_dir,
        "quantize": cfg.quantize.out_dir,
        "export": cfg.export.out_dir,
        "evaluate-int8": cfg.evaluate.int8_out_dir,
        "package": cfg.package.out_dir,
    }
    for name in cfg.teachers:
        dirs[f"teacher-logits@{name}"] = cfg.teacher_pass(name).teacher.out
    if not cfg.teachers:
        dirs["teacher-logits"] = cfg.teacher.out
    return dirs


def _dataset_name(prepared: dict[str, Any]) -> str | None:
    """The dataset prepare read: the folder holding every split's annotations and images (``<dataset.dir>/<name>``)."""
    splits = prepared.get("prepare", {}).get("splits") or []
    paths = [str(split[key]) for split in splits if isinstance(split, dict) for key in ("annotations", "images")]
    try:
        folder = os.path.commonpath(paths) if paths else ""
    except ValueError:  # absolute and relative paths mixed
        folder = ""
    return Path(folder).name or None


def _recipe(trained: dict[str, Any], dataset: str | None) -> str | None:
    """``NAME (SIZE)`` of the recipe train ran with, ``auto`` resolved as recipes.recipe_values resolves it."""
    recipe = trained.get("recipe")
    if not isinstance(recipe, dict):
        return None
    size = recipe.get("size", AUTO)
    if size == AUTO:
        size = "sample" if dataset == "sample" else "full"
    return f"{recipe.get('name', 'custom')} ({size})"


def _teacher_models(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """evaluate's other models: ``teacher`` (one pass) or ``teacher_NAME`` (several), name -> figures."""
    return {k: v for k, v in metrics.items() if k.startswith("teacher") and isinstance(v, dict)}


def _result(stage: str, m: dict[str, Any], ctx: dict[str, Any]) -> str:
    """The words of ``stage``'s row from its metrics ``m`` (``ctx``: reports, resolved configs, other metrics)."""
    report, resolved = ctx["report"], ctx["resolved"]
    if stage == "sample":
        return f"{m['images']} images, {m['annotations']} annotations ({m['bad_inputs']} bad inputs planted)"
    if stage == "prepare":
        return f"{m['kept']} instances kept, {m['dropped']} dropped"
    if stage.startswith("teacher-logits"):
        rate = last_run(ctx["metrics_dir"], stage).get("instances_per_s")
        return f"{m['instances']} instances" + (f", {rate:.3g} instances/s" if rate else "")
    if stage == "pack":
        return f"{m['samples']} samples, {m['bytes_per_sample'] / 1000:.1f} kB/sample"
    if stage == "train":
        before, best = m["val_iou_before"], report.get("val_iou_best", m["val_iou_after"])
        steps = f"{report['steps']} steps, " if "steps" in report else ""
        at = f" (best step {report['best_step']})" if "best_step" in report else ""
        flag = " UNTRAINED (warnings: train's report.json)" if m.get("untrained") else ""
        return f"{steps}val IoU {before:.3f} -> {best:.3f}{at}{flag}"
    if stage == "evaluate":
        int8 = m.get("student_int8") or ctx["metrics"].get("evaluate-int8", {}).get("student_int8") or {}
        teachers = _teacher_models(m)
        text = f"crop mIoU student {m['crop_miou']:.3f}"
        for name, figures in teachers.items():
            label = "teacher" if len(teachers) == 1 else name.replace("_", " ", 1)
            text += f", {label} {figures['crop_miou']:.3f}"
        return text + (f", INT8 {int8['crop_miou']:.3f}" if "crop_miou" in int8 else "")
    if stage == "quantize":
        target = report.get("metrics", {}).get("max_miou_drop", resolved.get("quantize", {}).get("max_miou_drop"))
        verdict = "within" if m["int8_within_target"] else "OVER"
        return f"INT8 drop {m['crop_miou_drop']:.4f} crop mIoU, {verdict} target" + (f" {target}" if target else "")
    if stage == "export":
        bound = resolved.get("export", {}).get("min_mask_agreement", 0.0)
        agree = {k.removesuffix("_mask_agreement"): v for k, v in m.items() if k.endswith("_mask_agreement")}
        state = "checks ok" if all(v >= bound for v in agree.values()) else "checks FAILED"
        return f"{state}; masks agree " + ", ".join(f"{k} {v:.1%}" for k, v in agree.items())
    if stage == "evaluate-int8":
        return f"INT8 (ONNX) crop mIoU {m['student_int8']['crop_miou']:.3f}"
    if stage == "package":
        memory = report.get("memory", {})
        fits = "fits" if m["fits"] else "does NOT fit"
        if "used_bytes" in memory and "available_bytes" in memory:
            used, available = memory["used_bytes"] / MIB, memory["available_bytes"] / MIB
            return f"{fits}: {used:.1f} of {available:.1f} MiB ({m['utilization']:.0%})"
        return f"{fits}: {m['utilization']:.0%} of the chip's memory"
    return _generic(m)


def _source(stage: str, m: dict[str, Any], ctx: dict[str, Any], summary: Summary) -> str:
    """Where ``stage``'s numbers came from, in a few words."""
    resolved, report = ctx["resolved"], ctx["report"]
    if stage in ("sample", "prepare") and summary.dataset:
        return f"dataset {summary.dataset}"
    if stage.startswith("teacher-logits"):
        return f"{m.get('model', '?')}" + (", RANDOM WEIGHTS" if m.get("random_weights") else "")
    if stage == "pack":
        teachers = resolved.get("pack", {}).get("teachers")
        return f"teachers {', '.join(teachers)}" if teachers else ""
    if stage == "train":
        student = resolved.get("train", {}).get("student", report.get("student"))
        return f"student {student}" if student else ""
    if stage in ("evaluate", "quantize"):
        checkpoint = resolved.get(stage, {}).get("checkpoint")
        return Path(checkpoint).name if checkpoint else ""
    if stage == "evaluate-int8":
        onnx = resolved.get("evaluate", {}).get("int8_model")
        return Path(onnx).name if onnx else ""
    if stage == "package":
        version = report.get("converter", {}).get("version")
        return f"converter {version}" if version else ""
    return ""


def summarize(cfg: Config) -> Summary:
    """Read every stage's metrics (``cfg.runtime.metrics_dir``), reports and resolved configs into a :class:`Summary`;
    a stage without a metrics file is not run."""
    metrics_dir = Path(cfg.runtime.metrics_dir)
    out_dirs = _out_dirs(cfg)
    names = [n for stage in STAGES for n in out_dirs if n.partition("@")[0] == stage]
    metrics = {name: _read_json(metrics_dir / f"{name}.json") for name in names}
    resolved = {name: _read_json(Path(out_dirs[name]) / MARKER) or {} for name in names}
    dataset = _dataset_name(resolved["prepare"]) or (cfg.dataset.name if metrics["prepare"] is not None else None)
    params_recipe = {"recipe": {"name": cfg.recipe.name, "size": cfg.recipe.size}}  # what train will run with
    summary = Summary([], dataset, _recipe(resolved["train"] or params_recipe, dataset or cfg.dataset.name), [])
    present = {n: m for n, m in metrics.items() if m is not None}
    for name in names:
        m = metrics[name]
        if m is None:
            summary.rows.append(Row(name, False))
            continue
        ctx = {
            "metrics_dir": metrics_dir,
            "metrics": present,
            "resolved": resolved[name],
            "report": _read_json(Path(out_dirs[name]) / REPORT_FILE) or {},
        }
        try:
            result = _result(name, m, ctx)
        except (KeyError, TypeError, ValueError):  # a file of another version: show what it holds
            result = _generic(m)
        summary.untrained |= name == "train" and m.get("untrained") is True
        if name.startswith("teacher-logits") and m.get("random_weights"):
            summary.random_weights.append(f"{name.partition('@')[2] or 'teacher'} ({m.get('model', '?')})")
        summary.rows.append(Row(name, True, result, _source(name, m, ctx, summary), m))
    return summary


def format_summary(summary: Summary) -> str:
    """The summary as text, every line at most :data:`WIDTH` characters: the smoke-test banner when a teacher had
    random weights, the provenance line, then one row per stage (stage, result, source)."""
    lines = []
    if summary.random_weights:
        lines += textwrap.wrap(
            f"SMOKE TEST: teacher {', '.join(summary.random_weights)} had RANDOM WEIGHTS; the numbers test the "
            "pipeline only",
            WIDTH,
        )
    if summary.untrained:
        lines += textwrap.wrap(
            "UNTRAINED STUDENT: the run was too short to train it or its val IoU did not improve; what follows train "
            "scores a student that learned nothing (train.steps, recipe.size)",
            WIDTH,
        )
    lines.append(f"dataset {summary.dataset or '?'}, recipe {summary.recipe or '?'}")
    stage_width = max(len(r.stage) for r in summary.rows)
    # The result column takes what it needs up to a floor left for the source; long cells wrap in their column.
    result_width = min(max(len(r.result) for r in summary.rows), WIDTH - stage_width - 4 - MIN_SOURCE_WIDTH)
    source_width = WIDTH - stage_width - 4 - result_width
    lines += [f"{'stage':<{stage_width}}  {'result':<{result_width}}  from", "-" * WIDTH]
    for row in summary.rows:
        results = textwrap.wrap(row.result, result_width) or [""]
        sources = _pack(row.source.split(", "), source_width)
        for stage, result, source in itertools.zip_longest([row.stage], results, sources, fillvalue=""):
            lines.append(f"{stage:<{stage_width}}  {result:<{result_width}}  {source}".rstrip())
    return "\n".join(lines)


def _pack(parts: list[str], width: int) -> list[str]:
    """``parts`` joined by ", " into lines of at most ``width`` (a part breaks only when longer than a line), so that
    "RANDOM WEIGHTS" stays on one line."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += f", {part}"
        else:
            if lines:
                lines[-1] += ","
            lines += textwrap.wrap(part, width) or [""]
    return lines or [""]


# --------------------------------------------------------------------------------------------------
# the line run-stage prints when a stage ends


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _generic(data: dict[str, Any]) -> str:
    """``key=value, ...`` (nested keys dotted, floats to 4 significant digits): any dict, as words."""
    return ", ".join(f"{k}={f'{v:.4g}' if isinstance(v, float) else v}" for k, v in _flat(data).items())


def _counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _stage_words(stage: str, s: dict[str, Any]) -> str:
    """``stage``'s returned dict ``s`` in words (KeyError / TypeError for a dict of another shape)."""
    if stage == "sample":
        images, annotations = s["images"], s["annotations"]
        return (
            f"{sum(images.values())} images ({_counts(images)}), {sum(annotations.values())} annotations, "
            f"{s['bad_inputs']} bad inputs planted"
        )
    if stage == "prepare":
        dropped = s["dropped"]
        why = f" ({_counts(dropped)})" if dropped else ""
        return f"{s['kept']} instances kept, {sum(dropped.values())} dropped{why} -> {s['index']}"
    if stage == "teacher-logits":
        rate = f", {s['instances_per_s']:.3g} instances/s" if s.get("instances_per_s") else ""
        weights = ", RANDOM WEIGHTS" if s["random_weights"] else ""
        return f"{s['instances']} instances ({s['instances_computed']} computed now{rate}){weights} -> {s['store']}"
    if stage == "pack":
        return "; ".join(
            f"{split} {p['samples']} samples in {p['shards']} shards, {p['bytes_per_sample'] / 1000:.1f} kB/sample"
            for split, p in s.items()
        )
    if stage == "train":
        if "rank" in s:
            return "worker rank done (rank 0 writes the outputs)"
        best_step, best_iou = s["best"]
        best = f"best at step {best_step}" if best_step == s["steps"] else f"best {best_iou:.3f} at step {best_step}"
        rate = f", {s['samples_per_s']:.1f} samples/s" if s.get("samples_per_s") else ""
        return f"{s['steps']} steps, val IoU {s['val_iou_before']:.3f} -> {s['val_iou_after']:.3f} ({best}){rate}"
    if stage in ("evaluate", "evaluate-int8"):
        models = ", ".join(f"{model} {v:.3f}" for model, v in s["crop_miou"].items())
        return f"{s['samples']} samples, crop mIoU {models}"
    if stage == "quantize":
        drop = s["float_crop_miou"] - s["int8_crop_miou"]
        return (
            f"{s['student']} crop mIoU float {s['float_crop_miou']:.3f} -> INT8 {s['int8_crop_miou']:.3f} "
            f"(drop {drop:.4f})"
        )
    if stage == "export":
        return "; ".join(
            f"{name} masks agree {c['mask_agreement']:.2%}, max diff {c['max_diff_steps']:.1f} steps"
            for name, c in s.items()
        )
    if stage == "package":
        fits = "fits" if s["fits"] else "does NOT fit"
        return (
            f"{fits}: {s['used_bytes'] / MIB:.1f} of {s['available_bytes'] / MIB:.1f} MiB ({s['utilization']:.0%}), "
            f"{s['crop']} crops, converter {s['converter_seconds']} s"
        )
    raise KeyError(stage)


def stage_line(label: str, seconds: float, summary: Any) -> str:
    """``[LABEL] done in X s: WORDS``: the line ``run-stage`` ends a stage with, from the dict its ``run`` returned
    (``key=value, ...`` for a stage or a dict this module does not know)."""
    if not isinstance(summary, dict):
        words = str(summary)
    else:
        try:
            words = _stage_words(label.partition("@")[0], summary)
        except (KeyError, TypeError, ValueError, AttributeError):
            words = _generic(summary)
    return f"[{label}] done in {seconds:.1f} s: {words}"
