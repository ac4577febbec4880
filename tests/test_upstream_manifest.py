"""The installed `sam2` is Meta's code: scripts/upstream_manifest.py compares its files with the committed manifest
of facebookresearch/sam2 at 2b90b9f (requirements/upstream/sam2.txt) and names every changed, extra or missing
file; the manifest builder's rules (symlinks, what setuptools ships) on a small git repository made here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.helpers.paths import REPO, load_script

MANIFEST = REPO / "requirements/upstream/sam2.txt"


um = load_script("upstream_manifest")


def test_manifest_is_of_the_reviewed_commit():
    manifest = um.read(MANIFEST)
    assert manifest.repository == "facebookresearch/sam2"
    assert manifest.commit == "2b90b9f5ceec907a1c18123530e92e794ad901a4"
    assert manifest.distribution == "sam2==1.1.0"
    assert "sam2/build_sam.py" in manifest.files and "sam2/configs/sam2.1/sam2.1_hiera_t.yaml" in manifest.files
    # every upstream file of the imported package must be installed
    assert all(f.shipped for p, f in manifest.files.items() if p.startswith("sam2/"))


def test_installed_sam2_equals_upstream():
    problems, absent = um.check(um.read(MANIFEST))
    assert problems == [], problems
    assert set(absent) <= {p for p, f in um.read(MANIFEST).files.items() if not f.shipped}


def test_cli_passes_on_the_install_and_fails_on_an_edited_copy(tmp_path: Path):
    site = Path(metadata.distribution("sam2").locate_file(""))
    for top in ("sam2", "training"):
        shutil.copytree(site / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, str(REPO / "scripts/upstream_manifest.py"), "check", str(MANIFEST), "--root", str(tmp_path)]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "sam2 matches facebookresearch/sam2 at 2b90b9f5ceec: 60 files equal" in ok.stdout

    edited = tmp_path / "sam2/modeling/sam/mask_decoder.py"
    edited.write_text(edited.read_text() + "\nimport os  # one line added\n")
    failed = subprocess.run(cmd, capture_output=True, text=True)
    assert failed.returncode == 1
    assert "1 difference(s)" in failed.stderr and "changed: sam2/modeling/sam/mask_decoder.py" in failed.stderr


def test_copy_with_extra_and_missing_files_is_named(tmp_path: Path):
    site = Path(metadata.distribution("sam2").locate_file(""))
    for top in ("sam2", "training"):
        shutil.copytree(site / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "sam2/utils/extra.py").write_text("print('not upstream')\n")
    (tmp_path / "sam2/configs/sam2.1/sam2.1_hiera_t.yaml").unlink()
    (tmp_path / "training/loss_fns.py").unlink()
    (tmp_path / "sam2/__pycache__").mkdir()
    (tmp_path / "sam2/__pycache__/x.cpython-311.pyc").write_bytes(b"ignored")
    problems, _ = um.check(um.read(MANIFEST), tmp_path)
    assert problems == [
        "extra: sam2/utils/extra.py (not in the upstream tree)",
        "missing: sam2/configs/sam2.1/sam2.1_hiera_t.yaml",
        "missing: training/loss_fns.py",
    ]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_build_records_symlinks_by_target_content_and_what_setuptools_ships(tmp_path: Path):
    repo = tmp_path / "up"
    files = {
        "pkg/__init__.py": "",
        "pkg/configs/a.yaml": "a: 1\n",
        "pkg/core.py": "X = 1\n",
        "tools/__init__.py": "",
        "tools/run.py": "",
        "tools/README.md": "hi\n",
        "tools/scripts/job.py": "",
        "elsewhere/ignored.py": "",
    }
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    (repo / "pkg/a.yaml").symlink_to("configs/a.yaml")
    _git(repo.parent, "init", "-q", str(repo))
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-q", "-m", "up")
    manifest = um.build(str(repo / ".git"), "HEAD", "someone/up", "up==1.0", ["pkg"], ["tools"])
    out = tmp_path / "up.txt"
    um.write(manifest, out)
    back = um.read(out)
    assert back.files == manifest.files and back.commit == manifest.commit and len(back.commit) == 40
    assert set(back.files) == {p for p in files if not p.startswith("elsewhere/")} | {"pkg/a.yaml"}
    assert back.files["pkg/a.yaml"].link == "configs/a.yaml"
    assert back.files["pkg/a.yaml"].sha256 == back.files["pkg/configs/a.yaml"].sha256
    shipped = {p for p, f in back.files.items() if f.shipped}
    assert shipped == {
        "pkg/__init__.py",
        "pkg/configs/a.yaml",
        "pkg/core.py",
        "pkg/a.yaml",
        "tools/__init__.py",
        "tools/run.py",
    }

    # An install as a wheel lays it out: the symlink becomes a copy, unshipped files are absent.
    site = tmp_path / "site"
    for rel in shipped:
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes((repo / rel).read_bytes())
    problems, absent = um.check(back, site)
    assert problems == [] and absent == ["tools/README.md", "tools/scripts/job.py"]


def test_sam2_manifest_equals_a_rebuild_from_the_upstream_mirror(tmp_path: Path):
    """Where a git mirror of facebookresearch/sam2 is at hand (UPSTREAM_SAM2_GIT), the committed manifest is what
    the builder makes of it."""
    git_dir = os.environ.get("UPSTREAM_SAM2_GIT")
    if not git_dir:
        pytest.skip("set UPSTREAM_SAM2_GIT to a git directory of facebookresearch/sam2 to rebuild the manifest")
    committed = um.read(MANIFEST)
    rebuilt = um.build(
        git_dir,
        committed.commit,
        committed.repository,
        committed.distribution,
        committed.complete,
        [t for t in committed.tops if t not in committed.complete],
    )
    out = tmp_path / "sam2.txt"
    um.write(rebuilt, out)
    assert out.read_text() == MANIFEST.read_text()
