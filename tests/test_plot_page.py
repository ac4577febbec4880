"""`picosam-pipeline plots`: one self-contained page of dvc.yaml's plots that renders offline (issue 32).

The fast tests build the page of a small DVC project (the repository's dvc.yaml, plot templates and committed dvclive
files, and tiny files for the evaluation plots) with stand-in scripts: no http(s) source, every plot once, titles
and no raw paths, one colour per loss term. The slow test draws the page in headless Chromium with the real
scripts and counts each plot's marks (skipped, saying why, without Chromium).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from picosam_pipeline import plot_page
from picosam_pipeline.cli import cli
from tests.helpers.paths import REPO, load_script

STUB = "window.vega = window.vegaLite = {{}}; window.vegaEmbed = () => Promise.resolve(); // stand-in {name}\n"


def definitions() -> dict[str, dict | None]:
    """dvc.yaml's top-level plots in its order: id -> properties (None for an image path)."""
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    return dict(next(iter(p.items())) if isinstance(p, dict) else (p, None) for p in plots)


def make_project(root: Path) -> Path:
    """A DVC project (no git) with the repository's plots, the committed dvclive files and a tiny file for every
    other plot source: two rows with each x, y and the colour fields the templates read."""
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "metrics", root / "metrics")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([plot_page._dvc(), "init", "--no-scm", "-q"], cwd=root, check=True, env=env)
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    for plot_id, props in definitions().items():
        if props is None:
            (root / plot_id).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (0, 128, 0)).save(root / plot_id)
            continue
        for source, y in props["y"].items():
            if (root / source).exists():
                continue
            (root / source).parent.mkdir(parents=True, exist_ok=True)
            rows = [f"{props['x']},{y},model,teacher,ann_id", "0.25,0.5,student,sam2,1", "0.75,0.6,teacher,sam2,2"]
            (root / source).write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("plots") / "project")


@pytest.fixture(scope="module")
def stub_js(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("js")
    for name in plot_page.SCRIPT_FILES:
        (folder / name).write_text(STUB.format(name=name))
    return folder


@pytest.fixture(scope="module")
def built(project, stub_js) -> tuple[str, list[plot_page.Plot]]:
    return plot_page.make_page(project, js_dir=stub_js)


def test_page_is_self_contained(built, stub_js):
    text, _ = built
    assert not re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.IGNORECASE)
    assert "<link" not in text and "@import" not in text
    for name in plot_page.SCRIPT_FILES:  # inlined, not referenced
        assert f"// stand-in {name}" in text and f'src="{name}"' not in text
    images = re.findall(r'<img[^>]*src="([^"]*)"', text)
    assert images and all(src.startswith("data:image/png;base64,") for src in images), images


def test_every_plot_once_with_a_title_not_a_path(built):
    text, plots = built
    ids = re.findall(r'data-plot-id="([^"]+)"', text)
    assert ids == list(definitions()), ids  # dvc.yaml's order, each once, no dvclive file of its own
    for plot in plots:
        assert not plot.errors, (plot.id, plot.errors)
        assert plot.title and plot.title != plot.id, plot.id
        assert not re.search(r"\S+/\S+\.(tsv|csv|json|png)\b", plot.title), plot.title
        if plot.spec is not None:
            assert plot_page.spec_title(plot.spec) == plot.title
    nav = re.findall(r'<li><a href="#plot-\d+">([^<]+)</a></li>', text)
    assert len(nav) == len(ids)


def test_loss_terms_get_a_colour_each(built):
    _, plots = built
    spec = next(p.spec for p in plots if p.id == "train_loss")
    assert spec["encoding"]["color"]["field"] == "series"  # computed per row from the y field, not the revision
    series = {row["field"] for row in spec["data"]["values"]}
    assert series == {"loss", "gt", "teacher", "area"}, series
    assert "datum.field" in spec["transform"][0]["calculate"]


def test_a_plot_without_data_says_why_and_is_not_counted_as_drawn():
    plots = [
        plot_page.Plot("by_size", "Crop mIoU by size", spec={"title": "Crop mIoU by size", "mark": "bar"}),
        plot_page.Plot("float_vs_int8", "float_vs_int8", errors=["workspace: data/q.csv: No such file"]),
    ]
    text = plot_page.build_page(plots, [STUB.format(name="x")], "stand-in", "Plots")
    assert 'data-plot-id="float_vs_int8" data-status="no-data"' in text and "No such file" in text
    render = load_script("render_plots")
    drawn = text.replace('<div class="chart"></div>', '<div class="chart"><path role="graphics-symbol"/></div>')
    assert render.count_marks(drawn) == {"by_size": 1} and render.without_data(drawn) == ["float_vs_int8"]


def test_specs_and_scripts_cannot_end_their_script_element():
    assert plot_page._script("a</script>b</SCRIPT>c /</g") == "a<\\/script>b<\\/SCRIPT>c /</g"
    assert json.loads(plot_page._json({"t": "</script>"})) == {"t": "</script>"}
    assert "</" not in plot_page._json({"t": "</script>"})


def test_scripts_from_vl_convert_define_vega_embed():
    pytest.importorskip("vl_convert", reason="vl-convert-python is not installed: the page needs --js-dir")
    scripts, origin = plot_page.vega_scripts()
    assert "vl-convert-python" in origin and len(scripts) == 1
    assert "window.vegaEmbed=" in scripts[0].replace(" ", "") and "</script" not in scripts[0].lower()


def test_missing_scripts_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vl_convert", None)  # as if not installed
    monkeypatch.setattr(plot_page, "JS_CACHE", tmp_path / "none")
    with pytest.raises(plot_page.ScriptsUnavailable, match="vl-convert-python"):
        plot_page.vega_scripts()
    with pytest.raises(plot_page.ScriptsUnavailable, match="lacks vega.min.js"):
        plot_page.vega_scripts(tmp_path)


def test_cli_writes_the_page_and_keeps_a_foreign_file(project, stub_js, monkeypatch):
    monkeypatch.chdir(project)
    runner = CliRunner()
    done = runner.invoke(cli, ["plots", "--js-dir", str(stub_js)])
    assert done.exit_code == 0, done.output
    assert f"{len(definitions())} plots" in done.output
    assert plot_page.is_plot_page(project / "data" / "plots.html")
    done = runner.invoke(cli, ["plots", "--js-dir", str(stub_js)])  # its own page: replaced
    assert done.exit_code == 0, done.output
    (project / "notes.html").write_text("<p>mine</p>")
    done = runner.invoke(cli, ["plots", "-o", "notes.html", "--js-dir", str(stub_js)])
    assert done.exit_code == 1 and "not replaced" in done.output
    assert (project / "notes.html").read_text() == "<p>mine</p>"


@pytest.mark.slow
def test_every_plot_draws_in_headless_chromium(project, tmp_path):
    render = load_script("render_plots")
    try:
        render.chromium()
        marks = render.check(project, tmp_path / "render", None)
    except render.Unavailable as why:
        pytest.skip(f"the page cannot be drawn here: {why}")
    print(marks)
    assert list(marks) == list(definitions()), marks
    assert all(n > 0 for n in marks.values()), marks


def test_the_page_says_where_the_evaluated_student_comes_from(tmp_path):
    from picosam_pipeline.plot_page import build_page, evaluated_provenance

    assert evaluated_provenance(tmp_path) == ""  # nothing evaluated yet
    report = tmp_path / "data" / "evaluate" / "report.json"
    report.parent.mkdir(parents=True)
    teacher = {"name": "sam2", "model": "sam2.1_hiera_tiny", "weights": "random weights"}
    report.write_text(json.dumps({"provenance": {"teachers": [teacher], "dataset": "sample", "recipe": "picosam3"}}))
    line = evaluated_provenance(tmp_path)
    assert line.startswith("SMOKE TEST: not for deployment: ") and "RANDOM WEIGHTS" in line and "sample" in line
    assert f'<p class="provenance">{line}</p>' in build_page([], [], "test", "Plots", line)
