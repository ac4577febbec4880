"""Sharing the pipeline's outputs through a DVC remote, by the README's recipe word for word.

The commands come from the README's sharing block (``<!-- sharing-recipe ... -->``), so the test fails when the
README changes without it. In a temporary git repository holding this project's dvc.yaml, code and params.yaml
(trimmed to one train and one val image, a few training steps): ``dvc repro`` (the whole pipeline), then your
commands; a teammate's clone runs theirs and ``dvc repro`` there must run no stage and leave ``dvc status``
clean. Then ``dvc exp run`` with other training steps and back restores ``train`` from DVC's run cache, and in
the teammate's clone one changed image (or a new checkpoint) marks exactly the stages that read it out of date.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.teacher_project import BIN, REPO

pytestmark = pytest.mark.slow

RECIPE_MARK = "<!-- sharing-recipe:"
README_REMOTE = "/shared/picosam-dvc"
STORE = Path("data/teacher/stores/sam2.zarr")


def sh(*args: str, cwd: Path) -> str:
    """Run a command (``dvc`` and ``picosam-pipeline`` from the test's environment first on PATH); its output."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def recipe() -> tuple[list[list[str]], list[list[str]]]:
    """The README's sharing commands: (yours, the teammate's), each split as a shell would, comments dropped."""
    text = (REPO / "README.md").read_text()
    assert RECIPE_MARK in text, "the README lost its sharing-recipe block"
    start = text.index("```bash\n", text.index(RECIPE_MARK)) + len("```bash\n")
    block = text[start : text.index("```", start)]
    yours: list[list[str]] = []
    theirs: list[list[str]] = []
    current = yours
    for line in block.splitlines():
        if line.startswith("# a teammate"):
            current = theirs
            continue
        words = shlex.split(line, comments=True)
        if words:
            current.append(words)
    return yours, theirs


def make_project(root: Path) -> None:
    """This project's pipeline files and code in ``root``, with params trimmed to a two-image sample."""
    root.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, root / name)
    for package in ("picosam_pipeline", "stages"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "data" / "checkpoints").mkdir(parents=True)  # in git: every clone has the teachers' checkpoint folder
    shutil.copy(REPO / "data" / "checkpoints" / "README.md", root / "data" / "checkpoints" / "README.md")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sample"].update(train_images=1, val_images=1, plant_bad_inputs=False)
    params["teacher"].update(instances_per_shard=8, executor="local", allow_random_weights=True)
    params["train"].update(steps=4, warmup_steps=1, eval_every=4, log_every=2, checkpoint_every=2)
    params["evaluate"].update(grid_samples=2)
    params["quantize"].update(representative_batches=2, probe_samples=4)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def outputs(root: Path) -> dict[str, bytes]:
    """Bytes of every file of the teacher store and of every metrics file."""
    files = [f for f in sorted((root / STORE).rglob("*")) if f.is_file()]
    files += sorted((root / "metrics").glob("*.json"))
    return {str(f.relative_to(root)): f.read_bytes() for f in files}


@pytest.fixture()
def s3_endpoint():
    """An S3 API on loopback (moto's server), with the bucket the S3 remote uses; yields its URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:  # a free port for the server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    ).create_bucket(Bucket="picosam")
    yield url
    server.stop()


def test_the_readme_recipe_restores_every_stage_in_a_teammates_clone(tmp_path, s3_endpoint, monkeypatch):
    yours, theirs = recipe()
    origin, first, second, remote = (tmp_path / n for n in ("origin.git", "first", "second", "remote"))
    sh("git", "init", "-q", "--bare", str(origin), cwd=tmp_path)
    make_project(first)
    sh("git", "init", "-q", cwd=first)
    sh("dvc", "init", "-q", cwd=first)
    sh("git", "add", "-A", cwd=first)
    sh("git", "commit", "-q", "-m", "project", cwd=first)
    sh("git", "remote", "add", "origin", str(origin), cwd=first)
    sh("git", "push", "-q", "-u", "origin", "HEAD", cwd=first)
    sh("git", "clone", "-q", str(origin), str(second), cwd=tmp_path)  # the teammate's clone, before any output

    out = sh("dvc", "repro", cwd=first)
    assert "Running stage 'package'" in out
    seconds = {}  # each recipe command's wall time, printed for the README / closing notes (`pytest -s`)
    for words in yours:
        start = time.perf_counter()
        sh(*[str(remote) if w == README_REMOTE else w for w in words], cwd=first)
        seconds[" ".join(words)] = time.perf_counter() - start
    # Nothing else was committed: the recipe's `git add` is all it takes.
    assert sh("git", "status", "--porcelain", "--untracked-files=no", cwd=first).strip() == ""

    said = []
    for words in theirs:
        start = time.perf_counter()
        said.append(sh(*words, cwd=second))
        seconds[f"teammate: {' '.join(words)}"] = time.perf_counter() - start
    print("sharing recipe timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    assert "Running stage" not in said[-1] and "[teacher-logits" not in said[-1], said[-1]
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=second)
    assert outputs(second) == outputs(first)

    # The same through an S3-style remote, configured as the README says (credentials outside git, here the
    # standard AWS variables; the endpoint of an S3-compatible store such as MinIO is a remote option): a third
    # clone pulls only from S3 (the folder remote is gone) and runs no stage either.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    sh("dvc", "remote", "add", "s3team", "s3://picosam/dvc", cwd=first)
    sh("dvc", "remote", "modify", "s3team", "endpointurl", s3_endpoint, cwd=first)
    sh("dvc", "push", "-r", "s3team", "--run-cache", cwd=first)
    shutil.rmtree(remote)
    third = tmp_path / "third"
    sh("git", "clone", "-q", str(origin), str(third), cwd=tmp_path)
    sh("dvc", "remote", "add", "--local", "-d", "s3team", "s3://picosam/dvc", cwd=third)
    sh("dvc", "remote", "modify", "--local", "s3team", "endpointurl", s3_endpoint, cwd=third)
    sh("dvc", "pull", "--run-cache", cwd=third)
    rerun = sh("dvc", "repro", cwd=third)
    assert "Running stage" not in rerun and "Data and pipelines are up to date" in sh("dvc", "status", cwd=third), rerun
    assert outputs(third) == outputs(first)

    # dvc exp run to other training steps and back: `train` comes back from the run cache, not retrained.
    changed = sh("dvc", "exp", "run", "-S", "train.steps=2", "train", cwd=first)
    assert "Running stage 'train'" in changed
    back = sh("dvc", "exp", "run", "-S", "train.steps=4", "train", cwd=first)
    assert "Running stage 'train'" not in back and "[train]" not in back, back

    # Nothing goes stale: the pixels of one image change -> every stage that reads images is out of date (the
    # index itself may come out byte-identical, so the images are direct dependencies of teacher and pack).
    image = sorted((second / "data/datasets/sample/val").glob("*.jpg"))[0]
    pixels = bytearray(image.read_bytes())
    pixels[-100] ^= 0xFF  # inside the entropy-coded data: the file still decodes, to other pixels
    image.write_bytes(bytes(pixels))
    stale = set(json.loads(sh("dvc", "status", "--json", cwd=second)))
    assert {"prepare", "teacher-logits@sam2", "pack"} <= stale, stale
    image.write_bytes(bytes(pixels[:-100]) + bytes([pixels[-100] ^ 0xFF]) + bytes(pixels[-99:]))
    assert json.loads(sh("dvc", "status", "--json", cwd=second)) == {}
    # A checkpoint fetched or pulled into data/checkpoints: the teacher passes must rerun, nothing before them.
    (second / "data/checkpoints/sam2.1_hiera_tiny.pt").write_bytes(b"weights")
    stale = set(json.loads(sh("dvc", "status", "--json", cwd=second)))
    assert "teacher-logits@sam2" in stale and "prepare" not in stale, stale
    assert "is cached" in back
