"""The ``picosam-pipeline`` command line (click).

The CLI only parses arguments, loads the config, resolves the device once and calls plain functions;
DVC's ``dvc.yaml`` runs the same ``run-stage`` commands a person types.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
import traceback
import warnings

import click

from picosam_pipeline.errors import PipelineError

PARAMS_HELP = "Params file (YAML, one section per stage). Default: params.yaml in the working directory."
SCORE_STAMP = "picosam-pipeline score-predictions"  # score-predictions --json-out's written_by: its files, replaceable
SET_HELP = "Override one param, KEY.PATH=VALUE (VALUE parsed as YAML); repeatable, e.g. --set train.steps=50."


_ctrl_c_pressed = False  # set by _recording_ctrl_c's handler: a SIGINT reached this process


def _record_ctrl_c(signum, frame):
    """SIGINT handler: remember the Ctrl-C, then raise KeyboardInterrupt as Python's default handler does."""
    global _ctrl_c_pressed
    _ctrl_c_pressed = True
    signal.default_int_handler(signum, frame)


@contextlib.contextmanager
def _recording_ctrl_c():
    """Install :func:`_record_ctrl_c` for the duration of a command (main thread, default handler only)."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:  # SIGINT ignored (nohup, a worker) or handled by an embedding app
        yield
        return
    signal.signal(signal.SIGINT, _record_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _caused_by_ctrl_c(err: BaseException) -> bool:
    """True when ``err`` is the user's Ctrl-C: a KeyboardInterrupt, raised while handling one, or after one arrived.

    A Ctrl-C landing inside a C extension can come out as another exception: chained to the KeyboardInterrupt
    (onnxruntime's pybind11 import: ``ImportError: initialization failed``), or with the interrupt swallowed
    altogether (pycocotools' ``decode`` under numpy 2: ``TypeError: __array__() got an unexpected keyword argument
    'copy'``, the interrupt nowhere in its chain). Both are the user's interrupt, not a bug, and get the interrupt's
    one line and exit 130; the second is recognised by the SIGINT the console script's handler recorded.
    """
    if _ctrl_c_pressed:
        return True
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _exit_interrupted(message: str) -> None:
    """Print the interrupt's one line and exit 130.

    The Ctrl-C may have left objects half-built (it lands anywhere, e.g. inside ``tqdm.__init__``); their ``__del__``
    then fails on the way out and Python prints "Exception ignored ... Traceback" after the message. The process
    is ending on the user's request, so those reports are dropped.
    """
    sys.unraisablehook = lambda unraisable: None
    click.echo(message, err=True)
    sys.exit(130)


def _fail(err: BaseException) -> None:
    """Print a user-facing error as one paragraph and exit 1 (no traceback for bad input)."""
    click.echo(f"Error: {err}", err=True)
    sys.exit(1)


class _FiniteFloatRange(click.FloatRange):
    """click's FloatRange, refusing nan and inf (nan passes every range comparison)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class _Cli(click.Group):
    """The command group: a :class:`PipelineError` from any command is printed as one paragraph, exit 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipelineError as err:
            _fail(err)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="picosam-pipeline")
def cli() -> None:
    """Distil SAM2/SAM3 into PicoSAM2/PicoSAM3 students for the Sony IMX500, reproducibly.

    Each pipeline stage is run with `run-stage NAME` (what `dvc repro` calls); `stages` lists them.
    `init DIR` makes a new project there (dvc.yaml, params.yaml, data/) for `dvc repro`, no clone needed.
    The commands that read params (run-stage, export-teacher, doctor, summary, check-params) read
    params.yaml in the working directory unless given --params; the others take what they need as options.
    Every command exits non-zero with a one-paragraph message on bad input; warnings go to stderr. `doctor`
    checks what this machine can run. Shell completion (stage names included): see `completion --help`.
    """


@cli.command("stages")
def stages_cmd() -> None:
    """List the pipeline stages in order: params sections read, inputs, outputs."""
    import shutil
    import textwrap

    from picosam_pipeline.stages import STAGES

    columns = max(shutil.get_terminal_size((100, 24)).columns, 60)
    for spec in STAGES.values():
        click.echo(f"{spec.name}  (params: {', '.join(spec.sections)})")
        for label, text in (("reads", spec.reads), ("writes", spec.writes)):
            click.echo(textwrap.fill(text, columns, initial_indent=f"  {label:<7}", subsequent_indent=" " * 9))


@cli.command("params-schema")
@click.option(
    "--output",
    "-o",
    default="params.schema.json",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Where to write the schema; - for standard output.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Write nothing: exit 1 when OUTPUT is missing or differs from the schema of this version (CI, after a "
    "change to the config sections), 0 when it is current.",
)
def params_schema_cmd(output: str, check: bool) -> None:
    """Write the JSON Schema of params.yaml (default: params.schema.json, beside it).

    Every key with its type, default, allowed values and description (picosam_pipeline/config_schema.py), unknown
    keys refused, `auto` allowed where a recipe fills the key. params.yaml names the file on its first line
    (`# yaml-language-server: $schema=params.schema.json`), so an editor with a YAML language server (VS Code's
    YAML extension, ...) completes keys, shows their descriptions and flags unknown keys and wrong types while
    you type. The pipeline itself checks the same (and more) when it loads params.yaml.
    """
    import json
    from pathlib import Path

    from picosam_pipeline.config import params_schema
    from picosam_pipeline.outputs import atomic_write_bytes
    from picosam_pipeline.written_paths import check_output_file, is_params_schema

    text = json.dumps(params_schema(), indent=2) + "\n"
    if check:
        path = Path(output)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            state = "is missing" if not path.is_file() else "differs from this version's schema"
            raise PipelineError(f"{output} {state}; run `picosam-pipeline params-schema --output {output}`")
        click.echo(f"{output} is current")
    elif output == "-":
        click.echo(text, nl=False)
    else:
        check_output_file(
            "params-schema",
            "--output",
            output,
            recognise=is_params_schema,
            what="params JSON Schema",
            project_file="params.schema.json",
        )
        atomic_write_bytes(output, text.encode("utf-8"))
        click.echo(f"wrote {output}")


@cli.command("plots")
@click.argument("revs", nargs=-1, metavar="[REV...]")
@click.option(
    "--output",
    "-o",
    default="data/plots.html",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Where to write the page.",
)
@click.option(
    "--js-dir",
    default=None,
    type=click.Path(file_okay=False, exists=True),
    help="A folder with vega.min.js, vega-lite.min.js and vega-embed.min.js to inline (default: vl-convert-python's "
    "bundle).",
)
def plots_cmd(revs: tuple[str, ...], output: str, js_dir: str | None) -> None:
    """Write the project's DVC plots as one HTML page that renders offline.

    The plots of dvc.yaml as `dvc plots show` fills them (`dvc plots diff REV...` when given revisions: git
    revisions or experiment names), with Vega, Vega-Lite and vega-embed and the images inside the page itself: it
    opens in any browser with no network (DVC's own page loads Vega from a CDN). Run it in the project.
    """
    from pathlib import Path

    from picosam_pipeline.outputs import atomic_write_bytes
    from picosam_pipeline.plot_page import is_plot_page, make_page
    from picosam_pipeline.written_paths import check_output_file

    check_output_file("plots", "--output", output, recognise=is_plot_page, what="plot page")
    text, plots = make_page(Path("."), revs, Path(js_dir) if js_dir else None)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, text.encode("utf-8"))
    missing = [p.id for p in plots if p.errors]
    click.echo(f"wrote {output}: {len(plots)} plots" + (f"; missing data for {', '.join(missing)}" if missing else ""))


def _complete_stage(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """Stage names for shell completion, and teacher-logits@NAME for each teacher pass of ./params.yaml."""
    from click.shell_completion import CompletionItem

    from picosam_pipeline.stages import STAGES

    names = list(STAGES)
    try:  # the passes of the params file in the working directory, if it reads; completion never fails on it
        import yaml

        with open(ctx.params.get("params_path") or "params.yaml") as f:
            names += [f"teacher-logits@{name}" for name in (yaml.safe_load(f) or {}).get("teachers") or {}]
    except Exception:
        pass
    return [CompletionItem(n, help=STAGES[n.partition("@")[0]].writes) for n in names if n.startswith(incomplete)]


@cli.command("init")
@click.argument("directory", default=".", metavar="[DIR]", type=click.Path(file_okay=False))
@click.option(
    "--git/--no-git",
    "use_git",
    default=None,
    help="Default: DIR inside a git repository joins it (dvc init, --subdir below its top); otherwise a new "
    "git repository is made in DIR (git init) with the project as its first commit (the train "
    "stage's dvclive and `dvc exp` need one) when git is installed, else DVC runs without git. "
    "--git: the same, but fail when git is not installed. --no-git: no git at all (dvc init --no-scm; "
    "then `dvc exp` and sharing dvc.lock through git are not available).",
)
def init_cmd(directory: str, use_git: bool | None) -> None:
    """Create a runnable pipeline project in DIR (default: the current folder), for an installed picosam-pipeline.

    DIR must be new or empty (nothing is overwritten; there is no --force). It gets params.yaml and a dvc.yaml from
    this version of the package (the code deps of each stage become .picosam/code/STAGE.sha256, written by a first
    stage, code-stamp, from the installed code, so that `dvc repro` after an upgrade reruns the stages whose code
    changed), .dvc/ (dvc init), .dvcignore, .gitignore, data/ and a README.md. Then `cd DIR && dvc repro` runs the
    pipeline on the built-in sample; the README says how to switch to real COCO.
    """
    from pathlib import Path

    from picosam_pipeline.project_init import init_project

    result = init_project(directory, git=use_git)
    click.echo(
        f"Created a picosam-pipeline project in {result.path} (git: {result.scm}): dvc.yaml, params.yaml, "
        f"README.md, data/, .dvc/"
    )
    go = "" if result.path == Path.cwd().resolve() else f"cd {directory} && "
    click.echo(f"Run it:  {go}dvc repro    (the built-in sample; README.md: real COCO, results)")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)


@cli.command("code-stamp", hidden=True)
def code_stamp_cmd() -> None:
    """Write .picosam/code/STAGE.sha256 here: the sha256 of each installed code file every stage runs.

    The first stage of a project made by `init` (dvc.yaml's code-stamp, run on every `dvc repro`); a stage's file
    changes only when an upgrade changes its code, and DVC then reruns that stage. Warns when the project was made
    by another version of picosam-pipeline than the installed one.
    """
    from picosam_pipeline.project_init import write_code_stamps

    _, warning = write_code_stamps()
    if warning:
        click.echo(f"warning: {warning}", err=True)


@cli.command("run-stage")
@click.argument("name", shell_complete=_complete_stage)
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help=SET_HELP)
@click.option(
    "--on-locked",
    type=click.Choice(["wait", "fail"]),
    default=None,
    envvar="PICOSAM_ON_LOCKED",
    help="When another run is writing the same outputs: wait for it (default) or fail at once, naming it "
    "(pid, host, start time). Also $PICOSAM_ON_LOCKED, e.g. for dvc repro.",
)
def run_stage_cmd(name: str, params_path: str, overrides: tuple[str, ...], on_locked: str | None) -> None:
    """Run pipeline stage NAME (see `picosam-pipeline stages`) with the given params.

    teacher-logits runs every teacher pass of params.yaml's `teachers`, one store each;
    teacher-logits@PASS runs one (what dvc.yaml's stage teacher-logits@PASS calls).

    The resolved config is validated before any work starts and saved beside the stage's outputs;
    metrics go to runtime.metrics_dir (default metrics/<stage>.json). A stage replaces only an output folder it
    wrote itself, holds a lock on it while it runs, and builds it beside it (<out>.partial) until it is complete.
    """
    from picosam_pipeline.output_lock import set_on_locked
    from picosam_pipeline.stages import STAGES

    set_on_locked(on_locked)

    stage, _, pass_name = name.partition("@")
    if stage not in STAGES:
        import difflib

        close = difflib.get_close_matches(stage, list(STAGES), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise PipelineError(
            f"unknown stage {name!r}; {hint}the stages are: {', '.join(STAGES)} (see `picosam-pipeline stages`)"
        )
    if pass_name and stage != "teacher-logits":
        raise PipelineError(
            f"stage {name!r}: only teacher-logits has named passes (teacher-logits@NAME); run {stage!r}"
        )
    try:
        from picosam_pipeline.config import load_config
        from picosam_pipeline.device import resolve_runtime

        cfg = load_config(params_path, overrides)
        configs = {stage: cfg}
        if stage == "teacher-logits" and (pass_name or cfg.teachers):
            # One store per teacher pass (params `teachers`); DVC runs each as its own stage teacher-logits@NAME.
            configs = {f"{stage}@{n}": cfg.teacher_pass(n) for n in ([pass_name] if pass_name else cfg.teachers)}
        runtime = resolve_runtime(cfg.runtime)
        click.echo(f"[{name}] device {runtime.describe()}", err=True)
        from picosam_pipeline.summary import stage_line

        run = STAGES[stage].load()
        for label, stage_cfg in configs.items():
            start = time.perf_counter()
            summary = run(stage_cfg, runtime)
            click.echo(stage_line(label, time.perf_counter() - start, summary), err=True)
    except BaseException as err:
        if not _caused_by_ctrl_c(err):
            raise
        _exit_interrupted(
            f"[{name}] interrupted; its output is as it was before this run (teacher-logits keeps its "
            "finished shards and train its last checkpoint: their rerun resumes)"
        )


@cli.command("score-predictions")
@click.option(
    "--annotations",
    required=True,
    help="COCO/LVIS instances JSON the predictions were made on (GT masks, boxes, areas, categories).",
)
@click.option(
    "--predictions",
    required=True,
    help="Predictions, per image one per non-crowd annotation in annotation JSON order: a COCO results JSON of "
    "image-frame RLE masks, or a crop-frame file (NAME.crop.json, or a list of crop-size RLE masks as in the "
    "PicoSAM2 reference files). evaluate.write_predictions writes both.",
)
@click.option(
    "--protocol",
    required=True,
    type=click.Choice(["picosam2-point", "picosam3-roi"]),
    help="Crop convention of the predictions: picosam2-point = 96-px window around the mask-centre point; "
    "picosam3-roi = bbox padded 10 %/side, squared.",
)
@click.option(
    "--frame",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "crop", "image"]),
    help="Frame of the masks; auto: a schema-marked file is crop frame, a list is told by its mask sizes.",
)
@click.option(
    "--images-dir",
    default=None,
    help="Image folder: score only images whose file exists there (the PicoSAM3/LVIS rule) and check their sizes "
    "against the JSON.",
)
@click.option(
    "--allow-partial",
    is_flag=True,
    help="Score the images without problems and skip (and count) the others, instead of refusing a file with "
    "bad entries (unknown images, wrong mask sizes, bad RLE, duplicate ids, misaligned predictions, scores that are "
    "missing or not finite).",
)
@click.option(
    "--json-out", default=None, help="Also write the figures (overall, by COCO size, by category) to this JSON file."
)
def score_predictions_cmd(
    annotations: str,
    predictions: str,
    protocol: str,
    frame: str,
    images_dir: str | None,
    allow_partial: bool,
    json_out: str | None,
) -> None:
    """Score predictions with the PicoSAM papers' crop-space metrics (crop frame) or COCO segm AP (image frame).

    Crop frame: crop mIoU = mean per-sample IoU in the 96x96 crop (mask vs NEAREST-resized GT, empty union = 1);
    crop mAP@[.5:.95] = share of non-empty-GT samples with IoU >= t, averaged over t = .50:.05:.95
    (a success rate, not COCO AP). Both frames: the full-image mIoU (crop masks pasted into the image, as
    evaluate reports it) and a size breakdown. Image frame: COCOeval's segm AP on the scored images.
    A file with problems is refused with a count of each kind, unless --allow-partial.
    """
    import json
    from pathlib import Path

    from picosam_pipeline.evaluate.prediction_scoring import format_prediction_scores, score_predictions
    from picosam_pipeline.outputs import atomic_write_bytes
    from picosam_pipeline.written_paths import check_output_file, json_written_by

    if json_out:  # before the scoring: a bad --json-out must not cost the work
        check_output_file(
            "score-predictions",
            "--json-out",
            json_out,
            inputs={"--annotations": annotations, "--predictions": predictions, "--images-dir": images_dir},
            recognise=lambda path: json_written_by(path, "score-predictions"),
            what="JSON report",
        )
    report = score_predictions(annotations, predictions, protocol, images_dir, frame=frame, allow_partial=allow_partial)
    if "skipped" in report:
        click.echo(
            f"warning: partial scoring skipped {report['skipped']['entries']} entries "
            f"({report['skipped']['problems']})",
            err=True,
        )
    click.echo(format_prediction_scores(report))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"written_by": SCORE_STAMP} | report, indent=2) + "\n"
        atomic_write_bytes(json_out, text.encode())


@cli.command("fetch")
@click.argument("asset_names", nargs=-1, metavar="ASSET|DATASET...")
@click.option(
    "--list",
    "list_assets",
    is_flag=True,
    help="Print the asset table (name, size, destination, URL, sha256 and its source) and exit.",
)
@click.option(
    "--dest-root",
    default="data",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder the destinations are relative to; the default puts assets where params.yaml expects them.",
)
@click.option(
    "--url",
    default=None,
    help="Download from this URL instead of the official one (a mirror, or file:///path); needs exactly one ASSET. "
    "The sha256 check is unchanged.",
)
@click.option(
    "--sha256",
    "sha256",
    default=None,
    metavar="HEX",
    help="Expect this sha256 instead of the published or recorded one; needs exactly one ASSET.",
)
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=_FiniteFloatRange(min=0.1),
    help="Seconds to wait for a connection or for more data before giving up.",
)
@click.option(
    "--resumes",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="How often a transfer that breaks off is resumed automatically (HTTP Range); the .part file is kept "
    "either way.",
)
@click.option(
    "--keep-archives",
    is_flag=True,
    help="Keep downloaded zip files after unpacking (default: delete them; COCO train is 19 GB).",
)
@click.option(
    "--track",
    is_flag=True,
    help="Then `dvc add` what was fetched (a dataset's folder, a checkpoint file) so that `dvc push` shares it and "
    "a teammate's `dvc pull` gets the same bytes; prints the git add command for the .dvc files.",
)
def fetch_cmd(
    asset_names: tuple[str, ...],
    list_assets: bool,
    dest_root: str,
    url: str | None,
    sha256: str | None,
    timeout: float,
    resumes: int,
    keep_archives: bool,
    track: bool,
) -> None:
    """Download COCO 2017, LVIS v1 annotations and SAM2.1 checkpoints to where params.yaml expects them.

    A DATASET (coco2017, lvis_v1) fetches all its assets into DEST_ROOT/datasets/NAME, ready for
    `dataset.name: NAME` (lvis_v1 hard-links the COCO images). Each ASSET (see --list) streams into
    FILE.part; rerunning resumes it with an HTTP Range request. The sha256 is checked before the file is
    renamed into place (a mismatch removes the .part), archives are unpacked under DEST_ROOT/datasets, and
    an asset already in place is verified and skipped. Assets without a
    published sha256 (SAM2.1 small, base_plus, large) are trusted on first use: the digest of the first
    complete download is recorded in DEST_ROOT/assets.lock.json (commit it) and later downloads must match.
    Offline, it fails within seconds and says what to download by hand and where to put it.
    """
    from picosam_pipeline.data import fetch

    if list_assets:
        click.echo(fetch.format_table(dest_root))
        return
    if not asset_names:
        raise click.UsageError("name at least one ASSET; `picosam-pipeline fetch --list` shows them")
    if (url or sha256) and len(asset_names) != 1:
        raise click.UsageError("--url and --sha256 apply to a single ASSET; fetch the others in separate commands")
    if (url or sha256) and asset_names[0] in fetch.DATASETS:
        raise click.UsageError("--url and --sha256 apply to a single ASSET, not a whole dataset")
    try:
        for asset in fetch.expand(asset_names):
            click.echo(
                fetch.fetch(
                    asset,
                    dest_root,
                    url=url,
                    sha256=sha256,
                    timeout=timeout,
                    resumes=resumes,
                    keep_archive=keep_archives,
                )
            )
        for name in asset_names:
            if name in fetch.SHARED_IMAGES:
                click.echo(fetch.link_images(dest_root, name))
        if track:
            click.echo(fetch.track(fetch.tracked_paths(asset_names, dest_root)))
    except KeyboardInterrupt:
        _exit_interrupted("[fetch] interrupted; the .part file is kept and rerunning the same command resumes it")


@cli.command("model-summary")
@click.argument("name")
@click.option(
    "--input-size",
    default=96,
    show_default=True,
    type=int,
    help="Square input side in pixels for the MAC count; a multiple of 16 (the papers use 96).",
)
def model_summary_cmd(name: str, input_size: int) -> None:
    """Print student NAME's parameters, MACs at the input size and float32 / int8 sizes.

    NAME is picosam2 or picosam3. Sizes are shown beside the figures the PicoSAM2 / PicoSAM3 papers publish. Runs one
    forward pass on CPU with fresh weights; no checkpoint or data needed.
    """
    from picosam_pipeline.train.students import format_student_summary, summarize_student

    click.echo(format_student_summary(summarize_student(name, input_size=input_size)))


@cli.command("inspect")
@click.argument("path", type=click.Path())
@click.option(
    "--scan",
    default=20_000,
    show_default=True,
    help="Instances read (whole shards, spread over the store) for the logit ranges; 0 = all.",
)
def inspect_cmd(path: str, scan: int) -> None:
    """Summarise the teacher-logit store at PATH: counts, bytes per instance, codec, teacher, value ranges.

    Every complete shard's files are first checked against the digest the teacher recorded (a lost or altered
    chunk file, or a shard of another pass); a failing shard is named and the command exits with status 1.
    """
    from picosam_pipeline.teacher.store import open_store
    from picosam_pipeline.teacher.summary import format_store_summary, summarize_store

    store = open_store(path)
    failing = store.failing_shards()
    if failing:
        lines = [
            f"  shard {k} (rows {store.shard_slice(k).start}:{store.shard_slice(k).stop}): {store.shard_problem(k)}"
            for k in failing[:20]
        ]
        raise PipelineError(
            f"{path}: {len(failing)} of {store.n_shards} shards fail their digest:\n"
            + "\n".join(lines)
            + ("\n  ..." if len(failing) > 20 else "")
            + "\nRerun the teacher stage (it rewrites exactly these shards), or `dvc checkout` / `dvc pull` the store"
        )
    click.echo(f"digests     all {int(store.done_shards().sum())} complete shards match their recorded sha256")
    report, random_weights = format_store_summary(store, summarize_store(store, max_scan=scan))
    click.echo(report)
    if random_weights:
        click.echo(
            "WARNING: these logits come from a teacher with RANDOM WEIGHTS (no checkpoint): fine for "
            "tests, useless for distillation. Fetch the checkpoint and rerun the teacher stage.",
            err=True,
        )


@cli.command("check-params")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help=SET_HELP)
@click.option(
    "--stamp",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also write this file when the params pass (what dvc.yaml's first stage writes: every stage depends on it, "
    "so DVC stops at a bad params file before it removes any stage's output).",
)
def check_params_cmd(params_path: str, overrides: tuple[str, ...], stamp: str | None) -> None:
    """Check the whole params file before any stage runs: every section, every teacher pass, the recipe's pairing
    of student and crops, and every path a stage writes (against the project and each other).

    `dvc repro` and `dvc exp run` run it first (stage check-params), so a mistake in a later stage's params
    (`-S train.student=picosam2` under recipe picosam3) stops the run before DVC removes any output.
    """
    from pathlib import Path

    from picosam_pipeline.config import load_config
    from picosam_pipeline.outputs import atomic_write_bytes
    from picosam_pipeline.written_paths import check_config_paths

    cfg = load_config(params_path, overrides)
    for name in cfg.teachers:
        cfg.teacher_pass(name)
    check_config_paths(cfg)
    click.echo(f"{params_path}: every section, teacher pass, pairing and written path checked", err=True)
    if stamp:
        Path(stamp).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(stamp, b"params checked by picosam-pipeline check-params\n")


@cli.command("doctor")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help=SET_HELP)
def doctor_cmd(params_path: str, overrides: tuple[str, ...]) -> None:
    """Check what this machine can run: the extras (sam2, sam3, MCT, converter), CUDA, the teacher checkpoints
    of the params' teacher passes, the IMX500 converter and Java 17.

    Prints one line per check (OK / WARN / FAIL). Exits 1 when a check fails (something params.yaml asks for
    is missing, e.g. a teacher checkpoint with random weights not allowed); warnings alone exit 0.
    """
    from picosam_pipeline.doctor import format_checks, run_checks

    checks = run_checks(params_path, overrides)
    click.echo(format_checks(checks))
    if any(c.status == "fail" for c in checks):
        sys.exit(1)


@cli.command("summary")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (every row with its metrics).")
def summary_cmd(params_path: str, as_json: bool) -> None:
    """Print the headline numbers of every stage that has run, one row per stage, in 100 columns.

    Reads metrics/<stage>.json (runtime.metrics_dir) and, where needed, each stage's report.json and
    config.resolved.json: per stage the one to three numbers that matter and where they came from (dataset,
    recipe, teacher model); a stage without metrics is "not run". A banner on top says when a teacher had
    random weights (a smoke test). `make repro` ends with it.
    """
    import json

    from picosam_pipeline.config import load_config
    from picosam_pipeline.summary import format_summary, summarize

    summary = summarize(load_config(params_path))
    click.echo(json.dumps(summary.to_dict(), indent=1) if as_json else format_summary(summary))


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion_cmd(shell: str) -> None:
    """Print the shell completion script for SHELL (commands, options, and stage names for run-stage).

    bash: add `eval "$(picosam-pipeline completion bash)"` to ~/.bashrc (zsh: ~/.zshrc with zsh; fish:
    `picosam-pipeline completion fish > ~/.config/fish/completions/picosam-pipeline.fish`). The script is click's
    (`_PICOSAM_PIPELINE_COMPLETE={shell}_source picosam-pipeline` prints the same).
    """
    from click.shell_completion import get_completion_class

    comp = get_completion_class(shell)(cli, {}, "picosam-pipeline", "_PICOSAM_PIPELINE_COMPLETE")
    click.echo(comp.source())


def _numbers(text: str | None, count: int, option: str, form: str) -> tuple[float, ...] | None:
    """Parse ``--box`` / ``--point`` values ``"a,b,..."`` into ``count`` floats (None when not given)."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count or not all(math.isfinite(v) for v in values):  # float() reads "nan" and "inf"
        raise click.BadParameter(
            f"expected {form} ({count} comma-separated finite numbers), got {text!r}", param_hint=option
        )
    return values


@cli.command("predict")
@click.option(
    "--model",
    "model_path",
    default=None,
    help="Student checkpoint written by the train stage, or an exported ONNX model (.onnx, run with onnxruntime "
    "on the CPU). Default: evaluate.checkpoint of params.yaml (data/train/student_best.pt, the best val IoU; "
    "data/train/student.pt is the last step).",
)
@click.option(
    "--image",
    "image_path",
    required=True,
    help="Image file (any format PIL reads; an EXIF rotation is applied, as a viewer shows it).",
)
@click.option(
    "--box",
    default=None,
    metavar="X,Y,W,H",
    help="Box prompt in image pixels (COCO x,y,w,h), for a model trained on PicoSAM3 ROI crops: the box padded "
    "10 %/side and squared.",
)
@click.option(
    "--point",
    default=None,
    metavar="X,Y",
    help="Point prompt in image pixels, for a model trained on PicoSAM2 point crops: a 96-px window around the point.",
)
@click.option(
    "--out",
    "mask_out",
    default="mask.png",
    show_default=True,
    help="Mask PNG in the image frame (8-bit, 255 = object).",
)
@click.option(
    "--overlay",
    "overlay_out",
    default="overlay.png",
    show_default=True,
    help="Overlay PNG: the image with the mask in red, the crop box in yellow, the prompt in cyan. "
    "Empty string: no overlay.",
)
@click.option(
    "--roi-padding",
    default=None,
    type=_FiniteFloatRange(0.0, 1.0, max_open=True),
    help="Box prompts: fraction of w/h added per side before squaring. Default: what the model recorded (0.1).",
)
@click.option(
    "--window",
    default=None,
    type=click.IntRange(min=1),
    help="Point prompts: window side in image pixels. Default: what the model recorded (96).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto | cpu | cuda | cuda:N, for checkpoints (ONNX runs on the CPU).",
)
def predict_cmd(
    model_path: str | None,
    image_path: str,
    box: str | None,
    point: str | None,
    mask_out: str,
    overlay_out: str,
    roi_padding: float | None,
    window: int | None,
    device: str,
) -> None:
    """Segment the object a box or point prompt names in one image, with a trained student.

    Crops the image as in training (box: PicoSAM3 ROI; point: PicoSAM2 window), runs the student on the
    96x96 crop, resizes the logits back into the crop box and pastes them into the image frame. Writes the
    full-size mask and an overlay, and prints the crop box and the mask area. The prompt must be the kind the
    model was trained with (recorded in the model); the other kind is refused.
    """
    from picosam_pipeline.config import RuntimeConfig
    from picosam_pipeline.device import resolve_runtime
    from picosam_pipeline.evaluate.predict import load_crop_model, predict_to_files, prompt_settings

    box_xywh = _numbers(box, 4, "--box", "X,Y,W,H")
    point_xy = _numbers(point, 2, "--point", "X,Y")
    if (box_xywh is None) == (point_xy is None):
        raise click.UsageError("give exactly one prompt: --box X,Y,W,H or --point X,Y")
    from picosam_pipeline.untrusted import require_regular_file

    # before the model loads, in this command's words (the stages' message for a missing image names a dataset split)
    require_regular_file(image_path, f"--image {image_path!r}")
    if model_path is None:
        from pathlib import Path

        from picosam_pipeline.config import load_config

        if not Path("params.yaml").is_file():
            raise click.UsageError("give --model PATH (there is no params.yaml here to take evaluate.checkpoint from)")
        model_path = load_config("params.yaml").evaluate.checkpoint
        click.echo(f"model: {model_path} (evaluate.checkpoint of params.yaml)", err=True)
    runtime = resolve_runtime(RuntimeConfig(device=device, precision="fp32"))
    model = load_crop_model(model_path, runtime)
    roi_padding, window, notes = prompt_settings(
        model, box=box_xywh, point=point_xy, roi_padding=roi_padding, window=window
    )
    result = predict_to_files(
        model,
        image_path,
        mask_out,
        overlay_out or None,
        box=box_xywh,
        point=point_xy,
        roi_padding=roi_padding,
        window=window,
        model_path=model_path,
    )
    for note in notes + result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(
        f"crop box {tuple(result.crop_box)} (x1, y1, x2, y2) -> {model.input_size}x{model.input_size} crop; "
        f"mask {int(result.mask.sum())} px -> {mask_out}" + (f", overlay -> {overlay_out}" if overlay_out else "")
    )


@cli.command("export-teacher")
@click.option("--params", "params_path", default="params.yaml", show_default=True, help=PARAMS_HELP)
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help=SET_HELP)
def export_teacher_cmd(params_path: str, overrides: tuple[str, ...]) -> None:
    """Export the configured SAM2 / SAM2.1 teacher to ONNX (encoder + prompt decoder) for teacher.backend=onnxruntime.

    The files go to teacher.onnx_dir/<model>-<key>/, keyed by the model, the weights' sha256 (or the random-weights
    seed) and the exporter settings, with a manifest of their sha256; an existing export is checked, not redone.
    The teacher stage exports on first use anyway: this command does it ahead of time (e.g. once per team).
    """
    from picosam_pipeline.config import load_config
    from picosam_pipeline.device import resolve_runtime
    from picosam_pipeline.teacher.sam2_onnx import export_teacher, read_manifest

    cfg = load_config(params_path, overrides)
    folder = export_teacher(cfg.teacher, resolve_runtime(cfg.runtime))
    manifest = read_manifest(folder)  # export_teacher has checked the files
    click.echo(f"{cfg.teacher.model} ({manifest['settings']['weights']}) -> {folder}")
    for name, entry in manifest["files"].items():
        click.echo(f"  {name:<13} {entry['bytes'] / 2**20:7.1f} MiB  sha256 {entry['sha256']}")


@cli.command("verify-logits")
@click.argument("path", type=click.Path())
@click.option(
    "--sample",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Random finished instances to recompute with the teacher (each sampled image is encoded once).",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random instance sample.")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto | cpu | cuda | cuda:N. The precision is the one the store records.",
)
@click.option(
    "--index", default=None, help="Instance index the store was made from (default: the path the store records)."
)
@click.option(
    "--checkpoint",
    default=None,
    help="Teacher checkpoint (default: the path the store records); refused unless its sha256 is the recorded one.",
)
@click.option(
    "--tolerance",
    default=1e-4,
    show_default=True,
    type=_FiniteFloatRange(min=0.0),
    help="Sigmoid difference allowed on top of the codec's bound, for teacher recomputation noise (raise it "
    "to check a GPU/bf16 store on another device).",
)
@click.option(
    "--backend",
    default=None,
    type=click.Choice(["torch", "onnxruntime"]),
    help="Recompute with this teacher backend instead of the one the store records: cross-checks a store "
    "made with onnxruntime against PyTorch, or the other way round.",
)
@click.option(
    "--onnx-dir",
    default=None,
    help="Cache of exported ONNX teachers for --backend onnxruntime (default: teacher.onnx_dir's default, "
    "data/teacher/onnx).",
)
def verify_logits_cmd(
    path: str,
    sample: int,
    seed: int,
    device: str,
    index: str | None,
    checkpoint: str | None,
    tolerance: float,
    backend: str | None,
    onnx_dir: str | None,
) -> None:
    """Recompute random instances of the teacher-logit store at PATH and report the largest differences.

    Rebuilds the teacher from the configuration the store records (refusing a checkpoint whose sha256, or a
    random-weight teacher whose weights digest, differs from the recorded one), rereads the index rows the store
    was made from, and compares: share of bit-identical stored values, largest logit difference after the codec,
    largest sigmoid difference against the float32 teacher, and decision flips. Exits 1 when the sigmoid
    difference exceeds the codec's bound plus --tolerance.
    """
    from picosam_pipeline.teacher.verify import verify_store

    report = verify_store(
        path,
        sample,
        seed=seed,
        device=device,
        index=index,
        checkpoint=checkpoint,
        tolerance=tolerance,
        backend=backend,
        onnx_dir=onnx_dir,
    )
    click.echo(report.format())
    if not report.ok:
        sys.exit(1)


# Third-party warnings that say nothing the user can act on: torch's tracer warnings while MCT and the ONNX export
# trace the student (the export stage checks the traced graph against the torch model itself).
_NOISE = ("TracerWarning",)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, ``warning: TEXT (Category)``: the user's words, not the source line that raised it
    (nothing for :data:`_NOISE`; matched by name so that the CLI does not import torch to start)."""
    if category.__name__ in _NOISE:
        return ""
    return f"warning: {message} ({category.__name__})\n"


def main() -> None:
    """Console-script entry point."""
    warnings.formatwarning = _one_line_warning
    try:
        with _recording_ctrl_c():
            cli(standalone_mode=True)
    except Exception as err:
        if _caused_by_ctrl_c(err):  # a command without its own interrupt message
            _exit_interrupted("interrupted")
        traceback.print_exc()  # a bug: keep the traceback, it is what a maintainer needs
        sys.exit(2)


if __name__ == "__main__":
    main()
