#!/usr/bin/env python3
"""An offline install kit for a GPU node without internet: a wheelhouse of the locked packages the node lacks.

For air-gapped clusters and NVIDIA's PyTorch containers, whose torch (and CUDA libraries) are already installed.
Two steps on a connected machine, one on the node (docs/gpu.md):

  1. on the node (any Python with pip; stdlib only):  python3 scripts/wheelhouse.py probe > node.json
     its Python version, platform tags, machine and every installed distribution with its version;
  2. here, with the project's venv:  .venv/bin/python scripts/wheelhouse.py build --node node.json -o DIR
     (or `make wheelhouse NODE=node.json`). It reads the hash-locked requirements/lock-cuda.txt, evaluates each
     pin's environment marker for the node's Python and machine, leaves out what the node provides (below),
     downloads the rest for the node's Python and platform with `pip download --require-hashes` (every file
     checked against the lock's sha256), and writes DIR/requirements.txt (the lock cut to those files, hashes
     kept) and DIR/manifest.json (what was left out and why, every file with its sha256 and size);
  3. on the node:  scripts/install.sh --wheelhouse DIR [VENV]  (or `make env WHEELHOUSE=DIR`): a venv over the
     node's Python with --system-site-packages (the node's torch is used), pip with --no-index.

What the node provides (left out of the wheelhouse):
  * torch: must be on the node. A torch whose release differs from the lock's (2.11.0 for 2.13.0; build tags such
    as +cu130 do not count) is refused in one line unless --allow-torch-mismatch;
  * torchvision, torchaudio: the node's where it has them (built for its torch), else the lock's, which pins the
    lock's torch release (refused with a mismatched torch);
  * the CUDA libraries of the lock's torch build (nvidia-*, cuda-*, triton): the node's torch brings its own;
  * any package the node has at the locked version; with --reuse-node NAME.. (or `all`), also at another version.
    A reused package that a downloaded one does not accept (its Requires-Dist, read from the downloaded files) is
    downloaded at the locked version instead, and said so;
  * --exclude NAME.. (globs allowed): left out on purpose. A downloaded package that requires one that is then
    neither downloaded nor on the node stops the build, naming both.

Files that exist only as source distributions (sam2, iopath, antlr4-python3-runtime, stringcase: no wheel on the
registry) go into the wheelhouse as the locked sdists and are built on the node by install.sh, without build
isolation, as its online install does. Reading their metadata here needs setuptools (and sam2's needs no torch),
so run this with the project's venv.

Commands:
  probe                 print the node description (JSON) of the Python running it
  build -o DIR ...      make the wheelhouse (see --help); --dry-run prints the plan and downloads nothing
  check DIR             (install.sh, on the node) exit 1 with one line if this Python cannot install DIR
  pip-check DIR         (install.sh, on the node) pip check, failing only on the locked stack's problems
  link-node-site VENV   (install.sh, on the node, run by its Python) a venv made from a venv sees that one's packages
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LOCK = "requirements/lock-cuda.txt"
MANIFEST = "manifest.json"
REQUIREMENTS = "requirements.txt"
FORMAT = 1
# torch's companions built against one torch release: the node's own where it has them.
TORCH_BOUND = ("torchvision", "torchaudio")
# What only the lock's torch build pulls in (scripts/lockfile.py checks that the cuda lock's extra packages are
# exactly these): the node's torch brings its own CUDA libraries. nvidia-ml-py is pure-Python NVML bindings (dvclive
# needs it), an ordinary package.
CUDA_LIBS = ("nvidia-*", "cuda-*", "triton")
NOT_CUDA_LIBS = ("nvidia-ml-py",)
# Registry releases with no wheel (seen 2026-12): their locked sdists go into the wheelhouse. Others are found by
# pip's "No matching distribution" for a wheel and moved here.
KNOWN_SDIST_ONLY = ("sam2", "iopath", "antlr4-python3-runtime", "stringcase")
ARCHIVES = (".whl", ".tar.gz", ".zip")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- probe (runs on the node: stdlib only, any Python 3) -------------------------------------------------------


def probe() -> dict:
    """This interpreter as a node: Python, machine, platform tags pip accepts, installed distributions."""
    from importlib import metadata

    packages: dict[str, str] = {}
    for dist in metadata.distributions():  # sys.path order: the first one found is the one `import` sees
        name = dist.metadata["Name"]
        if name:
            packages.setdefault(canonical(name), dist.version)
    try:
        from pip._vendor.packaging import tags  # the tags pip itself accepts here

        platforms = list(dict.fromkeys(t.platform for t in tags.sys_tags()))
    except Exception:  # noqa: BLE001 -- no pip: derive the manylinux tags from glibc below
        platforms = []
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None  # "glibc 2.36"
    glibc = libc.split()[-1] if libc and libc.startswith("glibc") else None
    machine = platform.machine()
    if not platforms and glibc:
        platforms = manylinux_platforms(glibc, machine)
    return {
        "format": FORMAT,
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "executable": sys.executable,
        "machine": machine,
        "system": platform.system(),
        "glibc": glibc,
        "platforms": platforms,
        "packages": dict(sorted(packages.items())),
    }


def manylinux_platforms(glibc: str, machine: str = "x86_64") -> list[str]:
    """The manylinux platform tags a glibc ``glibc`` (e.g. "2.28") accepts, newest first (pip matches exactly)."""
    major, minor = (int(x) for x in glibc.split(".")[:2])
    if major != 2:
        raise ValueError(f"glibc {glibc}: only glibc 2.x is known")
    out = [f"manylinux_2_{m}_{machine}" for m in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return out + [f"{legacy[m]}_{machine}" for m in sorted(legacy, reverse=True) if m <= minor]


def read_freeze(text: str) -> dict[str, str | None]:
    """``pip freeze`` / ``pip list --format=freeze`` output: ``name==version`` (a bare name or ``name @ url``: version
    unknown)."""
    out: dict[str, str | None] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:===?\s*(\S+))?", line)
        if m:
            out[canonical(m.group(1))] = m.group(2) if m.group(2) and "@" not in line else None
    return out


# --- the plan ---------------------------------------------------------------------------------------------------


@dataclass
class Node:
    """What the wheelhouse is for: the node's Python (``3.12`` or ``3.12.3``), machine, platform tags and
    installed distributions (version None: present, version unknown)."""

    python: str
    platforms: list[str]
    packages: dict[str, str | None]
    machine: str = "x86_64"
    source: str = ""

    @property
    def python_version(self) -> str:
        return ".".join(self.python.split(".")[:2])

    def marker_env(self) -> dict[str, str]:
        full = self.python if self.python.count(".") == 2 else f"{self.python}.0"
        return {
            "sys_platform": "linux",
            "platform_system": "Linux",
            "platform_machine": self.machine,
            "os_name": "posix",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "python_version": self.python_version,
            "python_full_version": full,
            "extra": "",
        }

    @classmethod
    def from_probe(cls, data: dict, source: str) -> Node:
        if data.get("implementation", "cpython") != "cpython":
            raise SystemExit(f"wheelhouse.py: {source}: the node's Python is {data['implementation']}, not CPython")
        return cls(
            data["python"],
            list(data.get("platforms") or []),
            {canonical(k): v for k, v in data.get("packages", {}).items()},
            data.get("machine") or "x86_64",
            source,
        )


@dataclass
class Item:
    """One applying pin of the lock and what happens to it: ``action`` is "download" or "node" (left out: the
    node provides it, or it is excluded); ``why`` says which rule decided."""

    entry: object  # lockfile.Entry
    action: str
    why: str
    node_version: str | None = None

    @property
    def name(self) -> str:
        return self.entry.name


@dataclass
class Plan:
    node: Node
    lock: Path
    items: list[Item]
    torch_mismatch: str = ""  # the one line saying the node's torch is not the lock's (empty: same release)
    notes: list[str] = field(default_factory=list)

    def download(self) -> list[Item]:
        return [i for i in self.items if i.action == "download"]

    def left_out(self) -> list[Item]:
        return [i for i in self.items if i.action != "download"]

    def requirements_text(self) -> str:
        """The lock cut to the downloaded pins, markers dropped (they were evaluated for the node; pip would
        evaluate them for the Python running it), hashes kept."""
        out = [
            f"# The wheelhouse's share of {self.lock.name} for CPython {self.node.python} on {self.node.machine}, "
            "written by scripts/wheelhouse.py\n",
            "# (the node provides the rest; see manifest.json). Installed by scripts/install.sh --wheelhouse DIR.\n",
        ]
        for item in self.download():
            e = item.entry
            out.append(type(e)(e.name, e.version, "", list(e.hashes), []).text())
        return "".join(out)


class Refused(SystemExit):
    """A plan that cannot be installed as asked; the message is the line to print."""


def _lockfile():
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    import lockfile  # noqa: PLC0415 -- scripts/ is not a package

    return lockfile


def _same_version(a: str | None, b: str, public: bool = False) -> bool:
    """PEP 440 equality (``public``: build tags such as +cu130 ignored); a version pip could not read is unequal."""
    lf = _lockfile()
    try:
        va, vb = lf.Version(a), lf.Version(b)
    except Exception:  # noqa: BLE001 -- InvalidVersion of packaging or of pip's copy, or None
        return False
    return va.public == vb.public if public else va == vb


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, canonical(p)) for p in patterns)


def make_plan(
    lock: Path,
    node: Node,
    *,
    exclude: tuple[str, ...] = (),
    reuse: tuple[str, ...] = (),
    allow_torch_mismatch: bool = False,
) -> Plan:
    """Decide, for every pin of ``lock`` that applies on ``node``, whether it is downloaded or the node's.

    Raises Refused (one line) when the node has no torch, or another torch release than the lock's without
    ``allow_torch_mismatch``, or then lacks a torch companion the lock pins to its own torch.
    """
    lf = _lockfile()
    Marker, Version = lf.Marker, lf.Version  # packaging, or pip's copy of it in a bare venv
    env = node.marker_env()
    entries = [
        e for pins in lf.parse_lock(lock).values() for e in pins if not e.marker or Marker(e.marker).evaluate(env)
    ]
    by_name = {e.name: e for e in entries}
    has = node.packages
    plan = Plan(node, lock, [])
    lock_torch = by_name.get("torch")
    if lock_torch is not None:
        node_torch = has.get("torch")
        if "torch" not in has:
            raise Refused(
                f"wheelhouse.py: the node ({node.source}) has no torch; this wheelhouse is for nodes whose torch is "
                f"installed (the lock pins torch {lock_torch.version}): install the node's torch first, or use "
                "scripts/install.sh with network access"
            )
        if node_torch is None:
            raise Refused(
                f"wheelhouse.py: the node's torch version is unknown ({node.source}); give its version "
                "(`torch==X` in --node-freeze) or a probe (--node)"
            )
        if not _same_version(node_torch, lock_torch.version, public=True):
            plan.torch_mismatch = (
                f"the node has torch {node_torch}, the lock ({lock.name}) pins torch {lock_torch.version}: the locked "
                f"stack was tested with {Version(lock_torch.version).public} only"
            )
            if not allow_torch_mismatch:
                raise Refused(
                    f"wheelhouse.py: refused: {plan.torch_mismatch}. Pass --allow-torch-mismatch to build for the "
                    "node's torch anyway (its torchvision is then used too)"
                )
    reuse_all = "all" in reuse
    for e in entries:
        name, nv = e.name, has.get(e.name)
        present = e.name in has
        if name == "torch":
            item = Item(e, "node", "the node's torch", nv)
        elif _matches(name, exclude):
            item = Item(e, "node", "excluded (--exclude)", nv)
        elif name in TORCH_BOUND and present:
            item = Item(e, "node", "the node's, built for its torch", nv)
        elif name in TORCH_BOUND and plan.torch_mismatch:
            raise Refused(
                f"wheelhouse.py: refused: the node has no {name}, and the lock's {name} {e.version} is built for torch "
                f"{lock_torch.version}, not the node's {has.get('torch')}; install the node's matching {name} first"
            )
        elif _matches(name, CUDA_LIBS) and not _matches(name, NOT_CUDA_LIBS):
            item = Item(e, "node", "CUDA library of the lock's torch build (the node's torch brings its own)", nv)
        elif present and _same_version(nv, e.version):
            item = Item(e, "node", "the node has it at the locked version", nv)
        elif present and (reuse_all or _matches(name, reuse)):
            why = "unknown version" if nv is None else f"{nv}, not the locked {e.version}"
            item = Item(e, "node", f"the node's ({why}), reused (--reuse-node)", nv)
        else:
            item = Item(e, "download", "not on the node" if not present else f"the node has {nv}", nv)
        plan.items.append(item)
    if exclude:
        _drop_orphans(plan)
    return plan


ROOT_VIA = ("-r ", "picosam-pipeline (pyproject.toml)")  # asked for by an input file or the project itself


def _drop_orphans(plan: Plan) -> None:
    """Leave out what only excluded packages need: a pin whose every ``# via`` parent (the lock's annotation) is left
    out by --exclude or by this rule, and that no input file or the project asks for itself."""
    dropped = {i.name for i in plan.items if i.why.startswith("excluded")}
    applying = {i.name for i in plan.items}
    changed = True
    while changed:
        changed = False
        for item in plan.download():
            via = item.entry.via
            if not via or any(v.startswith(ROOT_VIA) for v in via):
                continue
            parents = {canonical(v.split()[0]) for v in via if not v.startswith("-")}
            if parents and all(p in dropped or p not in applying for p in parents):
                item.action = "node"
                item.why = "excluded: only needed by " + ", ".join(sorted(parents & dropped) or sorted(parents))
                dropped.add(item.name)
                changed = True


# --- metadata of downloaded files: what each one requires ------------------------------------------------------


def requires_dist(path: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA or an sdist's PKG-INFO ([] where the sdist does not say)."""
    text = ""
    if path.name.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            meta = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            text = z.read(meta[0]).decode("utf-8", "replace") if meta else ""
    elif path.name.endswith(".tar.gz"):
        with tarfile.open(path) as t:
            for member in t.getmembers():
                if member.name.count("/") == 1 and member.name.endswith("/PKG-INFO"):
                    text = t.extractfile(member).read().decode("utf-8", "replace")
                    break
    elif path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            info = [n for n in z.namelist() if n.count("/") == 1 and n.endswith("/PKG-INFO")]
            text = z.read(info[0]).decode("utf-8", "replace") if info else ""
    head = text.split("\n\n", 1)[0]  # the headers; the description follows a blank line
    return [line.split(":", 1)[1].strip() for line in head.splitlines() if line.startswith("Requires-Dist:")]


@dataclass(frozen=True)
class Unmet:
    """A requirement of a downloaded package (``who``) on ``name`` that the node's side does not meet."""

    who: str
    requirement: str
    name: str
    why: str

    def line(self) -> str:
        return f"{self.who} requires {self.requirement}, but {self.why}"


def unmet_requirements(plan: Plan, requires: dict[str, list[str]]) -> list[Unmet]:
    """Each requirement (extras not asked for are ignored) of a downloaded package that the node's side does not
    meet: the package is left out and the node's version is outside the specifier, or the package is neither
    downloaded nor on the node. ``requires``: name -> Requires-Dist lines of the downloaded file."""
    lf = _lockfile()
    Requirement, Version = lf.Requirement, lf.Version
    env = plan.node.marker_env()
    downloaded = {i.name for i in plan.download()}
    left = {i.name: i for i in plan.left_out()}
    problems = []
    for item in plan.download():
        for spec in requires.get(item.name, []):
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = canonical(req.name)
            if name in downloaded:
                continue
            who = f"{item.name} {item.entry.version}"
            if name in left and left[name].node_version is not None:
                try:
                    fits = req.specifier.contains(Version(left[name].node_version), prereleases=True)
                except Exception:  # noqa: BLE001 -- a version pip cannot read: let pip decide on the node
                    fits = True
                if not fits:
                    problems.append(Unmet(who, str(req), name, f"the node has {name} {left[name].node_version}"))
            elif name in left and name in plan.node.packages:
                continue  # on the node, version unknown: pip decides there
            elif name not in plan.node.packages:
                why = left[name].why if name in left else "not in the lock for this Python"
                problems.append(
                    Unmet(who, str(req), name, f"{name} is neither in the wheelhouse nor on the node ({why})")
                )
    return problems


# --- build ------------------------------------------------------------------------------------------------------


def pins_digest(lock: Path) -> str:
    """sha256 of the lock's pins (name, version, marker, hashes): what a wheelhouse is made from. A change of its
    comments (``# via``) does not change it."""
    pins = sorted(
        f"{e.name}=={e.version};{e.marker};{','.join(sorted(e.hashes))}"
        for entries in _lockfile().parse_lock(lock).values()
        for e in entries
    )
    return hashlib.sha256("\n".join(pins).encode()).hexdigest()


def sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


_NO_MATCH = re.compile(r"No matching distribution found for ([A-Za-z0-9._-]+)==")


def _pip_download(args: list[str], reqs: str, out: Path, log: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    req_file = out / ".pending-requirements.txt"
    req_file.write_text(reqs)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--progress-bar", "off"]
    cmd += [*args, "-d", str(out), "-r", str(req_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    req_file.unlink()
    return proc


def download(plan: Plan, out: Path, log: Path) -> dict[str, Path]:
    """Fetch every "download" item into ``out`` (wheels for the node's tags, else the locked sdist); name -> file."""
    env = {**os.environ, "SAM2_BUILD_CUDA": "0"}  # sam2's metadata step must not try its CUDA extension
    target = ["--python-version", plan.node.python_version, "--implementation", "cp"]
    for tag in plan.node.platforms:
        target += ["--platform", tag]
    items = {i.name: i for i in plan.download()}
    sdists = [n for n in items if n in KNOWN_SDIST_ONLY]
    wheels = [n for n in items if n not in sdists]
    while wheels:
        text = "".join(
            type(i.entry)(i.name, i.entry.version, "", i.entry.hashes, []).text() for i in map(items.get, wheels)
        )
        proc = _pip_download(["--only-binary=:all:", *target], text, out, log, env)
        if proc.returncode == 0:
            break
        missing = [canonical(m) for m in _NO_MATCH.findall(proc.stdout + proc.stderr)]
        missing = [m for m in missing if m in wheels]
        if not missing:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
            raise SystemExit(
                f"wheelhouse.py: pip download of the wheels failed; the end of its output:\n{tail}\n(log: {log})"
            )
        for name in missing:  # no wheel for the node: take the locked sdist, built on the node
            wheels.remove(name)
            sdists.append(name)
            plan.notes.append(f"{name} {items[name].entry.version}: no wheel for the node, its sdist is built there")
    if sdists:
        text = "".join(
            type(i.entry)(i.name, i.entry.version, "", i.entry.hashes, []).text() for i in map(items.get, sdists)
        )
        proc = _pip_download(["--no-binary=:all:", "--no-build-isolation"], text, out, log, env)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
            raise SystemExit(
                f"wheelhouse.py: pip download of the sdists ({', '.join(sdists)}) failed; the end of its output:\n"
                f"{tail}\n"
                f"(log: {log}; run this script with the project's venv: their metadata is read with its setuptools)"
            )
    return match_files(plan, out)


def _file_key(filename: str) -> tuple[str, str]:
    """(canonical name, version) of a wheel or sdist file name."""
    if filename.endswith(".whl"):
        name, version = filename.split("-")[:2]
    else:
        stem = filename[: -len(".tar.gz")] if filename.endswith(".tar.gz") else filename[: -len(".zip")]
        name, _, version = stem.rpartition("-")
    return canonical(name), version


def match_files(plan: Plan, out: Path) -> dict[str, Path]:
    """The file of each downloaded item, its sha256 checked against the lock; stale files of other pins removed."""
    wanted = {i.name: i for i in plan.download()}
    found: dict[str, Path] = {}
    for path in sorted(out.iterdir()):
        if not path.name.endswith(ARCHIVES):
            continue
        name, version = _file_key(path.name)
        item = wanted.get(name)
        if item is None or not _same_version(version, item.entry.version) or sha256(path) not in item.entry.hashes:
            path.unlink()  # from an earlier build for another node or lock
            continue
        found[name] = path
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise SystemExit(f"wheelhouse.py: pip reported success but no file of {', '.join(missing)} is in {out}")
    return found


def build(args: argparse.Namespace) -> int:
    node = load_node(args)
    lock = Path(args.lock)
    lock = lock if lock.is_absolute() else REPO / lock
    reuse = tuple(args.reuse_node or ())
    try:
        plan = make_plan(
            lock, node, exclude=tuple(args.exclude or ()), reuse=reuse, allow_torch_mismatch=args.allow_torch_mismatch
        )
    except Refused as refused:
        print(refused, file=sys.stderr)
        return 1
    if plan.torch_mismatch:
        print(f"wheelhouse.py: warning: {plan.torch_mismatch}; building for the node's torch (--allow-torch-mismatch)")
    print(
        f"wheelhouse.py: {lock.relative_to(REPO) if lock.is_relative_to(REPO) else lock} for CPython {node.python} on "
        f"{node.machine} ({node.source}): {len(plan.download())} packages to download, {len(plan.left_out())} "
        "provided by the node or left out",
        flush=True,
    )
    if args.dry_run:
        for item in plan.items:
            print(f"  {item.action:<8} {item.name}=={item.entry.version}  ({item.why})")
        return 0
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not (out / "download.log").exists():
        print(f"wheelhouse.py: {out} is not empty and not a wheelhouse; name a new or empty folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # written again at the end: a broken build leaves no usable kit
    log = out / "download.log"
    log.write_text("")
    start = time.monotonic()
    for _ in range(4):  # reused node packages that a downloaded one rejects are downloaded instead (a fixpoint)
        files = download(plan, out, log)
        problems = unmet_requirements(plan, {name: requires_dist(path) for name, path in files.items()})
        # ordinary packages the node has (reused, or at the locked version): the lock's instead
        reused = {i.name: i for i in plan.left_out() if "reused" in i.why or "locked version" in i.why}
        switch = sorted({p.name for p in problems if p.name in reused})
        if not switch:
            break
        for name in switch:
            item = reused[name]
            plan.notes.append(
                f"{name}: the node's {item.node_version} does not meet "
                + "; ".join(f"{p.who} ({p.requirement})" for p in problems if p.name == name)
                + f": the locked {item.entry.version} is in the wheelhouse instead"
            )
            item.action, item.why = "download", f"the node's {item.node_version} is not accepted (see notes)"
    if problems:
        lines = "\n  ".join(p.line() for p in problems)
        print(
            f"wheelhouse.py: refused: {len(problems)} requirement(s) of the downloaded packages are not met on the "
            f"node:\n  {lines}\nInstall or exclude what is named (--exclude), or build for another torch; nothing to "
            f"install from {out}",
            file=sys.stderr,
        )
        (out / MANIFEST).unlink(missing_ok=True)
        return 1
    (out / REQUIREMENTS).write_text(plan.requirements_text())
    manifest = make_manifest(plan, files, lock, args)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(f["bytes"] for f in manifest["files"])
    for note in plan.notes:
        print(f"wheelhouse.py: note: {note}")
    node_torch = node.packages.get("torch")
    print(
        f"wheelhouse.py: done in {time.monotonic() - start:.0f} s: {out} holds {len(files)} files, "
        f"{size / 2**20:.1f} MiB, "
        f"for CPython {node.python_version} on {node.machine} with the node's torch {node_torch}; "
        f"{len(plan.left_out())} locked packages come from the node or are left out (manifest.json). On the node: "
        f"scripts/install.sh --wheelhouse {out} [VENV]"
    )
    return 0


def make_manifest(plan: Plan, files: dict[str, Path], lock: Path, args: argparse.Namespace) -> dict:
    rel = str(lock.relative_to(REPO)) if lock.is_relative_to(REPO) else str(lock)
    return {
        "format": FORMAT,
        "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "made_with": "scripts/wheelhouse.py " + " ".join(map(str, args.argv)),
        "lock": rel,
        "lock_pins_sha256": pins_digest(lock),
        "requirements": REQUIREMENTS,
        "node": {
            "source": plan.node.source,
            "python": plan.node.python,
            "python_version": plan.node.python_version,
            "machine": plan.node.machine,
            "platforms": plan.node.platforms,
            "torch": plan.node.packages.get("torch"),
        },
        "torch_mismatch": plan.torch_mismatch or None,
        "from_node": {
            i.name: {"locked": i.entry.version, "node": i.node_version, "why": i.why} for i in plan.left_out()
        },
        "notes": plan.notes,
        "files": [
            {
                "name": name,
                "version": next(i.entry.version for i in plan.download() if i.name == name),
                "file": path.name,
                "sha256": sha256(path),
                "bytes": path.stat().st_size,
            }
            for name, path in sorted(files.items())
        ],
    }


# --- on the node: scripts/install.sh --wheelhouse DIR --------------------------------------------------------------


def check_kit(folder: Path) -> str:
    """Why the wheelhouse ``folder`` cannot be installed with this Python ("" when it can): no manifest, made from
    another lock, for another Python or another torch, a file missing or changed."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return f"{folder} is not a wheelhouse (no {MANIFEST}); make one with scripts/wheelhouse.py build (docs/gpu.md)"
    manifest = json.loads(manifest_path.read_text())
    lock = REPO / manifest["lock"]
    if not lock.is_file() or pins_digest(lock) != manifest.get("lock_pins_sha256"):
        return (
            f"{folder} was made from other pins than this checkout's {manifest['lock']} (made {manifest['made']}); "
            "rebuild it from this checkout (scripts/wheelhouse.py build, docs/gpu.md)"
        )
    node = manifest["node"]
    here = "{}.{}".format(*sys.version_info[:2])
    if here != node["python_version"]:
        return (
            f"{folder} is for CPython {node['python_version']}, this Python is {here} ({sys.executable}); "
            "rebuild it for this one (scripts/wheelhouse.py probe here, then build --node)"
        )
    from importlib import metadata  # noqa: PLC0415

    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = None
    if torch != node["torch"]:
        return (
            f"{folder} was made for a node whose torch is {node['torch']}; {sys.executable} has "
            f"{torch or 'no torch'}: the venv uses this Python's torch (--system-site-packages); rebuild the "
            "wheelhouse for it"
        )
    for f in manifest["files"]:
        path = folder / f["file"]
        if not path.is_file():
            return f"{folder} lacks {f['file']}, which its {MANIFEST} lists; copy the whole folder again"
        if path.stat().st_size != f["bytes"] or sha256(path) != f["sha256"]:
            return f"{folder}/{f['file']} differs from the one its {MANIFEST} lists (sha256); copy the folder again"
    return ""


NODE_SITE_PTH = "_picosam_node_site.pth"


def link_node_site(venv: Path) -> list[str]:
    """Run by the node's Python: let ``venv`` (made from it with --system-site-packages) see the same packages.

    A venv made from a Python that is itself a venv (e.g. /opt/torch/.venv/bin/python3 holding torch) gets the base
    interpreter's site-packages, not that venv's; a .pth file in ``venv`` adds this Python's site folders after the
    venv's own (whose copies keep shadowing them). Returns the folders written ([]: this Python is no venv)."""
    if sys.prefix == sys.base_prefix:
        return []
    folders = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    purelib = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / NODE_SITE_PTH).write_text(
        "# the node's own site folders (scripts/install.sh --wheelhouse: this venv was made from a venv's Python)\n"
        + "".join(f"{f}\n" for f in folders)
    )
    return folders


_PIP_CHECK = re.compile(r"^(?P<who>\S+) \S+ (has requirement|requires) ")


def pip_check(folder: Path) -> int:
    """``pip check`` in a venv over the node's Python: its problems among the locked packages (and this project) stop
    the install; those of the node's own other packages (which the venv also sees) are counted in one line."""
    manifest = json.loads((folder / MANIFEST).read_text())
    locked = set(_lockfile().parse_lock(REPO / manifest["lock"])) | {"picosam-pipeline"}
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    ours, theirs = [], []
    for line in proc.stdout.splitlines():
        m = _PIP_CHECK.match(line)
        if m:
            (ours if canonical(m.group("who")) in locked else theirs).append(line)
    if theirs:
        who = sorted({canonical(line.split()[0]) for line in theirs})
        print(
            f"install.sh: note: pip check lists {len(theirs)} problem(s) of the node's own packages, outside the "
            f"locked stack ({', '.join(who[:8])}{', ...' if len(who) > 8 else ''}); not ours to fix"
        )
    if ours:
        print(
            "install.sh: pip check found broken requirements of the locked stack:\n  " + "\n  ".join(ours),
            file=sys.stderr,
        )
        return 1
    if proc.returncode != 0 and not theirs:
        print(f"install.sh: pip check failed:\n{proc.stdout}{proc.stderr}", file=sys.stderr)
        return 1
    return 0


def load_node(args: argparse.Namespace) -> Node:
    if args.node:
        return Node.from_probe(json.loads(Path(args.node).read_text()), args.node)
    if args.node_python:
        proc = subprocess.run(
            [args.node_python, str(Path(__file__).resolve()), "probe"], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise SystemExit(f"wheelhouse.py: probing {args.node_python} failed:\n{proc.stderr.strip()}")
        return Node.from_probe(json.loads(proc.stdout), args.node_python)
    if not args.python_version:
        raise SystemExit(
            "wheelhouse.py build: say what the node is: --node FILE, --node-python PY or --python-version X.Y"
        )
    packages = read_freeze(Path(args.node_freeze).read_text()) if args.node_freeze else {}
    for spec in args.node_package or ():
        packages.update(read_freeze(spec))
    source = f"Python {args.python_version}, glibc {args.glibc}" + (f", {args.node_freeze}" if args.node_freeze else "")
    return Node(args.python_version, manylinux_platforms(args.glibc, args.machine), packages, args.machine, source)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("probe", help="print this Python's node description (JSON); run it on the node")
    b = sub.add_parser("build", help="download the wheelhouse for a node")
    b.add_argument("-o", "--out", default="build/wheelhouse", help="the wheelhouse folder (default build/wheelhouse)")
    b.add_argument("--lock", default=DEFAULT_LOCK, help=f"the hash-locked requirements (default {DEFAULT_LOCK})")
    node = b.add_argument_group("the node (one of)")
    node.add_argument("--node", help="a node description: the output of `python3 scripts/wheelhouse.py probe` there")
    node.add_argument("--node-python", help="probe this interpreter (a node's Python reachable from here)")
    node.add_argument("--python-version", help="the node's Python X.Y, when no probe is at hand (with the next three)")
    node.add_argument("--glibc", default="2.28", help="the node's glibc, for its manylinux tags (default 2.28)")
    node.add_argument("--machine", default="x86_64", help="the node's machine (default x86_64)")
    node.add_argument("--node-freeze", help="the node's `pip list --format=freeze` (what it has installed)")
    node.add_argument(
        "--node-package", action="append", metavar="NAME==VERSION", help="one more package the node has (repeatable)"
    )
    b.add_argument("--exclude", nargs="+", metavar="NAME", help="leave these out (globs allowed, e.g. 'imx500-*')")
    b.add_argument(
        "--reuse-node",
        nargs="+",
        metavar="NAME",
        help="use the node's own version of these packages (or `all`) where it differs from the lock's",
    )
    b.add_argument(
        "--allow-torch-mismatch",
        action="store_true",
        help="build for a node whose torch release differs from the lock's (refused otherwise)",
    )
    b.add_argument("--dry-run", action="store_true", help="print the plan (what is downloaded, what not, why) only")
    c = sub.add_parser("check", help="exit 1 with one line if this Python cannot install the wheelhouse DIR")
    c.add_argument("dir", type=Path)
    pc = sub.add_parser("pip-check", help="pip check, failing only on the locked stack's problems (install.sh)")
    pc.add_argument("dir", type=Path)
    ln = sub.add_parser("link-node-site", help="(install.sh, run by the node's Python) let VENV see its packages")
    ln.add_argument("venv", type=Path)
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.cmd == "probe":
        json.dump(probe(), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    if args.cmd == "check":
        problem = check_kit(args.dir)
        if problem:
            print(f"install.sh: refused: {problem}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "pip-check":
        return pip_check(args.dir)
    if args.cmd == "link-node-site":
        link_node_site(args.venv)
        return 0
    return build(args)


if __name__ == "__main__":
    sys.exit(main())
