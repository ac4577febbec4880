"""Every GPU figure of issue 33 in one call, within a time budget: one table with the device, the versions and each
figure next to its goal.

Run from the repository root on a CUDA machine:  ``python bench/gpu_suite.py --budget-s 540 [--out DIR]``
(``make bench-gpu``; docs/gpu.md says how to get there on a node without internet). ``--dry-run`` prints the plan (the
steps, their commands and time shares) on any machine. Without CUDA it says so in one line and exits 2.

Each step runs in a child process of its own, with a deadline: its share of what is left of the budget (the shares
below, scaled; time a step leaves unused goes to the next ones). A step past its deadline is stopped (its whole
process group) and keeps what it printed so far; the table and a JSON of it are written to ``--out`` after every step
(default ``bench/out/gpu_suite``), next to each step's full log. Random weights throughout (same compute as the
checkpoints); the images are ``--coco`` (default: the coco-sample of ../shared/data or ./shared/data), else the
built-in sample's synthetic images laid out COCO-style (said in the table's header).

======== ===== ==============================================================================================
step     share  what it runs, and the figures it reads
======== ===== ==============================================================================================
teacher  120 s  ``bench/teacher_gpu.py``: the batched teacher-logits stage with SAM2.1 tiny and large; mean GPU
                utilisation (NVML, every 50 ms) during it, goal >= 70 % each; its instances/s beside it
sam3      75 s  ``bench/teacher_sam3.py --teachers sam3:instance``: SAM3's instance path (``predict_inst``, all boxes
                of an image in one call); encode s and s per box -> instances/s for COCO's 7.3 boxes an image,
                goal >= 200
train    150 s  ``bench/train_gpu.py --compile true false``: the train stage against the bare step (PicoSAM3, batch
                64, default loader workers), goal >= 80 % at ``train.compile: auto`` (true on CUDA); eager beside
parity    60 s  (here, ``--child parity``): the teacher-logits stage on CUDA (bf16 autocast) over the first
                ``--parity-images`` images, then ``verify-logits``' recomputation of ``--parity-sample`` stored
                instances on the CPU in fp32: mask decisions equal (goal >= 99.9 %), largest sigmoid difference
                (goal: within the codec's bound)
pipeline 135 s  (here, ``--child pipeline``): ``picosam-pipeline init`` + ``dvc repro evaluate-int8`` in a temporary
                project on the built-in sample (goal: runs); its headline metrics next to the committed CPU run's
                (metrics/evaluate-int8.json)
======== ===== ==============================================================================================
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
BENCH = REPO / "bench"
HERE = str(Path(__file__).resolve())
COCO_CANDIDATES = (REPO.parent / "shared" / "data" / "coco-sample", REPO / "shared" / "data" / "coco-sample")
COCO_BOXES_PER_IMAGE = 7.3  # COCO train2017: 860,001 instances / 118,287 images (issue 33's "COCO-like images")
MIN_STEP_S = 20.0  # a step is not started with less than this left
DEFAULT_OUT = REPO / "bench" / "out" / "gpu_suite"


@dataclass
class Row:
    """One figure of the table: ``ok`` decides pass/miss from ``value`` (None: shown, not judged)."""

    key: str
    label: str
    goal: str
    ok: Callable[[float], bool] | None = field(default=None, repr=False)
    value: float | None = None
    measured: str = ""
    verdict: str = "not run"

    def set(self, value: float | None, measured: str) -> None:
        """A figure (``value`` None: only a note, e.g. how far a stopped step got; the verdict is the step's)."""
        self.value, self.measured = value, measured
        if value is not None:
            self.verdict = "info" if self.ok is None else ("pass" if self.ok(value) else "miss")


@dataclass
class Step:
    """A child process that fills some rows: ``command(ctx)`` builds it, ``parse(log_text, ctx)`` reads its figures
    (also from a partial log) as ``{row key: (value, measured text)}``."""

    name: str
    share_s: float
    rows: list[Row]
    command: Callable[[dict], list[str]]
    parse: Callable[[str, dict], dict[str, tuple[float, str]]]
    status: str = "not run"
    seconds: float = 0.0
    timeout_s: float = 0.0


# --- parsing the benches' output -------------------------------------------------------------------------------


def parse_teacher(text: str, ctx: dict) -> dict[str, tuple[float, str]]:
    """bench/teacher_gpu.py: per ``## MODEL`` block, the batched stage's inst/s and the GPU utilisation."""
    out: dict[str, tuple[float, str]] = {}
    model, rate = None, None
    for line in text.splitlines():
        if m := re.match(r"## (sam2\S*):", line):
            model, rate = m.group(1), None
        elif model and (m := re.match(r"stage, batched x\d+ \((\d+) inst\)\s+[\d.]+\s+([\d.]+)\s", line)):
            rate = float(m.group(2))
        elif model and (m := re.search(r"GPU utilisation (\d+(?:\.\d+)?) %", line)):
            util = float(m.group(1))
            size = "tiny" if "tiny" in model else "large" if "large" in model else model
            out[f"teacher_util_{size}"] = (util, f"{util:.0f} %" + (f" ({rate:,.0f} inst/s)" if rate else ""))
        elif model and "GPU utilisation n/a" in line:
            size = "tiny" if "tiny" in model else "large"
            out[f"teacher_util_{size}"] = (None, "n/a (no NVML here)")
    return out


def parse_sam3(text: str, ctx: dict) -> dict[str, tuple[float, str]]:
    """bench/teacher_sam3.py's JSON (``--json``): encode s and s per box of the instance path."""
    path = Path(ctx["tmp"]) / "sam3.json"
    if not path.is_file():
        return {}
    rows = [r for r in json.loads(path.read_text()) if r["teacher"] == "sam3:instance"]
    if not rows:
        return {}
    r = rows[0]
    per_image = r["encode_s"] + COCO_BOXES_PER_IMAGE * r["per_prompt_s"]
    rate = COCO_BOXES_PER_IMAGE / per_image
    measured = (
        f"{rate:,.0f} inst/s ({r['encode_s'] * 1e3:.0f} ms encode + {r['per_prompt_s'] * 1e3:.1f} ms a box, "
        f"{r['device']}, {r['images_timed']} images)"
    )
    return {"sam3_instance": (rate, measured)}


_TRAIN = re.compile(
    r"compile (?P<c>true|false)\s*: bare step\s+(?P<bare>[\d.]+) samples/s; train stage \((?P<steps>\d+) steps, "
    r"(?P<workers>\d+) loader workers\)\s+(?P<stage>[\d.]+) samples/s = (?P<pct>\d+) % of the bare step; "
    r"(?P<wait>\d+) % of its time waiting"
)


def parse_train(text: str, ctx: dict) -> dict[str, tuple[float, str]]:
    """bench/train_gpu.py: one line per compile setting."""
    out = {}
    for m in _TRAIN.finditer(text):
        pct = float(m.group("stage")) / float(m.group("bare")) * 100
        measured = (
            f"{pct:.0f} % ({float(m.group('stage')):,.0f} of {float(m.group('bare')):,.0f} samples/s, "
            f"{m.group('workers')} workers, {m.group('wait')} % waiting)"
        )
        out["train_compiled" if m.group("c") == "true" else "train_eager"] = (pct, measured)
    return out


def parse_json_line(prefix: str) -> Callable[[str, dict], dict[str, tuple[float, str]]]:
    """The figures a ``--child`` step prints as one JSON line starting with ``prefix``."""

    def parse(text: str, ctx: dict) -> dict[str, tuple[float, str]]:
        for line in reversed(text.splitlines()):
            if line.startswith(prefix):
                return {k: tuple(v) for k, v in json.loads(line[len(prefix) :]).items()}
        if prefix == "PIPELINE " and (stages := re.findall(r"Running stage '([^']+)'", text)):
            return {"pipeline": (None, f"stopped in stage {stages[-1]}")}
        return {}

    return parse


# --- the steps ---------------------------------------------------------------------------------------------------


def steps() -> list[Step]:
    py = sys.executable
    at_least = lambda goal: lambda v: v >= goal  # noqa: E731
    return [
        Step(
            "teacher",
            120,
            [
                Row(
                    "teacher_util_tiny",
                    "teacher pass GPU utilisation, SAM2.1 tiny (batched stage)",
                    ">= 70 %",
                    at_least(70),
                ),
                Row(
                    "teacher_util_large",
                    "teacher pass GPU utilisation, SAM2.1 large (batched stage)",
                    ">= 70 %",
                    at_least(70),
                ),
            ],
            lambda ctx: [py, str(BENCH / "teacher_gpu.py"), "--coco", ctx["coco"]],
            parse_teacher,
        ),
        Step(
            "sam3",
            75,
            [
                Row(
                    "sam3_instance",
                    f"SAM3 instance path, {COCO_BOXES_PER_IMAGE} boxes an image (predict_inst)",
                    ">= 200 inst/s",
                    at_least(200),
                )
            ],
            lambda ctx: [
                py,
                str(BENCH / "teacher_sam3.py"),
                "--teachers",
                "sam3:instance",
                "--images",
                "6",
                "--prompts",
                "8",
                "--coco",
                ctx["coco"],
                "--json",
                str(Path(ctx["tmp"]) / "sam3.json"),
            ],
            parse_sam3,
        ),
        Step(
            "train",
            150,
            [
                Row(
                    "train_compiled",
                    "train stage vs bare step, PicoSAM3 batch 64, compile auto (= true on CUDA)",
                    ">= 80 %",
                    at_least(80),
                ),
                Row("train_eager", "train stage vs bare step, the same eager (compile false)", "(beside)"),
            ],
            lambda ctx: [py, str(BENCH / "train_gpu.py"), "--compile", "true", "false"],
            parse_train,
        ),
        Step(
            "parity",
            60,
            [
                Row(
                    "parity_decisions",
                    "GPU bf16 store vs CPU fp32 recomputation: mask decisions equal",
                    ">= 99.9 %",
                    at_least(99.9),
                ),
                Row(
                    "parity_sigmoid",
                    "the same: largest |sigmoid difference| (codec bound in brackets)",
                    "<= codec bound",
                    lambda v: v <= 0,  # the child reports it minus the bound
                ),
            ],
            lambda ctx: [py, HERE, "--child", "parity", "--coco", ctx["coco"], *ctx["parity_args"]],
            parse_json_line("PARITY "),
        ),
        Step(
            "pipeline",
            135,
            [
                Row(
                    "pipeline",
                    "sample pipeline end to end on the GPU (dvc repro up to evaluate-int8)",
                    "runs",
                    lambda v: v >= 1,
                ),
                Row(
                    "pipeline_vs_cpu",
                    "  its headline metrics vs the committed CPU run: largest |difference|",
                    "(beside)",
                ),
            ],
            lambda ctx: [py, HERE, "--child", "pipeline"],
            parse_json_line("PIPELINE "),
        ),
    ]


# --- running them within the budget ----------------------------------------------------------------------------


def deadline_for(step_index: int, plan: list[Step], left_s: float) -> float:
    """The step's share of what is left: ``left_s`` split in proportion to this step's and the later ones' shares."""
    shares = [s.share_s for s in plan[step_index:]]
    return left_s * plan[step_index].share_s / sum(shares)


def run_step(step: Step, ctx: dict, timeout_s: float, log: Path) -> None:
    """Run the step's child in a process group of its own; past ``timeout_s`` stop the group (TERM, then KILL)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}
    start = time.monotonic()
    with open(log, "w") as fh:
        fh.write(f"$ {' '.join(step.command(ctx))}\n")
        fh.flush()
        proc = subprocess.Popen(
            step.command(ctx), stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
            step.status = "done" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            step.status = f"stopped at its deadline ({timeout_s:.0f} s)"
    step.seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    for key, (value, measured) in step.parse(text, ctx).items():
        for row in step.rows:
            if row.key == key:
                row.set(value, measured)
    last = ([line for line in text.strip().splitlines() if line.strip()][-1:] or [""])[0][-140:]
    for row in step.rows:
        if row.verdict != "not run":
            continue
        if step.status == "done":
            row.verdict, row.measured = "not measured", row.measured or "not in the output"
        else:
            row.verdict = "timeout" if step.status.startswith("stopped") else "failed"
            why = f"{step.status}: {last}"
            row.measured = f"{row.measured}; {why}" if row.measured else why


def run_suite(plan: list[Step], budget_s: float, out: Path, header: str, ctx: dict) -> int:
    """Run ``plan`` within ``budget_s``; write the table (Markdown) and JSON to ``out`` after every step; print the
    table at the end. Returns 0 when every judged row passed, 1 otherwise."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for i, step in enumerate(plan):
        left = budget_s - (time.monotonic() - start)
        if ctx.get("only") and step.name not in ctx["only"]:
            step.status = "skipped (--only)"
            for row in step.rows:
                row.verdict, row.measured = "not run", "--only"
            continue
        if left < MIN_STEP_S:
            step.status = f"not started: {max(left, 0):.0f} s of the budget left"
            for row in step.rows:
                row.verdict, row.measured = "not run", "budget spent"
            write(plan, out, header, time.monotonic() - start, budget_s)
            continue
        step.timeout_s = max(deadline_for(i, plan, left), min(MIN_STEP_S, left))
        print(f"gpu_suite: {step.name} (deadline {step.timeout_s:.0f} s, {left:.0f} s of the budget left)", flush=True)
        run_step(step, ctx, step.timeout_s, out / f"{step.name}.log")
        write(plan, out, header, time.monotonic() - start, budget_s)
    table = write(plan, out, header, time.monotonic() - start, budget_s)
    print(table, flush=True)
    judged = [r for s in plan for r in s.rows if r.ok is not None]
    return 0 if judged and all(r.verdict == "pass" for r in judged) else 1


def table_text(plan: list[Step], header: str, used_s: float, budget_s: float) -> str:
    lines = [
        f"{header}; budget {budget_s:.0f} s, used {used_s:.0f} s",
        "",
        "| figure | measured | goal | verdict | step |",
        "|---|---|---|---|---|",
    ]
    for step in plan:
        where = f"{step.name} {step.seconds:.0f} s" if step.seconds else step.name
        for row in step.rows:
            lines.append(f"| {row.label} | {row.measured or '-'} | {row.goal} | {row.verdict} | {where} |")
    return "\n".join(lines)


def write(plan: list[Step], out: Path, header: str, used_s: float, budget_s: float) -> str:
    text = table_text(plan, header, used_s, budget_s)
    (out / "gpu_suite.md").write_text(text + "\n")
    data = {
        "header": header,
        "budget_s": budget_s,
        "used_s": used_s,
        "steps": [
            {
                "name": s.name,
                "status": s.status,
                "seconds": s.seconds,
                "deadline_s": s.timeout_s,
                "rows": [{k: v for k, v in asdict(r).items() if k != "ok"} for r in s.rows],
            }
            for s in plan
        ],
    }
    (out / "gpu_suite.json").write_text(json.dumps(data, indent=1) + "\n")
    return text


# --- the machine --------------------------------------------------------------------------------------------------


def describe_machine() -> tuple[bool, str]:
    """(CUDA available, one line: device, driver, torch, CUDA, Python, CPUs, package version, commit, date)."""
    import torch

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    dirty = ""
    if commit:
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        dirty = " + local changes" if status.strip() else ""
    from picosam_pipeline import __version__

    common = (
        f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs; picosam-pipeline "
        f"{__version__}" + (f" at {commit}{dirty}" if commit else "") + f"; {when}"
    )
    if not torch.cuda.is_available():
        return False, common
    driver = ""
    if shutil.which("nvidia-smi"):
        got = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        driver = got.stdout.strip().splitlines()[0] if got.returncode == 0 and got.stdout.strip() else ""
    name = torch.cuda.get_device_name(0)
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return True, (
        f"{name} ({memory:.0f} GiB{', driver ' + driver if driver else ''}), CUDA {torch.version.cuda}, " + common
    )


def coco_folder(explicit: str | None, tmp: Path) -> tuple[str, str]:
    """(folder with annotations/instances_val2017.json and val2017/, its description): ``explicit``, a coco-sample,
    else the built-in sample's val split (synthetic images) laid out COCO-style in ``tmp``."""
    for candidate in [Path(explicit)] if explicit else COCO_CANDIDATES:
        if (candidate / "val2017").is_dir() and (candidate / "annotations" / "instances_val2017.json").is_file():
            return str(candidate), f"images: {candidate.name} val2017"
    if explicit:
        raise SystemExit(f"gpu_suite: --coco {explicit}: no val2017/ and annotations/instances_val2017.json there")
    sys.path.insert(0, str(REPO))
    from picosam_pipeline.config import load_config
    from picosam_pipeline.stages import sample

    root = tmp / "sample"
    cfg = load_config(
        REPO / "params.yaml",
        [f"sample.out_dir={root}", "sample.val_images=25", "sample.train_images=1", "sample.plant_bad_inputs=false"],
    )
    sample.run(cfg, None)
    coco = tmp / "coco"
    (coco / "annotations").mkdir(parents=True)
    shutil.copy(root / "annotations" / "instances_val.json", coco / "annotations" / "instances_val2017.json")
    (coco / "val2017").symlink_to(root / "val")
    return str(coco), "images: the built-in sample's 25 synthetic val images (no coco-sample here)"


# --- the two figures no bench measures: children of this script -----------------------------------------------


def child_parity(coco: Path, n_images: int, n_sample: int, device: str = "cuda") -> dict:
    """The teacher-logits stage on CUDA (bf16 autocast: runtime.precision auto), then verify-logits' recomputation of
    ``n_sample`` stored instances on the CPU in fp32 (the store records bf16, so the runtime is forced)."""
    import warnings

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(BENCH))
    from teacher_gpu import prepared_sets, stage_rate

    from picosam_pipeline.config import RuntimeConfig
    from picosam_pipeline.device import resolve_runtime
    from picosam_pipeline.teacher import verify
    from picosam_pipeline.teacher.base import RandomWeightsWarning

    warnings.simplefilter("ignore", RandomWeightsWarning)

    def cpu_fp32(store, device: str):
        seed = int(store.attrs["teacher"]["build"].get("seed") or 0)
        return resolve_runtime(RuntimeConfig(device="cpu", precision="fp32", seed=seed))

    with tempfile.TemporaryDirectory(prefix="gpu_suite_parity_") as tmp:
        sets = prepared_sets(coco, n_images, 1, Path(tmp), "parity")
        store = Path(tmp) / "gpu.zarr"
        made = stage_rate([*sets, f"runtime.device={device}", "runtime.precision=bf16"], store)
        print(f"stage on {device}: {made['instances']} instances, {made['instances_per_s']:.1f} inst/s", flush=True)
        verify._runtime = cpu_fp32  # verify_store takes the store's precision (bf16); the figure is against fp32
        report = verify.verify_store(store, n_sample, device="cpu", tolerance=0.0)
    print(report.format(), flush=True)
    equal = 100 * (1 - report.flipped_pixels / report.pixels)
    return {
        "parity_decisions": (
            equal,
            f"{equal:.3f} % ({report.flipped_pixels} of {report.pixels:,} pixels flip; {report.instances} instances "
            f"of {report.images} images)",
        ),
        "parity_sigmoid": (
            report.max_sigmoid_diff - report.bound,
            f"{report.max_sigmoid_diff:.4f} (bound {report.bound:.4f}); max |delta logit| after the codec "
            f"{report.max_logit_diff:.3f}",
        ),
    }


def child_pipeline() -> dict:
    """``picosam-pipeline init`` and ``dvc repro evaluate-int8`` in a temporary project; its headline metrics next to
    the committed ones (the CPU run of metrics/evaluate-int8.json)."""
    bindir = Path(sys.executable).parent
    cli = [str(bindir / "picosam-pipeline")] if (bindir / "picosam-pipeline").exists() else None
    dvc = [str(bindir / "dvc")] if (bindir / "dvc").exists() else [sys.executable, "-m", "dvc"]
    cli = cli or [sys.executable, "-m", "picosam_pipeline"]
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    for key in ("GIT_AUTHOR", "GIT_COMMITTER"):  # init's first commit needs an identity; a GPU node may have none
        env.setdefault(f"{key}_NAME", "gpu suite")
        env.setdefault(f"{key}_EMAIL", "gpu-suite@picosam.invalid")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_suite_pipeline_") as tmp:
        project = Path(tmp) / "project"
        subprocess.run([*cli, "init", str(project)], check=True, env=env)
        done = subprocess.run([*dvc, "repro", "evaluate-int8"], cwd=project, env=env)
        seconds = time.monotonic() - start
        metrics = project / "metrics" / "evaluate-int8.json"
        if done.returncode != 0 or not metrics.is_file():
            return {"pipeline": (0.0, f"dvc repro failed (exit {done.returncode}) after {seconds:.0f} s")}
        gpu = flatten(json.loads(metrics.read_text()))
    cpu_file = REPO / "metrics" / "evaluate-int8.json"
    cpu = flatten(json.loads(cpu_file.read_text())) if cpu_file.is_file() else {}
    common = sorted(k for k in gpu.keys() & cpu.keys() if isinstance(gpu[k], int | float))
    out = {
        "pipeline": (
            1.0,
            f"ran in {seconds:.0f} s; crop mIoU float / int8 / teacher "
            + " / ".join(
                f"{gpu.get(k, float('nan')):.3f}" for k in ("crop_miou", "student_int8.crop_miou", "teacher.crop_miou")
            ),
        )
    }
    if common:
        worst = max(common, key=lambda k: abs(gpu[k] - cpu[k]))
        out["pipeline_vs_cpu"] = (
            abs(gpu[worst] - cpu[worst]),
            f"{abs(gpu[worst] - cpu[worst]):.3f} ({worst}: {gpu[worst]:.3f} here, {cpu[worst]:.3f} CPU), "
            f"{len(common)} metrics",
        )
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# --- entry point --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=540, help="the whole suite's time budget (default 540)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the table, its JSON and step logs")
    parser.add_argument("--coco", default=None, help="COCO folder with annotations/ and val2017/ (default: see above)")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run these steps only")
    parser.add_argument("--parity-images", type=int, default=8, help="images of the parity step's GPU store")
    parser.add_argument("--parity-sample", type=int, default=48, help="instances the parity step recomputes on the CPU")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--child", choices=["parity", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--child-device", default="cuda", help=argparse.SUPPRESS)  # a CPU check of the parity child
    args = parser.parse_args(argv)
    if args.child == "parity":
        figures = child_parity(Path(args.coco), args.parity_images, args.parity_sample, args.child_device)
        print("PARITY " + json.dumps(figures), flush=True)
        return 0
    if args.child == "pipeline":
        print("PIPELINE " + json.dumps(child_pipeline()), flush=True)
        return 0
    plan = steps()
    names = {s.name for s in plan}
    if args.only and not set(args.only) <= names:
        parser.error(f"--only: unknown step(s) {sorted(set(args.only) - names)}; the steps are {sorted(names)}")
    if args.dry_run:
        ctx = {"coco": args.coco or "COCO", "tmp": "TMP", "parity_args": parity_args(args)}
        print(
            f"gpu_suite plan for a budget of {args.budget_s:.0f} s (each step's deadline if all before it use theirs):"
        )
        left = args.budget_s
        for i, step in enumerate(plan):
            share = deadline_for(i, plan, left)
            left -= share
            print(f"  {step.name:<9} {share:5.0f} s  {' '.join(step.command(ctx))}")
            for row in step.rows:
                print(f"  {'':<9} {'':>7}  {row.label}: goal {row.goal}")
        return 0
    cuda, machine = describe_machine()
    if not cuda:
        print(
            f"gpu_suite: no CUDA device here ({machine.split(';')[0]}): nothing measured; run it on a GPU machine "
            "(docs/gpu.md), or with --dry-run for the plan",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        coco, images = coco_folder(args.coco, Path(tmp))
        ctx = {"coco": coco, "tmp": tmp, "parity_args": parity_args(args), "only": args.only}
        header = f"# GPU suite (issue 33): {machine}; {images}"
        print(header, flush=True)
        return run_suite(plan, args.budget_s, args.out, header, ctx)


def parity_args(args: argparse.Namespace) -> list[str]:
    return ["--parity-images", str(args.parity_images), "--parity-sample", str(args.parity_sample)]


if __name__ == "__main__":
    sys.exit(main())
