"""The project's DVC plots as one self-contained HTML page that renders offline (``picosam-pipeline plots``).

``dvc plots show --json`` (``dvc plots diff --json REV...`` when given revisions) fills dvc.yaml's plots with their
data; the page holds those Vega-Lite specs, the image plots as ``data:`` URIs, and Vega, Vega-Lite and vega-embed
inlined as ``<script>`` text. DVC's own page loads those three from a CDN, so offline it draws nothing but the images.

The scripts come from, in order: ``js_dir`` (a folder with vega.min.js, vega-lite.min.js and vega-embed.min.js), the
``vl-convert-python`` package (its ``javascript_bundle``: Vega, Vega-Lite and vega-embed with their dependencies, one
plain script, from the wheel, no network), or the folder ``scripts/render_plots.py`` fills with ``npm pack``.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from picosam_pipeline.errors import PipelineError

SCRIPT_FILES = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")  # in load order
JS_CACHE = Path.home() / ".cache" / "picosam-pipeline" / "vega"  # where scripts/render_plots.py puts npm's copies
VEGA_LITE_LINE = "5.21"  # vl-convert's newest Vega-Lite 5: dvc.yaml's templates and DVC's own are Vega-Lite 5 specs
GENERATOR = "picosam-pipeline plots"  # the page's <meta name="generator">: how `plots` knows a page it may replace
IMAGE_TITLES = {  # by file name; {stage}: the folder it is in
    "grid.png": "Qualitative grid of the {stage} stage (true positives green, false positives magenta, false "
    "negatives blue; the prompt marked)",
}
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml", ".gif": "image/gif"}


class ScriptsUnavailable(PipelineError):
    """Neither a scripts folder, nor vl-convert-python, nor the npm cache: the page could not draw its plots."""


@dataclass
class Plot:
    """One plot of the page: a Vega-Lite spec with its data, or images (one per revision), or only errors."""

    id: str  # dvc.yaml's plot name, or an image's path
    title: str
    spec: dict | None = None
    images: list[tuple[str, str, bytes]] = field(default_factory=list)  # (revision, file name, bytes)
    errors: list[str] = field(default_factory=list)


def _dvc() -> str:
    found = shutil.which("dvc", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        raise PipelineError("no `dvc` command beside this Python or on PATH; install dvc (a dependency of ours)")
    return found


def spec_title(spec: dict) -> str:
    """The title a Vega-Lite spec draws (``title`` as text or as ``{"text": ...}``), or ``""``."""
    title = spec.get("title", "")
    title = title.get("text", "") if isinstance(title, dict) else title
    return " ".join(title) if isinstance(title, list) else str(title)


def image_title(path: str) -> str:
    """A readable title for an image plot's path: ``data/evaluate/grid.png`` -> the evaluate stage's grid."""
    name, stage = Path(path).name, Path(path).parent.name
    if name in IMAGE_TITLES:
        return IMAGE_TITLES[name].format(stage=stage)
    return f"{Path(path).stem.replace('_', ' ').capitalize()} ({stage})"


def files_drawn_by_definitions(repo: Path) -> set[str]:
    """The data files that dvc.yaml's named top-level plots draw (the keys of their ``x`` and ``y``)."""
    try:
        pipeline = yaml.safe_load((Path(repo) / "dvc.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return set()
    files = set()
    for entry in pipeline.get("plots") or []:
        for definition in entry.values() if isinstance(entry, dict) else []:
            for axis in ("x", "y"):
                value = definition.get(axis) if isinstance(definition, dict) else None
                files |= set(value) if isinstance(value, dict) else set()
    return files


def collect(repo: Path, revs: tuple[str, ...] = ()) -> list[Plot]:
    """The plots of the DVC project ``repo`` in dvc.yaml's order, as ``dvc plots show`` (``diff`` for ``revs``)
    fills them; a plot whose data could not be read keeps DVC's error."""
    command = [_dvc(), "plots", *(("diff", *revs) if revs else ("show",)), "--json"]
    with tempfile.TemporaryDirectory(prefix="picosam-plots-") as tmp:
        # -o: the images DVC copies out go to tmp, not to a dvc_plots/ folder in the project
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        done = subprocess.run([*command, "-o", tmp], cwd=repo, capture_output=True, text=True, env=env)
        try:
            shown = json.loads(done.stdout)
        except json.JSONDecodeError:
            shown = None
        if done.returncode != 0 or not isinstance(shown, dict):
            why = (done.stderr or done.stdout).strip()[-800:]
            raise PipelineError(f"`dvc {' '.join(command[1:])}` in {repo} failed: {why}")
        errors: dict[str, list[str]] = {}
        for err in shown.get("errors") or []:
            where = f"{err.get('rev')}: {err.get('source')}"
            errors.setdefault(err.get("name", ""), []).append(f"{where}: {err.get('msg')}")
        plots = []
        drawn = files_drawn_by_definitions(repo)
        for plot_id, entries in shown.get("data", {}).items():
            if plot_id in drawn:  # a plots output's file that a named plot already draws: not twice, not by its path
                continue
            title = image_title(plot_id) if Path(plot_id).suffix.lower() in MIME else plot_id  # kept when no data
            plot = Plot(plot_id, title, errors=errors.get(plot_id, []))
            for entry in entries:
                if entry.get("type") == "vega":
                    plot.spec = entry["content"]
                    plot.title = spec_title(plot.spec) or plot_id
                elif entry.get("type") == "image":
                    url = Path(entry["url"])
                    for rev in entry.get("revisions") or ["workspace"]:
                        plot.images.append((rev, url.name, url.read_bytes()))
            if plot.spec is None and not plot.images and not plot.errors:
                plot.errors.append("no data")
            plots.append(plot)
    return plots


def vega_scripts(js_dir: Path | None = None) -> tuple[list[str], str]:
    """The JavaScript that defines ``vega``, ``vegaLite`` and ``vegaEmbed`` (one or more script texts, in load
    order) and where it came from; :class:`ScriptsUnavailable` when none of the sources in the module docstring
    has it."""
    if js_dir is not None:
        missing = [name for name in SCRIPT_FILES if not (js_dir / name).is_file()]
        if missing:
            raise ScriptsUnavailable(f"--js-dir {js_dir} lacks {', '.join(missing)}")
        return [(js_dir / name).read_text(encoding="utf-8") for name in SCRIPT_FILES], f"{js_dir}"
    try:
        import vl_convert
    except ImportError:
        vl_convert = None
    if vl_convert is not None:
        bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_LINE)
        # The bundle's top-level declarations would otherwise become globals of the page; it sets window.vega*.
        versions = f"Vega {vl_convert.get_vega_version()}, Vega-Lite {VEGA_LITE_LINE}, vega-embed "
        return [f"(() => {{\n{bundle}\n}})();"], versions + f"{vl_convert.get_vega_embed_version()} (vl-convert-python)"
    if all((JS_CACHE / name).is_file() for name in SCRIPT_FILES):
        return [(JS_CACHE / name).read_text(encoding="utf-8") for name in SCRIPT_FILES], f"{JS_CACHE}"
    raise ScriptsUnavailable(
        "the plot page needs Vega, Vega-Lite and vega-embed inlined and found none: install vl-convert-python "
        "(`pip install vl-convert-python`, it ships them), or pass --js-dir with vega.min.js, vega-lite.min.js and "
        f"vega-embed.min.js, or run scripts/render_plots.py once online (it fills {JS_CACHE} with npm)"
    )


def _script(text: str) -> str:
    # "</script" would end the element early; "<\/script" means the same in a JavaScript string, template or
    # regular expression (a general "</" -> "<\/" would break a regular expression such as /</g).
    return re.sub(r"</(script)", r"<\\/\1", text, flags=re.IGNORECASE)


def _json(value: object) -> str:
    # "</" only occurs inside JSON strings, where "<\/" is the same text: no "</script" can end the element.
    return json.dumps(value).replace("</", "<\\/")


EMBED = """(() => {
  const specs = JSON.parse(document.getElementById("plot-specs").textContent);
  for (const [id, spec] of Object.entries(specs)) {
    const box = document.getElementById(id), chart = box.querySelector(".chart");
    if (typeof vegaEmbed !== "function") { chart.textContent = "vega-embed did not load"; continue; }
    // SVG, not canvas: sharp when zoomed, and the drawn marks are in the DOM (scripts/render_plots.py counts them)
    vegaEmbed(chart, spec, {renderer: "svg", actions: false})
      .then(() => { box.dataset.status = "drawn"; })
      .catch((err) => { box.dataset.status = "error"; chart.textContent = "could not draw: " + err; });
  }
  for (const img of document.querySelectorAll("img")) {
    img.decode().then(() => { img.dataset.loaded = "1"; }, () => { img.dataset.loaded = "0"; });
  }
})();"""

STYLE = """body { font-family: sans-serif; margin: 16px; color: #222; }
nav ol { columns: 2; font-size: 90%; } .plot { margin: 18px 0; padding-top: 6px; border-top: 1px solid #ddd; }
h2 { font-size: 105%; margin: 4px 0; } .errors { color: #b00; font-size: 90%; } figure { margin: 6px 0; }
img { max-width: 100%; } figcaption, footer { color: #666; font-size: 85%; } .provenance { font-weight: bold; }"""


def build_page(plots: list[Plot], scripts: list[str], origin: str, heading: str, provenance: str = "") -> str:
    """The HTML text of the page: the provenance line (``provenance``: the evaluated student's, with the smoke-test
    warning when its teacher had random weights), a list of the plots, then one section each, and the inlined
    scripts."""
    esc = html.escape
    specs, sections, items = {}, [], []
    for n, plot in enumerate(plots, start=1):
        box = f"plot-{n}"
        items.append(f'<li><a href="#{box}">{esc(plot.title)}</a></li>')
        status = "" if plot.spec is not None or plot.images else ' data-status="no-data"'  # the page's JS sets others
        parts = [f'<section class="plot" id="{box}" data-plot-id="{esc(plot.id)}"{status}>']
        if plot.spec is not None:
            specs[box] = plot.spec  # the spec draws its own title
            parts.append('<div class="chart"></div>')
        else:
            parts.append(f"<h2>{esc(plot.title)}</h2>")
        for rev, name, data in plot.images:
            uri = f"data:{MIME.get(Path(name).suffix.lower(), 'application/octet-stream')};base64,"
            uri += base64.b64encode(data).decode("ascii")
            parts.append(f'<figure><img alt="{esc(plot.id)} ({esc(rev)})" src="{uri}"><figcaption>{esc(rev)}')
            parts.append("</figcaption></figure>")
        if plot.errors:
            parts.append(f'<p class="errors">missing data: {esc("; ".join(plot.errors))}</p>')
        sections.append("".join(parts) + "</section>")
    head = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
        f'<meta name="generator" content="{GENERATOR}">\n<title>{esc(heading)}</title>',
        f"<style>\n{STYLE}\n</style>",
        *(f"<script>\n{_script(text)}\n</script>" for text in scripts),
        "</head>\n<body>",
        f"<h1>{esc(heading)}</h1>",
        f'<p class="provenance">{esc(provenance)}</p>' if provenance else "",
        "<nav><ol>\n" + "\n".join(items) + "\n</ol></nav>",
    ]
    tail = [
        f"<footer>Drawn in this page by Vega: {esc(origin)}, inlined (no network needed).</footer>",
        f'<script type="application/json" id="plot-specs">{_json(specs)}</script>',
        f"<script>\n{EMBED}\n</script>\n</body>\n</html>\n",
    ]
    return "\n".join(head + sections + tail)


def is_plot_page(path: Path) -> bool:
    """Whether ``path`` is a page this module wrote (its generator meta tag in the first kilobytes)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f'<meta name="generator" content="{GENERATOR}">' in f.read(4096)
    except OSError:
        return False


def make_page(repo: Path, revs: tuple[str, ...] = (), js_dir: Path | None = None) -> tuple[str, list[Plot]]:
    """The page of ``repo``'s plots (of ``revs``, when given) and its plots; the scripts are found first, so that
    their absence stops before DVC runs."""
    scripts, origin = vega_scripts(js_dir)
    plots = collect(repo, revs)
    heading = f"Plots of {Path(repo).resolve().name}" + (f": {', '.join(revs)}" if revs else "")
    return build_page(plots, scripts, origin, heading, evaluated_provenance(repo)), plots


def evaluated_provenance(repo: Path) -> str:
    """The evaluated student's provenance (the evaluate stage's report.json), as the page's first line: the
    smoke-test warning first when its teacher had random weights; "" when nothing has been evaluated."""
    from picosam_pipeline.config import ConfigError, load_config
    from picosam_pipeline.provenance import Provenance
    from picosam_pipeline.untrusted import json_file_or_none

    params = Path(repo) / "params.yaml"
    try:
        out_dir = load_config(params if params.is_file() else None).evaluate.out_dir
    except ConfigError:
        return ""
    report = json_file_or_none(Path(repo) / out_dir / "report.json", 64 << 20)
    if not isinstance(report, dict) or "provenance" not in report:
        return ""
    facts = Provenance.from_dict(report["provenance"])
    return facts.line() if facts.smoke_test else f"Provenance: {facts.title()}"
