"""Render the offline plot page (`picosam-pipeline plots`) in headless Chromium and check every plot drew something.

    .venv/bin/python scripts/render_plots.py [--repo .] [--out data/plots_render] [--js-dir DIR] [--expect ID...]

Builds the page of ``--repo``'s plots with :mod:`picosam_pipeline.plot_page` (Vega, Vega-Lite and vega-embed
inlined: from ``--js-dir``, vl-convert-python, or else the versions DVC's own page uses, fetched once with ``npm
pack`` into ``~/.cache/picosam-pipeline/vega``). Chromium (Debian's ``chromium``) then loads the page twice with no
network: ``--dump-dom`` to count the drawn marks (bars, points, lines) of each plot and the decoded images, and
``--screenshot`` for a person to look at (``<out>/screenshot.png``). Prints the marks per plot id and exits 1 when a
plot drew nothing or an expected one is missing; exits 2 (and says why) when Chromium or the scripts are not to be
had.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from picosam_pipeline import plot_page

# The versions `dvc plots show` loads from its CDN (dvc_render/vega.py): the fallback when vl-convert is absent.
VEGA_PACKAGES = {
    "vega": ("5.20.2", "build/vega.min.js"),
    "vega-lite": ("5.2.0", "build/vega-lite.min.js"),
    "vega-embed": ("6.18.2", "build/vega-embed.min.js"),
}


class Unavailable(Exception):
    """Chromium, npm or the Vega scripts cannot be had here: the check cannot run (not a failed check)."""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise Unavailable("no headless Chromium on PATH (Debian: `apt-get install chromium`)")


def npm_scripts(folder: Path = plot_page.JS_CACHE) -> Path:
    """``folder`` holding vega.min.js, vega-lite.min.js and vega-embed.min.js, fetched with ``npm pack`` if needed."""
    wanted = {name: folder / Path(member).name for name, (_, member) in VEGA_PACKAGES.items()}
    if all(p.is_file() for p in wanted.values()):
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable("no vl-convert-python, no npm to fetch the Vega scripts, and no --js-dir")
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


def render(repo: Path, out: Path, js_dir: Path | None) -> Path:
    """The plot page of ``repo`` written to ``out/plots.html``; returns its path."""
    try:
        text, _ = plot_page.make_page(repo, js_dir=js_dir)
    except plot_page.ScriptsUnavailable as why:
        if js_dir is not None:
            raise Unavailable(str(why)) from None
        text, _ = plot_page.make_page(repo, js_dir=npm_scripts())
    out.mkdir(parents=True, exist_ok=True)
    page = out / "plots.html"
    page.write_text(text, encoding="utf-8")
    return page


def browse(page: Path, *args: str) -> str:
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=20000",
        # no network at all: a page that still reached for a CDN would draw nothing here
        "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>",
        *args,
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def sections(dom: str) -> dict[str, str]:
    """The plot sections of the rendered page: ``{plot id: its HTML}``."""
    found = {}
    for chunk in re.split(r'(?=<section class="plot")', dom)[1:]:
        chunk = chunk.split("</section>", 1)[0]
        found[re.search(r'data-plot-id="([^"]+)"', chunk).group(1)] = chunk
    return found


def count_marks(dom: str) -> dict[str, int]:
    """Drawn marks per plot of the rendered page that has data, ``{plot id: marks}``: Vega's drawn items, or the
    images that decoded (``data-loaded="1"``, set by the page)."""
    return {
        plot_id: len(re.findall(r'role="graphics-symbol"|data-loaded="1"', chunk))
        for plot_id, chunk in sections(dom).items()
        if 'data-status="no-data"' not in chunk.split(">", 1)[0]
    }


def without_data(dom: str) -> list[str]:
    """The plots of the rendered page that DVC found no data for (not run yet, say): not drawn, not counted."""
    return [plot_id for plot_id, chunk in sections(dom).items() if 'data-status="no-data"' in chunk.split(">", 1)[0]]


def check(repo: Path, out: Path, js_dir: Path | None, width: int = 1500, height: int = 7000) -> dict[str, int]:
    """Render ``repo``'s plot page into ``out`` and return its marks per plot (:func:`count_marks`)."""
    page = render(repo, out, js_dir)
    dom = browse(page, "--dump-dom")
    (out / "dom.html").write_text(dom, encoding="utf-8")
    marks = count_marks(dom)
    if skipped := without_data(dom):
        print(f"render_plots: no data (not drawn) for {', '.join(skipped)}", file=sys.stderr)
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
