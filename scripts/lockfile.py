#!/usr/bin/env python3
"""The hash-locked requirement files (requirements/lock-cpu.txt, requirements/lock-cuda.txt): read them, tell
whether they still match their inputs, cut them for one pip call, and explain a refused install.

The locks are written by `make lock` (scripts/lock.sh, uv pip compile --generate-hashes) from
requirements/lock.in (which takes in base.txt, test.txt and constraints.txt), pyproject.toml with all its
extras, and the torch variant's pin (requirements/torch-<variant>.txt). scripts/install.sh installs from them
with pip's --require-hashes, so pip refuses any file whose sha256 is not listed.

Commands (stdlib + `packaging`, which pip vendors, so a bare venv can run them):
  check [--root DIR]                    exit 1 naming each difference between the inputs and the locks
  select LOCK (--only|--exclude) NAME.. [--missing-ok]
                                        print the lock's entries for these packages (or all but these)
  explain LOG LOCK                      one paragraph on why pip stopped, from its captured output

Only the declared requirements are compared (is each one in the lock, at a version it allows; is each
top-level lock entry still asked for); nothing is resolved again, so `check` is fast and offline. Whether the
lock's transitive pins are what a fresh resolution would pick is `make lock`'s job.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # a fresh venv before the lock is installed: pip's own copy
    from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]
    from pip._vendor.packaging.version import Version  # type: ignore[no-redef]

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("cpu", "cuda")
LOCK_INPUT = "requirements/lock.in"
# The Pythons the README names as supported: the locks are universal (scripts/lock.sh: --universal from 3.11 up)
# and CI installs each of these from them with the public registry only (`make check-install`). Markers of declared
# requirements are evaluated against each; a requirement that applies to any of them must be in the lock.
SUPPORTED_PYTHONS = ("3.11", "3.12", "3.13")
LOCK_ENV = {
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
# The line scripts/lock.sh writes into each lock's header; a lock resolved for one Python lacks it.
UNIVERSAL_HEADER = re.compile(r"universal: Python >= (?P<min>3\.\d+)")
PYPROJECT_VIA = "picosam-pipeline (pyproject.toml)"


def lock_path(variant: str) -> str:
    return f"requirements/lock-{variant}.txt"


def variant_input(variant: str) -> str:
    return f"requirements/torch-{variant}.txt"


@dataclass
class Entry:
    """One pinned package of a lock: ``name==version [; marker]`` with its allowed sha256 hashes and the
    packages or files that asked for it (uv's ``# via`` annotation)."""

    name: str
    version: str
    marker: str = ""
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)

    def applies(self, python: str) -> bool:
        """Whether pip installs this pin on CPython ``python`` (e.g. "3.13") on x86_64 Linux."""
        return not self.marker or Marker(self.marker).evaluate(marker_env(python))

    def text(self) -> str:
        """The entry as a requirements line pip accepts under --require-hashes."""
        head = f"{self.name}=={self.version}" + (f" ; {self.marker}" if self.marker else "")
        return " \\\n    ".join([head] + [f"--hash=sha256:{h}" for h in self.hashes]) + "\n"


def parse_lock(path: Path) -> dict[str, list[Entry]]:
    """The entries of a uv/pip-tools style hashed requirements file, by canonical name: one pin per package, or
    several with disjoint markers where the universal resolution forked it (e.g. onnx by Python version)."""
    entries: dict[str, list[Entry]] = {}
    current: Entry | None = None
    in_via = False
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line:
            continue
        if not raw[0].isspace() and not line.startswith("#"):
            spec, _, marker = line.rstrip("\\").strip().partition(";")
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)", spec.strip())
            if not m:
                raise ValueError(f"{path}: cannot read the line {raw!r} (expected name==version)")
            current = Entry(canonicalize_name(m.group(1)), m.group(3), marker.strip())
            entries.setdefault(current.name, []).append(current)
            in_via = False
            continue
        if current is None:
            continue
        if line.startswith("--hash=sha256:"):
            current.hashes.append(line.split(":", 1)[1].rstrip("\\").strip())
        elif line.startswith("# via"):
            rest = line[len("# via") :].strip()
            in_via = not rest
            if rest:
                current.via.append(rest)
        elif in_via and line.startswith("#   "):
            current.via.append(line[4:].strip())
        else:
            in_via = False
    return entries


@dataclass
class Declared:
    """A requirement written in one of the lock's inputs: ``kind`` is "require" (must be in the lock) or
    "constrain" (limits the version if the package is in the lock)."""

    req: Requirement
    source: str
    kind: str

    @property
    def name(self) -> str:
        return canonicalize_name(self.req.name)


def _read_requirements(root: Path, rel: str, kind: str, out: list[Declared]) -> None:
    for raw in (root / rel).read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "-c ")):
            sub = str(Path(rel).parent / line[3:].strip())
            _read_requirements(root, sub, "constrain" if line.startswith("-c") or kind == "constrain" else kind, out)
            continue
        if line.startswith("-"):
            raise ValueError(f"{rel}: option lines other than -r/-c are not supported in the lock's inputs: {raw!r}")
        out.append(Declared(Requirement(line), rel, kind))


def declared(root: Path, variant: str) -> list[Declared]:
    """Every requirement the ``variant`` lock is made from: requirements/lock.in (and the files it takes in),
    pyproject.toml's dependencies and all its extras, and the variant's torch pin."""
    out: list[Declared] = []
    _read_requirements(root, LOCK_INPUT, "require", out)
    _read_requirements(root, variant_input(variant), "constrain", out)
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    for spec in project.get("dependencies", []):
        out.append(Declared(Requirement(spec), "pyproject.toml", "require"))
    for extra, specs in sorted(project.get("optional-dependencies", {}).items()):
        for spec in specs:
            out.append(Declared(Requirement(spec), f"pyproject.toml [{extra}]", "require"))
    return [
        d for d in out if d.req.marker is None or any(d.req.marker.evaluate(marker_env(v)) for v in SUPPORTED_PYTHONS)
    ]


def marker_env(python: str) -> dict[str, str]:
    """The marker environment of CPython ``python`` (e.g. "3.12") on x86_64 Linux."""
    return dict(LOCK_ENV, python_version=python, python_full_version=f"{python}.0", extra="")


def _via_sources(entry: Entry) -> set[str]:
    """The input files an entry's ``# via`` names (``-r requirements/base.txt`` -> requirements/base.txt)."""
    found = set()
    for via in entry.via:
        if via == PYPROJECT_VIA:
            found.add("pyproject.toml")
        elif via.startswith(("-r ", "-c ")):
            found.add(via[3:].strip())
    return found


def check(root: Path = REPO) -> list[str]:
    """Every difference between the lock inputs and requirements/lock-*.txt, one sentence each ([] = in step)."""
    problems: list[str] = []
    locks: dict[str, dict[str, list[Entry]]] = {}
    for variant in VARIANTS:
        path = root / lock_path(variant)
        if not path.exists():
            problems.append(f"{lock_path(variant)} is missing")
            continue
        lock = locks[variant] = parse_lock(path)
        problems += _check_header(path, lock_path(variant))
        problems += _check_forks(lock, lock_path(variant))
        decl = declared(root, variant)
        for d in decl:
            problems += _check_declared(d, lock.get(d.name, []), lock_path(variant))
        # The reverse: a package the lock says an input file asked for must still be asked for there.
        asked: dict[str, set[str]] = {}
        for d in decl:
            asked.setdefault(d.source.split(" [", 1)[0], set()).add(d.name)
        for entry in (e for pins in lock.values() for e in pins):
            for source in sorted(_via_sources(entry)):
                if source not in asked and not (root / source).exists():
                    problems.append(f"{lock_path(variant)} has {entry.name} from {source}, which no longer exists")
                elif entry.name not in asked.get(source, set()):
                    problems.append(
                        f"{lock_path(variant)} has {entry.name}=={entry.version} as asked for by "
                        f"{source}, which no longer asks for it"
                    )
            if not entry.hashes:
                problems.append(f"{lock_path(variant)}: {entry.name}=={entry.version} has no hash")
    if len(locks) == len(VARIANTS):
        problems += _compare_variants(locks["cpu"], locks["cuda"])
    return problems


def _check_declared(d: Declared, pins: list[Entry], name: str) -> list[str]:
    """A declared requirement against the lock's pins of its package, on every supported Python it applies to."""
    problems = []
    for python in SUPPORTED_PYTHONS:
        if d.req.marker is not None and not d.req.marker.evaluate(marker_env(python)):
            continue
        applying = [e for e in pins if e.applies(python)]
        if not applying:
            if d.kind == "require":
                where = "" if not pins else f" for Python {python}"
                problems.append(f"{d.req} ({d.source}) is not in {name}{where}")
            continue
        for entry in applying:
            if not d.req.specifier.contains(Version(entry.version), prereleases=True):
                problems.append(
                    f"{name} pins {entry.name}=={entry.version}, which {d.source} no longer allows ({d.req})"
                )
    return sorted(set(problems))


def _check_forks(lock: dict[str, list[Entry]], name: str) -> list[str]:
    """Several pins of one package are a fork of the universal resolution: on each supported Python at most one may
    apply, or pip would be asked for two versions at once."""
    problems = []
    for pins in (p for p in lock.values() if len(p) > 1):
        for python in SUPPORTED_PYTHONS:
            applying = [e for e in pins if e.applies(python)]
            if len(applying) > 1:
                problems.append(
                    f"{name} pins {pins[0].name} twice for Python {python}: "
                    + " and ".join(f"{e.version} ; {e.marker or 'always'}" for e in applying)
                )
    return problems


def _check_header(path: Path, name: str) -> list[str]:
    """A lock must say it was resolved universally from the oldest supported Python up (scripts/lock.sh's header)."""
    header = "".join(line for line in path.read_text().splitlines()[:5] if line.startswith("#"))
    m = UNIVERSAL_HEADER.search(header)
    if m is None:
        return [
            f"{name} was not resolved for every supported Python ({', '.join(SUPPORTED_PYTHONS)}): its header lacks "
            "'universal: Python >= ...' (a lock made for one Python, e.g. with --python-platform)"
        ]
    if Version(m.group("min")) > Version(SUPPORTED_PYTHONS[0]):
        return [f"{name} covers Python >= {m.group('min')}, but {SUPPORTED_PYTHONS[0]} is supported"]
    return []


def _compare_variants(cpu: dict[str, list[Entry]], cuda: dict[str, list[Entry]]) -> list[str]:
    """The two locks must differ only in torch's build and what that build alone pulls in (CUDA libraries)."""
    problems = []
    for name in sorted(cpu.keys() & cuda.keys()):
        a, b = cpu[name], cuda[name]
        if name == "torch":
            if {Version(e.version).public for e in a} != {Version(e.version).public for e in b}:
                problems.append(f"torch differs beyond its build: {_versions(a)} (cpu) vs {_versions(b)} (cuda)")
        elif sorted((e.version, e.marker, sorted(e.hashes)) for e in a) != sorted(
            (e.version, e.marker, sorted(e.hashes)) for e in b
        ):
            problems.append(
                f"{name} differs between the cpu and cuda locks ({_versions(a)} vs {_versions(b)}): "
                "regenerate both with make lock"
            )
    for variant, lock, other in (("cpu", cpu, cuda), ("cuda", cuda, cpu)):
        only = lock.keys() - other.keys()
        for name in sorted(only):
            via = [v for e in lock[name] for v in e.via]
            vias = {canonicalize_name(v.split()[0]) for v in via if not v.startswith("-")}
            if not vias or not vias <= (only | {"torch"}):
                problems.append(
                    f"{name} is only in the {variant} lock but is not pulled in by that torch build alone "
                    f"(via {', '.join(via)})"
                )
    return problems


def _versions(pins: list[Entry]) -> str:
    return " / ".join(e.version + (f" ; {e.marker}" if len(pins) > 1 and e.marker else "") for e in pins)


def select(lock: Path, names: list[str], exclude: bool, missing_ok: bool = False) -> str:
    """The lock's entries for ``names`` (or for all packages but them, every fork of each), as a requirements file.
    ``missing_ok``: names the lock lacks are skipped (a wheelhouse's cut of the lock, scripts/wheelhouse.py)."""
    entries = parse_lock(lock)
    wanted = {canonicalize_name(n) for n in names}
    unknown = wanted - entries.keys()
    if unknown and not missing_ok:
        raise SystemExit(f"lockfile.py select: {', '.join(sorted(unknown))} not in {lock}")
    return "".join(e.text() for n, pins in entries.items() if (n in wanted) != exclude for e in pins)


# --- why pip stopped --------------------------------------------------------------------------------------

_MISMATCH = re.compile(r"^\s+(?P<req>[A-Za-z0-9._-]+)(==(?P<ver>\S+))? from (?P<url>\S+?):?(\s+\(from .*)?$")
_EXPECTED = re.compile(r"^\s+Expected sha256 (?P<h>[0-9a-f]+)")
_GOT = re.compile(r"^\s+Got\s+(?P<h>[0-9a-f]+)")
_UNHASHED = re.compile(r"^\s+(?P<req>[A-Za-z0-9._-]+)==(?P<ver>\S+) --hash=sha256:(?P<h>[0-9a-f]+)")
_NO_MATCH = re.compile(r"No matching distribution found for (?P<req>\S+)")


def explain(log_text: str, lock: str, log_name: str) -> str:
    """One paragraph naming what pip refused and what to do, or the end of the log if the failure is another."""
    lines = log_text.splitlines()
    refused, unhashed = [], []
    section = None
    for line in lines:
        if "THESE PACKAGES DO NOT MATCH THE HASHES" in line:
            section = "mismatch"
        elif "Hashes are required in --require-hashes mode" in line:
            section = "unhashed"
        elif section == "mismatch" and (m := _MISMATCH.match(line)):
            refused.append(
                {
                    "req": m.group("req"),
                    "ver": m.group("ver") or "?",
                    "file": unquote(m.group("url").rsplit("/", 1)[-1].split("#", 1)[0]),
                }
            )
        elif section == "mismatch" and refused and (m := _EXPECTED.match(line)):
            refused[-1].setdefault("expected", []).append(m.group("h"))
        elif section == "mismatch" and refused and (m := _GOT.match(line)):
            refused[-1]["got"] = m.group("h")
        elif section == "unhashed" and (m := _UNHASHED.match(line)):
            unhashed.append(f"{m.group('req')} {m.group('ver')}")
    what = (
        "regenerate the lock with `make lock`, review the diff of requirements/lock-*.txt (which files changed, "
        "who publishes them) and commit it; otherwise do not install"
    )
    if refused:
        named = "; ".join(
            f"{r['req']} {r['ver']} (file {r['file']} has sha256 {r.get('got', '?')}, which is not among "
            f"the {len(r.get('expected', []))} the lock lists)"
            for r in refused
        )
        return (
            f"install.sh: pip refused {len(refused)} file(s) whose sha256 is not in {lock}: {named}. The file pip "
            f"found (on an index, a mirror, a cache or a local folder) is not the one the lock was reviewed with, so "
            f"nothing from this step was installed. If the change is expected (a re-upload, a new pin), {what}. "
            f"Full pip output: {log_name}"
        )
    if unhashed:
        return (
            f"install.sh: pip wanted {len(unhashed)} package(s) that {lock} does not list: {', '.join(unhashed)}. "
            f"A requirement changed without relocking, or a package gained a dependency: {what}. "
            f"Full pip output: {log_name}"
        )
    for line in lines:
        if m := _NO_MATCH.search(line):
            hint = ""
            if m.group("req").startswith("torch==") and "+cpu" in m.group("req"):
                hint = (
                    " That is PyTorch's CPU build, which the public registry does not serve, and no locked file of it "
                    "is reachable for this Python: run `make env` without TORCH=cpu (it then installs the registry's "
                    "torch, which runs on a CPU too), or put the CPU wheel in a folder on pip's find-links and "
                    "lock its hash (`make lock TORCH_CPU_FIND_LINKS=DIR`, see scripts/lock.sh)."
                )
            return (
                f"install.sh: no file of {m.group('req')} (pinned in {lock}) was found on the package indexes.{hint} "
                f"Full pip output: {log_name}"
            )
    tail = "\n".join(lines[-15:])
    return f"install.sh: pip failed installing from {lock}; the end of its output:\n{tail}\nFull pip output: {log_name}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="exit 1 naming each difference between the lock inputs and the locks")
    c.add_argument("--root", type=Path, default=REPO)
    s = sub.add_parser("select", help="print some entries of a lock")
    s.add_argument("lock", type=Path)
    group = s.add_mutually_exclusive_group(required=True)
    group.add_argument("--only", nargs="+")
    group.add_argument("--exclude", nargs="+")
    s.add_argument("--missing-ok", action="store_true", help="skip names the lock does not list")
    e = sub.add_parser("explain", help="explain a failed pip install from its captured output")
    e.add_argument("log", type=Path)
    e.add_argument("lock")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        problems = check(args.root)
        if problems:
            print(
                f"The lock no longer matches its inputs ({len(problems)} difference(s)); run `make lock`, review the "
                "diff of requirements/lock-*.txt, and commit it:\n  - " + "\n  - ".join(problems),
                file=sys.stderr,
            )
            return 1
        print("lock in step with requirements/ and pyproject.toml")
        return 0
    if args.cmd == "select":
        sys.stdout.write(
            select(args.lock, args.only or args.exclude, exclude=bool(args.exclude), missing_ok=args.missing_ok)
        )
        return 0
    print(explain(args.log.read_text(errors="replace"), args.lock, str(args.log)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
