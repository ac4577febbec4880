"""The offline install for GPU nodes without internet (scripts/wheelhouse.py, scripts/install.sh --wheelhouse).

Fast: the plan on the real requirements/lock-cuda.txt (what the node provides, markers for the node's Python, the
refusals of another torch), the requirement check of downloaded files, the node-side checks of a wheelhouse, a venv
made from a venv's Python seeing that venv's packages.
Slow (network for the build only): a "node" of another Python (a venv over pyenv's 3.12, as our GPU machines' python3
is a venv holding torch) with a stand-in torch; a wheelhouse built for it from the registry; install.sh --wheelhouse
with the network cut (no index, proxies to a closed port); the CLI and the stack import in the result, torch being the
node's.
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

from tests.helpers.paths import REPO, load_script

wheelhouse = load_script("wheelhouse")
lockfile = load_script("lockfile")
LOCK = REPO / "requirements/lock-cuda.txt"
LOCKED = {name: pins for name, pins in lockfile.parse_lock(LOCK).items()}
TORCH = LOCKED["torch"][0].version  # 2.13.0


def node(python: str = "3.12", **packages: str | None) -> wheelhouse.Node:
    pkgs = {wheelhouse.canonical(k): v for k, v in {"torch": f"{TORCH}+cu130", **packages}.items()}
    return wheelhouse.Node(python, wheelhouse.manylinux_platforms("2.28"), pkgs, "x86_64", "test node")


def actions(plan) -> dict[str, tuple[str, str]]:
    return {i.name: (i.action, i.entry.version) for i in plan.items}


def test_the_node_keeps_torch_and_cuda_libraries_and_markers_are_evaluated_for_its_python(tmp_path):
    for python, onnx, mct in (("3.12", "1.17.0", True), ("3.13", "1.22.0", False)):
        plan = wheelhouse.make_plan(LOCK, node(python))
        got = actions(plan)
        assert got["torch"][0] == "node" and got["torchvision"] == ("download", "0.28.0")  # the node lacks it
        cuda_libs = [n for n in LOCKED if n.startswith(("nvidia-", "cuda-")) and n != "nvidia-ml-py"] + ["triton"]
        assert len(cuda_libs) > 10 and all(got[n][0] == "node" for n in cuda_libs if n in got)
        assert got["nvidia-ml-py"][0] == "download"  # pure-Python NVML bindings (dvclive), not a CUDA library
        assert got["onnx"] == ("download", onnx)  # one pin of the fork, the node's Python's
        assert ("model-compression-toolkit" in got) == mct  # Sony's set: Python < 3.13 only
        assert got["sam2"][0] == "download" and got["numpy"][0] == "download"
        text = plan.requirements_text()
        pins = [line for line in text.splitlines() if line and not line.startswith(("#", " "))]
        assert pins and not any(";" in line for line in pins)  # markers dropped: pip would evaluate them for itself
        (tmp_path / "cut.txt").write_text(text)
        assert set(lockfile.parse_lock(tmp_path / "cut.txt")) == {i.name for i in plan.download()}
        for item in plan.download():  # every hash of the lock kept
            assert all(f"--hash=sha256:{h}" in text for h in item.entry.hashes), item.name


def test_node_packages_at_the_locked_version_stay_others_are_downloaded_unless_reused():
    numpy, tqdm = LOCKED["numpy"][0].version, LOCKED["tqdm"][0].version
    plan = wheelhouse.make_plan(LOCK, node(numpy=numpy, tqdm="4.60.0", torchvision="0.26.0", six=None))
    got = {i.name: i for i in plan.items}
    assert got["numpy"].action == "node" and "locked version" in got["numpy"].why
    assert got["tqdm"].action == "download" and got["tqdm"].why == "the node has 4.60.0"
    assert got["torchvision"].action == "node"  # the node's, built for its torch, whatever its version
    assert got["six"].action == "download"  # present, version unknown: not reused unless asked
    reused = {i.name: i for i in wheelhouse.make_plan(LOCK, node(tqdm="4.60.0", six=None), reuse=("all",)).items}
    assert reused["tqdm"].action == "node" and f"4.60.0, not the locked {tqdm}" in reused["tqdm"].why
    assert reused["six"].action == "node" and "unknown version" in reused["six"].why
    only = {i.name: i.action for i in wheelhouse.make_plan(LOCK, node(tqdm="4.60.0", six=None), reuse=("tqdm",)).items}
    assert only["tqdm"] == "node" and only["six"] == "download"


def test_another_torch_release_is_refused_in_one_line_unless_allowed():
    with pytest.raises(wheelhouse.Refused) as refused:
        wheelhouse.make_plan(LOCK, node(torch="2.11.0+cu130", torchvision="0.26.0"))
    line = str(refused.value)
    assert "\n" not in line and "torch 2.11.0+cu130" in line and f"pins torch {TORCH}" in line
    assert "--allow-torch-mismatch" in line
    plan = wheelhouse.make_plan(LOCK, node(torch="2.11.0", torchvision="0.26.0"), allow_torch_mismatch=True)
    assert "2.11.0" in plan.torch_mismatch and actions(plan)["torchvision"][0] == "node"
    # the lock's torchvision is built for the lock's torch: with another torch the node must bring its own
    with pytest.raises(wheelhouse.Refused, match=r"the node has no torchvision, and the lock's torchvision 0\.28\.0"):
        wheelhouse.make_plan(LOCK, node(torch="2.11.0"), allow_torch_mismatch=True)
    # a build tag is not another release
    assert wheelhouse.make_plan(LOCK, node(torch=f"{TORCH}+cpu")).torch_mismatch == ""
    with pytest.raises(wheelhouse.Refused, match="has no torch"):
        wheelhouse.make_plan(LOCK, wheelhouse.Node("3.12", [], {}, "x86_64", "bare"))


def test_excluding_a_package_leaves_out_what_only_it_needs():
    plan = wheelhouse.make_plan(LOCK, node(), exclude=("imx500-converter", "ruff"))
    got = {i.name: i for i in plan.items}
    assert got["imx500-converter"].why == "excluded (--exclude)" and got["ruff"].action == "node"
    for orphan in ("sdspconv", "uni-pytorch", "uni-model", "conv-allocator", "onnxruntime-extensions"):
        assert got[orphan].action == "node" and got[orphan].why.startswith("excluded: only needed by"), orphan
    # asked for by the project or another kept package: kept
    for kept in ("onnx", "onnxruntime", "mct-quantizers", "model-compression-toolkit", "networkx", "numpy"):
        assert got[kept].action == "download", kept
    globbed = {i.name: i.action for i in wheelhouse.make_plan(LOCK, node(), exclude=("dvc-*",)).items}
    assert globbed["dvc-data"] == "node" and globbed["dvc"] == "download"


def test_unmet_requirements_of_downloaded_files_name_both_sides():
    plan = wheelhouse.make_plan(LOCK, node(numpy="2.5.2", torchvision="0.26.0"), reuse=("all",), exclude=("pyyaml",))
    requires = {
        "sam3": ["numpy<2.4,>=1.26", "iopath", 'decord; extra == "video"'],
        "sam2": ["torch>=2.5.1", "torchvision>=0.20.1", "pyyaml"],
        "timm": ["torch", "torchvision"],
    }
    problems = wheelhouse.unmet_requirements(plan, requires)
    lines = sorted(p.line() for p in problems)
    assert sorted(p.name for p in problems) == ["numpy", "pyyaml"], lines
    assert "sam3 0.1.4 requires numpy<2.4,>=1.26, but the node has numpy 2.5.2" in lines
    assert any(
        line.startswith("sam2 1.1.0 requires pyyaml, but pyyaml is neither in the wheelhouse nor on") for line in lines
    )
    ok = wheelhouse.make_plan(LOCK, node(torch="2.11.0", torchvision="0.26.0"), allow_torch_mismatch=True)
    assert wheelhouse.unmet_requirements(ok, {"sam2": ["torch>=2.5.1", "torchvision>=0.20.1"]}) == []
    assert wheelhouse.unmet_requirements(ok, {"sam2": ["torch>=2.12"]})[0].why == "the node has torch 2.11.0"


def test_node_descriptions_platform_tags_and_freeze_files():
    assert wheelhouse.manylinux_platforms("2.28")[:2] == ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64"]
    tags = wheelhouse.manylinux_platforms("2.17")
    assert tags[-3:] == ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    freeze = "# pip freeze\ntorch==2.11.0+cu130\nNumPy==2.5.2\nsam2 @ file:///src/sam2\nscipy\n-e git+x#egg=y\n"
    assert wheelhouse.read_freeze(freeze) == {"torch": "2.11.0+cu130", "numpy": "2.5.2", "sam2": None, "scipy": None}
    probed = wheelhouse.probe()
    assert probed["python"] == ".".join(map(str, sys.version_info[:3])) and "pip" in probed["packages"]
    assert any(p.startswith("manylinux") for p in probed["platforms"])
    n = wheelhouse.Node.from_probe(json.loads(json.dumps(probed)), "here")
    assert n.python_version == "{}.{}".format(*sys.version_info[:2])


def kit(tmp_path: Path, **node_fields) -> Path:
    """A one-file wheelhouse for this Python and its torch."""
    from importlib import metadata

    folder = tmp_path / "kit"
    folder.mkdir(parents=True)
    (folder / "demo-1.0-py3-none-any.whl").write_bytes(b"not really a wheel")
    manifest = {
        "format": 1,
        "made": "2026-12-07T00:00:00Z",
        "lock": "requirements/lock-cuda.txt",
        "lock_pins_sha256": wheelhouse.pins_digest(LOCK),
        "node": {
            "python_version": "{}.{}".format(*sys.version_info[:2]),
            "torch": metadata.version("torch"),
            **node_fields,
        },
        "files": [
            {
                "name": "demo",
                "file": "demo-1.0-py3-none-any.whl",
                "sha256": wheelhouse.sha256(folder / "demo-1.0-py3-none-any.whl"),
                "bytes": 18,
            }
        ],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_the_node_refuses_a_wheelhouse_for_another_python_torch_lock_or_with_a_changed_file(tmp_path):
    assert wheelhouse.check_kit(kit(tmp_path)) == ""
    assert "is not a wheelhouse" in wheelhouse.check_kit(tmp_path)
    other = kit(tmp_path / "a", python_version="3.9")
    assert re.search(r"is for CPython 3\.9, this Python is 3\.\d+", wheelhouse.check_kit(other))
    assert "made for a node whose torch is 2.11.0" in wheelhouse.check_kit(kit(tmp_path / "b", torch="2.11.0"))
    stale = kit(tmp_path / "c")
    manifest = json.loads((stale / "manifest.json").read_text())
    (stale / "manifest.json").write_text(json.dumps({**manifest, "lock_pins_sha256": "0" * 64}))
    assert "made from other pins" in wheelhouse.check_kit(stale)
    changed = kit(tmp_path / "d")
    (changed / "demo-1.0-py3-none-any.whl").write_bytes(b"not really a whee!")
    assert "differs from the one its manifest.json lists" in wheelhouse.check_kit(changed)


def test_install_sh_wheelhouse_options_fail_fast_with_a_reason(tmp_path):
    for args, said in (
        (["--wheelhouse", str(tmp_path / "none")], "no such folder"),
        (["--wheelhouse", str(tmp_path), "--torch", "cpu"], "--torch cpu does not apply"),
    ):
        done = subprocess.run(
            ["bash", REPO / "scripts/install.sh", *args, tmp_path / "venv"], capture_output=True, text=True
        )
        assert done.returncode == 2 and said in done.stderr, done.stderr
        assert not (tmp_path / "venv").exists()


def test_a_venv_made_from_a_venvs_python_sees_that_venvs_packages(tmp_path):
    """install.sh --wheelhouse makes its venv with --system-site-packages over PYTHON; where PYTHON is itself a venv
    (torch in /opt/torch/.venv), link-node-site adds that venv's site folder. A plain Python needs no link."""
    base = pyenv_python(NODE_PYTHON)
    python, site = make_node(base, tmp_path / "node")
    put_stand_in(site, "torch", "2.11.0")
    target = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", "--system-site-packages", "--without-pip", target], check=True)
    where = [target / "bin" / "python", "-c", "import torch; print(torch.__file__, torch.__version__)"]
    assert subprocess.run(where, capture_output=True, text=True).returncode == 1  # the base's site only: no torch
    done = subprocess.run([python, REPO / "scripts/wheelhouse.py", "link-node-site", target], capture_output=True)
    assert done.returncode == 0, done.stderr
    got = subprocess.run(where, capture_output=True, text=True, check=True).stdout.split()
    assert Path(got[0]).is_relative_to(site) and got[1] == "2.11.0"
    plain = tmp_path / "plain"
    subprocess.run([base, "-m", "venv", "--system-site-packages", "--without-pip", plain], check=True)
    subprocess.run([base, REPO / "scripts/wheelhouse.py", "link-node-site", plain], check=True)
    assert not list(plain.rglob(wheelhouse.NODE_SITE_PTH))


# --- the whole way, with another Python and no network ------------------------------------------------------------

NODE_PYTHON = "3.12"
OFFLINE = {
    "PIP_NO_INDEX": "1",
    **{k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")},
}
# Left out of the test's wheelhouse to keep it quick; their lone dependencies go with them (the orphan rule).
SLIM = ("imx500-converter", "ruff", "pytest", "pytest-timeout", "moto", "dvc-s3", "flask", "flask-cors")


def pyenv_python(version: str) -> Path:
    for candidate in sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}")):
        return candidate
    found = shutil.which(f"python{version}")
    if not found:
        pytest.skip(f"no Python {version} here (pyenv or PATH): the node of this test")
    return Path(found)


def user_env() -> dict[str, str]:
    """pip as a user's: no configuration file, no PIP_* setting but the cache and the timeout."""
    keep = ("PIP_CACHE_DIR", "PIP_DEFAULT_TIMEOUT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in keep}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


STAND_IN = '''"""A stand-in for the node's torch (tests/test_wheelhouse.py): its name, version and the names the stack's
imports touch; a real torch is the node's business, the wheelhouse's is everything else."""

__version__ = "{version}"


class Tensor:
    pass


class version:
    cuda = None


class cuda:
    @staticmethod
    def is_available():
        return False
'''


def put_stand_in(site: Path, name: str, version: str) -> None:
    """A distribution ``name==version`` in ``site``, as pip would have installed it (dist-info with a RECORD)."""
    for old in site.glob(f"{name}-*.dist-info"):
        shutil.rmtree(old)
    shutil.rmtree(site / name, ignore_errors=True)
    (site / name / "utils").mkdir(parents=True)
    (site / name / "__init__.py").write_text(STAND_IN.format(version=version))
    (site / name / "utils" / "__init__.py").write_text("")
    (site / name / "utils" / "data.py").write_text(
        "class DataLoader:\n    pass\n\n\nclass IterableDataset:\n    pass\n"
    )
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    files = [
        p.relative_to(site).as_posix() for p in [*(site / name).rglob("*.py"), info / "METADATA", info / "INSTALLER"]
    ]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files) + f"{info.name}/RECORD,,\n")


def make_node(base: Path, root: Path) -> tuple[Path, Path]:
    """The node's Python: a venv over ``base`` holding the node's packages, as on our GPU machines, whose python3 is
    /opt/torch/.venv/bin/python3 (install.sh's venv made from it must see that venv's packages: link-node-site).
    (python, its site-packages)."""
    subprocess.run([str(base), "-m", "venv", str(root)], check=True, capture_output=True)
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    return python, site


def run(cmd, env, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_offline_install_from_a_wheelhouse_over_the_nodes_torch_with_another_python(tmp_path):
    python, site = make_node(pyenv_python(NODE_PYTHON), tmp_path / "node")  # a venv, like our GPU machines' python3
    put_stand_in(site, "torch", TORCH)
    put_stand_in(site, "torchvision", LOCKED["torchvision"][0].version)
    # Two real packages on the node: six at the locked version (left to the node), tqdm at another (the lock's is
    # downloaded and shadows it in the venv).
    six, tqdm = LOCKED["six"][0].version, LOCKED["tqdm"][0].version
    got = run([python, "-m", "pip", "install", "-q", "--no-deps", f"six=={six}", "tqdm==4.66.5"], user_env())
    if got.returncode != 0:
        pytest.skip(f"the package registry is not reachable here: {got.stderr.strip().splitlines()[-1:]}")

    # 1. the wheelhouse, on the connected machine (this one), for the node probed through its Python
    kit_dir = tmp_path / "wheelhouse"
    built = run(
        [sys.executable, "scripts/wheelhouse.py", "build", "--node-python", python, "-o", kit_dir, "--exclude", *SLIM],
        user_env(),
    )
    assert built.returncode == 0, built.stdout + built.stderr
    manifest = json.loads((kit_dir / "manifest.json").read_text())
    assert manifest["node"]["python_version"] == NODE_PYTHON and manifest["node"]["torch"] == TORCH
    from_node = manifest["from_node"]
    assert from_node["torch"]["why"] == "the node's torch" and from_node["six"]["node"] == six
    assert "tqdm" not in from_node and "sdspconv" in from_node and "nvidia-cublas" in from_node
    names = {f["name"]: f for f in manifest["files"]}
    assert names["sam2"]["file"] == "sam2-1.1.0.tar.gz"  # sdist only: built on the node
    assert names["numpy"]["file"].startswith(f"numpy-{LOCKED['numpy'][0].version}-cp312-cp312-manylinux")
    for f in manifest["files"]:  # every file one the lock lists
        assert f["sha256"] in LOCKED[f["name"]][0].hashes or any(f["sha256"] in e.hashes for e in LOCKED[f["name"]])
    assert re.search(r"wheelhouse\.py: done in \d+ s: .* holds \d+ files, [\d.]+ MiB", built.stdout), built.stdout

    # 2. on the node, without network: a venv over its Python, the stack from the wheelhouse
    venv = tmp_path / "venv"
    offline = {**user_env(), **OFFLINE, "PYTHON": str(python)}
    done = run(["bash", "scripts/install.sh", "--wheelhouse", kit_dir, venv], offline, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr + (venv / "install.log").read_text()[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert re.match(
        rf"install\.sh: done in \d+ min \d+ s \(0\.00 GB of packages fetched, network or pip's cache\): {venv} "
        rf"has Python {NODE_PYTHON}\.\d+ and torch {TORCH} \(the cuda lock: offline from the wheelhouse {kit_dir}, "
        r"with the node's torch \(--system-site-packages\); no CUDA device: runs on the CPU\), torchvision [\d.]+, "
        r"zarr 3\.1\.6$",
        last,
    ), last
    assert "Downloading" not in (venv / "install.log").read_text()
    env = {**offline, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    cli = run([venv / "bin" / "picosam-pipeline", "--help"], env)
    assert cli.returncode == 0 and "run-stage" in cli.stdout, cli.stderr
    where = run(
        [
            venv / "bin" / "python",
            "-c",
            "import json, picosam_pipeline, sam2, zarr, torch, tqdm, six; "
            "print(json.dumps([torch.__file__, six.__file__, tqdm.__file__, tqdm.__version__]))",
        ],
        env,
    )
    assert where.returncode == 0, where.stderr
    torch_file, six_file, tqdm_file, tqdm_version = json.loads(where.stdout)
    assert Path(torch_file).is_relative_to(site) and Path(six_file).is_relative_to(site)  # the node's
    assert Path(tqdm_file).is_relative_to(venv) and tqdm_version == tqdm  # the lock's, shadowing the node's 4.66.5

    # 3. the node's torch changed since: the wheelhouse is refused, and a new one too unless asked for
    put_stand_in(site, "torch", "2.11.0")
    again = run(["bash", "scripts/install.sh", "--wheelhouse", kit_dir, venv], offline)
    assert again.returncode == 1 and f"made for a node whose torch is {TORCH}" in again.stderr, again.stderr
    refused = run([sys.executable, "scripts/wheelhouse.py", "build", "--node-python", python, "-o", kit_dir], offline)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert re.match(
        rf"wheelhouse\.py: refused: the node has torch 2\.11\.0, the lock .* pins torch {TORCH}", refused.stderr
    )
    for big in (venv, kit_dir):  # 1.5 GB together: not left in pytest's kept temporary folders
        shutil.rmtree(big)
