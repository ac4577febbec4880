"""The hash-locked environment (requirements/lock-*.txt, scripts/lockfile.py): the locks match their inputs, a
changed input without relocking is caught and named, and pip refuses a file whose hash is not in the lock with
a message that names it. Offline and fast: nothing is resolved again."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers.paths import REPO, load_script

lockfile = load_script("lockfile")


def test_locks_match_requirements_and_pyproject():
    problems = lockfile.check(REPO)
    assert not problems, "run `make lock`, review, commit:\n" + "\n".join(problems)


def test_every_lock_entry_is_pinned_and_hashed():
    for variant in lockfile.VARIANTS:
        entries = lockfile.parse_lock(REPO / lockfile.lock_path(variant))
        assert len(entries) > 100  # the whole stack, not a fragment
        for entry in (e for pins in entries.values() for e in pins):
            assert entry.hashes and all(len(h) == 64 for h in entry.hashes), entry.name
    cpu = lockfile.parse_lock(REPO / "requirements/lock-cpu.txt")
    cuda = lockfile.parse_lock(REPO / "requirements/lock-cuda.txt")
    assert [e.version for e in cpu["torch"]] == ["2.13.0+cpu"] and [e.version for e in cuda["torch"]] == ["2.13.0"]
    # nvidia-ml-py (dvclive's dependency) is pure-Python NVML bindings, no CUDA library: allowed in the CPU lock.
    assert any(n.startswith("nvidia-") for n in cuda)
    assert not any(n.startswith("nvidia-") and n != "nvidia-ml-py" for n in cpu)
    for name in ("sam2", "sam3", "model-compression-toolkit", "imx500-converter", "pytest", "pip", "setuptools"):
        assert name in cpu and name in cuda, name


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A copy of the lock's inputs and the locks, to change without touching the checkout."""
    shutil.copytree(REPO / "requirements", tmp_path / "requirements")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    assert lockfile.check(tmp_path) == []
    return tmp_path


def test_added_requirement_without_relocking_is_named(inputs: Path):
    with open(inputs / "requirements/base.txt", "a") as fh:
        fh.write("hypothesis>=6\n")
    problems = lockfile.check(inputs)
    assert any("hypothesis>=6 (requirements/base.txt) is not in requirements/lock-cpu.txt" in p for p in problems), (
        problems
    )
    assert any("lock-cuda.txt" in p and "hypothesis" in p for p in problems)


def test_changed_pin_without_relocking_is_named(inputs: Path):
    path = inputs / "requirements/constraints.txt"
    path.write_text(path.read_text().replace("onnxruntime==1.21.1", "onnxruntime==1.22.0"))
    problems = lockfile.check(inputs)
    assert any(
        "pins onnxruntime==1.21.1, which requirements/constraints.txt no longer allows (onnxruntime==1.22.0)" in p
        for p in problems
    ), problems


def test_pyproject_extra_without_relocking_is_named(inputs: Path):
    path = inputs / "pyproject.toml"
    path.write_text(path.read_text().replace('bench = ["scipy>=1.11"]', 'bench = ["scipy>=1.11", "line-profiler>=4"]'))
    problems = lockfile.check(inputs)
    assert any("line-profiler>=4 (pyproject.toml [bench]) is not in" in p for p in problems), problems


def test_removed_requirement_without_relocking_is_named(inputs: Path):
    path = inputs / "requirements/lock.in"
    path.write_text(path.read_text().replace("sam2==1.1.0\n", ""))
    path = inputs / "pyproject.toml"
    path.write_text(path.read_text().replace('teacher = ["sam2>=1.1.0"]', "teacher = []"))
    problems = lockfile.check(inputs)
    assert any(
        "has sam2==1.1.0 as asked for by requirements/lock.in, which no longer asks for it" in p for p in problems
    ), problems


def test_locks_that_disagree_are_named(inputs: Path):
    path = inputs / "requirements/lock-cuda.txt"
    path.write_text(path.read_text().replace("zarr==3.1.6", "zarr==3.1.5"))
    problems = lockfile.check(inputs)
    assert any("zarr differs between the cpu and cuda locks" in p for p in problems), problems


def _wheel(folder: Path, name: str = "lockprobe", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel (a package with one module), built here so the test needs no index."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"VALUE = 1\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test_lock\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = (
        "".join(
            f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
            for path, data in files.items()
        )
        + f"{info}/RECORD,,\n"
    )
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        zf.writestr(f"{info}/RECORD", record)
    return path


def _pip_locked(lock: Path, wheels: Path, target: Path, log: Path) -> int:
    """What scripts/install.sh runs (pip install --require-hashes, output to a log), on a local folder only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # the machine's pip config adds indexes and find-links
    with open(log, "w") as fh:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--require-hashes",
                "--no-index",
                "--find-links",
                str(wheels),
                "--target",
                str(target),
                "--progress-bar",
                "off",
                "-r",
                str(lock),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=120,
        ).returncode


def test_file_whose_hash_is_not_in_the_lock_is_refused_with_a_clear_message(tmp_path: Path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    good = hashlib.sha256(_wheel(wheels).read_bytes()).hexdigest()
    lock, log = tmp_path / "lock.txt", tmp_path / "install.log"
    lock.write_text(f"lockprobe==1.0 \\\n    --hash=sha256:{good}\n")
    assert _pip_locked(lock, wheels, tmp_path / "ok", log) == 0, log.read_text()
    assert (tmp_path / "ok" / "lockprobe" / "__init__.py").exists()

    bad = good[:-1] + ("0" if good[-1] != "0" else "1")  # one hash changed in the lock
    lock.write_text(f"lockprobe==1.0 \\\n    --hash=sha256:{bad}\n")
    assert _pip_locked(lock, wheels, tmp_path / "refused", log) != 0
    assert not (tmp_path / "refused" / "lockprobe").exists()
    message = lockfile.explain(log.read_text(), "requirements/lock-cpu.txt", str(log))
    assert message.startswith(
        "install.sh: pip refused 1 file(s) whose sha256 is not in requirements/lock-cpu.txt: "
        f"lockprobe 1.0 (file lockprobe-1.0-py3-none-any.whl has sha256 {good}"
    )
    assert "make lock" in message and str(log) in message
    assert "\n" not in message  # one paragraph, not pip's page


def test_package_missing_from_the_lock_is_named(tmp_path: Path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    lock, log = tmp_path / "lock.txt", tmp_path / "install.log"
    lock.write_text("lockprobe==1.0\n")  # no hash: pip, under --require-hashes, names what it would have installed
    assert _pip_locked(lock, wheels, tmp_path / "t", log) != 0
    message = lockfile.explain(log.read_text(), "requirements/lock-cpu.txt", str(log))
    assert "does not list: lockprobe 1.0" in message and "make lock" in message


def test_select_cuts_a_lock_for_one_pip_call(tmp_path: Path):
    cpu = REPO / "requirements/lock-cpu.txt"
    only = tmp_path / "tools.txt"
    only.write_text(lockfile.select(cpu, ["pip", "setuptools", "wheel"], exclude=False))
    assert set(lockfile.parse_lock(only)) == {"pip", "setuptools", "wheel"}
    rest = tmp_path / "rest.txt"
    rest.write_text(lockfile.select(cpu, ["sam2"], exclude=True))
    entries, full = lockfile.parse_lock(rest), lockfile.parse_lock(cpu)
    assert "sam2" not in entries and len(entries) == len(full) - 1
    assert entries["torch"][0].hashes == full["torch"][0].hashes
    assert len(entries["onnx"]) == 2  # both forks of a forked package (1.17.0 below Python 3.13, a newer one from it)


def test_pinned_file_not_on_the_indexes_is_named(tmp_path: Path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()  # empty: the pinned release is nowhere to be found, as the CPU torch on a stock machine
    lock, log = tmp_path / "lock.txt", tmp_path / "install.log"
    lock.write_text(f"lockprobe==1.0 \\\n    --hash=sha256:{'0' * 64}\n")
    assert _pip_locked(lock, wheels, tmp_path / "t", log) != 0
    message = lockfile.explain(log.read_text(), "requirements/lock-cpu.txt", str(log))
    assert message.startswith("install.sh: no file of lockprobe==1.0 (pinned in requirements/lock-cpu.txt) was found")


def test_cpu_torch_not_reachable_says_what_to_do_instead():
    log = (
        "ERROR: Could not find a version that satisfies the requirement torch==2.13.0+cpu (from versions: 2.13.0)\n"
        "ERROR: No matching distribution found for torch==2.13.0+cpu\n"
    )
    message = lockfile.explain(log, "requirements/lock-cpu.txt", "install.log")
    assert "torch==2.13.0+cpu" in message and "without TORCH=cpu" in message and "TORCH_CPU_FIND_LINKS" in message
    assert "TORCH_INDEX" not in message  # the PyTorch-index option is gone: its files' hashes were never locked


def test_locks_cover_every_supported_python():
    for variant in lockfile.VARIANTS:
        head = (REPO / lockfile.lock_path(variant)).read_text().splitlines()[:5]
        assert any("universal: Python >= 3.11" in line for line in head), head
    # A marker that holds only on 3.13 still asks for the package: such a requirement must be in the lock too.
    assert [
        v
        for v in lockfile.SUPPORTED_PYTHONS
        if lockfile.Requirement("x ; python_version >= '3.13'").marker.evaluate(lockfile.marker_env(v))
    ] == ["3.13"]


def test_lock_made_for_one_python_is_named(inputs: Path):
    path = inputs / "requirements/lock-cuda.txt"
    text = path.read_text()
    path.write_text(text.replace("universal: Python >= 3.11, any platform", "Python 3.11, x86_64 manylinux_2_28", 1))
    problems = lockfile.check(inputs)
    assert any("lock-cuda.txt was not resolved for every supported Python" in p for p in problems), problems
    path.write_text(text.replace("universal: Python >= 3.11", "universal: Python >= 3.12", 1))
    assert any("covers Python >= 3.12, but 3.11 is supported" in p for p in lockfile.check(inputs))


def test_forked_pins_must_not_overlap_and_must_cover_every_python(inputs: Path):
    # The committed fork (onnx by Python version) passes; markers that overlap, or leave a Python out, are named.
    onnx = lockfile.parse_lock(inputs / "requirements/lock-cpu.txt")["onnx"]
    assert sorted((e.version, [v for v in lockfile.SUPPORTED_PYTHONS if e.applies(v)]) for e in onnx)[0] == (
        "1.17.0",
        ["3.11", "3.12"],
    )
    path = inputs / "requirements/lock-cpu.txt"
    text = path.read_text()
    path.write_text(
        text.replace("scipy==1.17.1 \\", "scipy==1.17.1 ; python_full_version < '3.13' \\", 1)
        + "scipy==1.18.1 ; python_full_version >= '3.12' \\\n    --hash=sha256:"
        + "1" * 64
        + "\n"
    )
    problems = lockfile.check(inputs)
    assert any("lock-cpu.txt pins scipy twice for Python 3.12: 1.17.1" in p for p in problems), problems
    path.write_text(text.replace("scipy==1.17.1 \\", "scipy==1.17.1 ; python_full_version < '3.13' \\", 1))
    problems = lockfile.check(inputs)
    assert any("(pyproject.toml [bench]) is not in requirements/lock-cpu.txt for Python 3.13" in p for p in problems), (
        problems
    )


def test_install_refuses_an_unknown_torch_choice_and_an_unsupported_python(tmp_path: Path):
    script = str(REPO / "scripts/install.sh")
    bad = subprocess.run(["bash", script, "--torch", "rocm", str(tmp_path / "v")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--torch must be auto, cpu or cuda, not rocm" in bad.stderr
    old = sorted(Path.home().glob(".pyenv/versions/3.10.*/bin/python"))
    if not old:
        pytest.skip("no Python 3.10 under ~/.pyenv/versions to try an unsupported interpreter with")
    env = dict(os.environ, PYTHON=str(old[0]))
    run = subprocess.run(["bash", script, str(tmp_path / "venv")], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "has Python 3.10; the locks are tested with Python 3.11 3.12 3.13" in run.stderr
    assert "PYTHON=" in run.stderr  # says how to pick another interpreter
