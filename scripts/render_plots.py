"""Render `dvc plots show` in headless Chromium and check that every plot drew something.

    .venv/bin/python scripts/render_plots.py [--repo .] [--out data/plots_render] [--js-dir DIR]

Runs ``dvc plots show`` in ``--repo`` with an HTML template that loads Vega, Vega-Lite and vega-embed from local
files (``--js-dir``; by default ``npm pack`` fetches the versions DVC's own page uses from the npm registry into
``~/.cache/picosam-pipeline/vega``) instead of a CDN, and draws every plot as SVG. Chromium (Debian's ``chromium``)
then loads the page twice: ``--dump-dom`` to count the drawn marks (bars, points, line segments) of each plot, and
``--screenshot`` for a person to look at (``<out>/screenshot.png``). Prints one line per plot and exits 1 when a
Vega plot drew no mark or an image plot is missing; exits 2 (and says why) when Chromium or the scripts are not
to be had.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The versions `dvc plots show` loads from its CDN (dvc_render/vega.py).
VEGA_PACKAGES = {
    "vega": ("5.20.2", "build/vega.min.js"),
    "vega-lite": ("5.2.0", "build/vega-lite.min.js"),
    "vega-embed": ("6.18.2", "build/vega-embed.min.js"),
}
CACHE = Path.home() / ".cache" / "picosam-pipeline" / "vega"

TEMPLATE = (
    """<!DOCTYPE html>
<html>
<head>
  <meta charset="utf-8">
  <title>picosam-pipeline plots</title>
  <script src="{js}/vega.min.js"></script>
  <script src="{js}/vega-lite.min.js"></script>
  <script src="{js}/vega-embed.min.js"></script>
  <script>
    // SVG instead of canvas, so that the drawn marks are in the DOM and can be counted.
    const embedWith = vegaEmbed;
"""
    '    window.vegaEmbed = (el, spec, opts) => embedWith(el, spec, Object.assign({{renderer: "svg", actions: false}}, '
    "opts || {{}}));\n"
    """  </script>
  <style>body {{ font-family: sans-serif; }} div {{ margin: 6px; }}</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""
)


class Unavailable(Exception):
    """Chromium, npm or the Vega scripts cannot be had here: the check cannot run (not a failed check)."""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise Unavailable("no headless Chromium on PATH (Debian: `apt-get install chromium`)")


def vega_scripts(js_dir: Path | None) -> Path:
    """A folder holding vega.min.js, vega-lite.min.js and vega-embed.min.js (fetched with `npm pack` when needed)."""
    folder = js_dir or CACHE
    wanted = {name: folder / Path(member).name for name, (_, member) in VEGA_PACKAGES.items()}
    if all(p.is_file() for p in wanted.values()):
        return folder
    if js_dir is not None:
        raise Unavailable(f"{js_dir} lacks {', '.join(p.name for p in wanted.values() if not p.is_file())}")
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable("no npm to fetch the Vega scripts, and none in --js-dir")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"{name}@{version}" for name, (version, _) in VEGA_PACKAGES.items()]
        done = subprocess.run(
            [npm, "pack", *specs, "--pack-destination", tmp], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise Unavailable(f"`npm pack {' '.join(specs)}` failed: {done.stderr.strip()[-300:]}")
        for name, (version, member) in VEGA_PACKAGES.items():
            with tarfile.open(Path(tmp) / f"{name}-{version}.tgz") as tar:
                wanted[name].write_bytes(tar.extractfile(f"package/{member}").read())
    return folder


def render(repo: Path, out: Path, js_dir: Path) -> Path:
    """``dvc plots show`` into ``out`` with the local-scripts template; returns the page."""
    out.mkdir(parents=True, exist_ok=True)
    template = out / "template.html"
    template.write_text(TEMPLATE.format(js=js_dir.resolve().as_uri()))
    dvc = shutil.which("dvc", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(
        [dvc, "plots", "show", "-o", str(out / "page"), "--html-template", str(template)],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"dvc plots show failed:\n{done.stdout}\n{done.stderr}")
    return out / "page" / "index.html"


def browse(page: Path, *args: str) -> str:
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=20000",
        *args,
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def count_marks(dom: str) -> dict[str, int]:
    """Drawn marks per plot div of the rendered page: ``{div id: marks}`` (images count 1 when their file exists)."""
    counts = {}
    for chunk in re.split(r'(?=<div id=")', dom)[1:]:
        plot_id = re.match(r'<div id="([^"]+)"', chunk).group(1)
        marks = len(re.findall(r'role="graphics-symbol"', chunk))
        if marks or "<img" not in chunk:  # an image plot's div: its file is checked in `check`
            counts[plot_id] = marks
    return counts


def check(repo: Path, out: Path, js_dir: Path | None, width: int = 1500, height: int = 7000) -> dict[str, int]:
    page = render(repo, out, vega_scripts(js_dir))
    dom = browse(page, "--dump-dom")
    (out / "dom.html").write_text(dom)
    marks = count_marks(dom)
    images = re.findall(r'<img[^>]+src="([^"]+)"', page.read_text())
    for src in images:
        marks[f"image {src}"] = int((page.parent / src).is_file())
    browse(page, f"--screenshot={out / 'screenshot.png'}", f"--window-size={width},{height}")
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="the DVC project (default: here)")
    parser.add_argument(
        "--out", type=Path, default=Path("data/plots_render"), help="where the page, DOM and screenshot go"
    )
    parser.add_argument(
        "--js-dir", type=Path, default=None, help="folder with vega.min.js, vega-lite.min.js, vega-embed.min.js"
    )
    parser.add_argument("--expect", nargs="*", default=[], help="plot ids that must be on the page")
    args = parser.parse_args()
    try:
        marks = check(args.repo, args.out.resolve(), args.js_dir)
    except Unavailable as why:
        print(f"render_plots: cannot check here: {why}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(marks, indent=1))
    empty = [k for k, n in marks.items() if n == 0]
    missing = [k for k in args.expect if k not in marks]
    print(f"{len(marks)} plots, screenshot {args.out / 'screenshot.png'}", file=sys.stderr)
    if empty or missing:
        print(f"render_plots: empty {empty}, missing {missing}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
