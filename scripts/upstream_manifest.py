#!/usr/bin/env python3
"""Prove that an installed third-party package is the upstream project's code: a committed manifest (path +
sha256 of every upstream file of the package's top-level folders at one commit) and a check of the installed
files against it.

Why: the registry's `sam2` 1.1.0 is not published by Meta. Its files were found equal to facebookresearch/sam2 at
commit 2b90b9f; the lock pins the sdist's hash, and this check ties that sdist's installed files to Meta's tree.

  build  --git-dir G --commit C --repository OWNER/NAME --distribution NAME==VERSION
         --complete TOP [--top TOP ...] -o FILE
         write the manifest from a git directory (a mirror is enough: `git ls-tree` and `git show`, no work tree)
  check  FILE [--root DIR]
         compare the installed distribution (or the package folders under DIR) with FILE; exit 1 naming every
         changed, extra and missing file

Which files are compared, and the rule for missing ones:
  * Installed side: every file of the distribution's top-level folders (its RECORD, plus anything else found on
    disk in those folders), except __pycache__/ and *.pyc. Every one must be in the manifest with the same
    sha256: a changed or extra file fails the check.
  * Upstream side: every file under the top-level folders at the commit. A file in a `--complete` folder (for
    sam2: `sam2/`, the package the project imports) must be installed. In the other folders (for sam2:
    `training/`, upstream's training code, which the sdist also installs but the project never imports) only
    what setuptools' find_packages ships must be installed: .py files in folders that are Python packages up to
    the top. Their other upstream files (a README, assets, a scripts/ folder without __init__.py) are marked
    "no" in the manifest's `shipped` column, may be absent, and are listed as such.
  * An upstream symlink is recorded with the sha256 of the file it points to (wheels copy the target's content).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

HEADER_KEYS = ("repository", "commit", "distribution", "complete", "top-level")


@dataclass(frozen=True)
class ManifestFile:
    path: str
    sha256: str
    shipped: bool
    link: str = ""  # the upstream symlink's target, if the path is a symlink


@dataclass
class Manifest:
    repository: str
    commit: str
    distribution: str  # NAME==VERSION
    complete: list[str]
    tops: list[str]
    files: dict[str, ManifestFile]

    @property
    def dist_name(self) -> str:
        return self.distribution.split("==")[0]

    @property
    def dist_version(self) -> str:
        return self.distribution.split("==")[1]


def _git(git_dir: str, *args: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True).stdout


def build(
    git_dir: str, commit: str, repository: str, distribution: str, complete: list[str], others: list[str]
) -> Manifest:
    """The manifest of the tree at ``commit`` under the ``complete`` and ``others`` top-level folders."""
    full = _git(git_dir, "rev-parse", "--verify", f"{commit}^{{commit}}").decode().strip()
    tops = complete + others
    listing = _git(git_dir, "ls-tree", "-r", "-z", full, "--", *tops).decode()
    entries = {}  # path -> (mode, blob)
    for item in filter(None, listing.split("\0")):
        meta, path = item.split("\t", 1)
        mode, _kind, blob = meta.split()
        entries[path] = (mode, blob)
    paths = set(entries)
    files = {}
    for path, (mode, blob) in sorted(entries.items()):
        link = ""
        if mode == "120000":  # a symlink: hash the content it points to, as an installed copy holds it
            link = _git(git_dir, "cat-file", "blob", blob).decode()
            target = str(PurePosixPath(path).parent / link)
            target = str(PurePosixPath(*_normalise(PurePosixPath(target).parts)))
            blob = entries[target][1]
        content = _git(git_dir, "cat-file", "blob", blob)
        files[path] = ManifestFile(path, hashlib.sha256(content).hexdigest(), _shipped(path, complete, paths), link)
    return Manifest(repository, full, distribution, complete, tops, files)


def _normalise(parts: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for p in parts:
        if p == "..":
            out.pop()
        elif p != ".":
            out.append(p)
    return out


def _shipped(path: str, complete: list[str], paths: set[str]) -> bool:
    """Whether an install built from this tree must contain ``path`` (see the module docstring)."""
    parts = PurePosixPath(path).parts
    if parts[0] in complete:
        return True
    if not path.endswith(".py"):
        return False
    # find_packages: every folder from the top-level one down to the file's own must have an __init__.py.
    return all("/".join(parts[:i]) + "/__init__.py" in paths for i in range(1, len(parts)))


def write(manifest: Manifest, out: Path) -> None:
    lines = [
        f"# Upstream files of the `{manifest.dist_name}` distribution's top-level folders, written by",
        "# scripts/upstream_manifest.py build; scripts/upstream_manifest.py check compares an install with it.",
        "# Columns: sha256 (of the file; of its target for a symlink), shipped (yes: an install must contain it;",
        "# no: setuptools does not ship it, it may be absent), path [-> symlink target].",
        f"# repository: {manifest.repository}",
        f"# commit: {manifest.commit}",
        f"# distribution: {manifest.distribution}",
        f"# complete: {' '.join(manifest.complete)}",
        f"# top-level: {' '.join(manifest.tops)}",
    ]
    for f in manifest.files.values():
        lines.append(f"{f.sha256}  {'yes' if f.shipped else 'no '}  {f.path}" + (f" -> {f.link}" if f.link else ""))
    out.write_text("\n".join(lines) + "\n")


def read(path: Path) -> Manifest:
    header: dict[str, str] = {}
    files = {}
    for line in path.read_text().splitlines():
        if line.startswith("# ") and ":" in line and line[2:].split(":", 1)[0] in HEADER_KEYS:
            key, value = line[2:].split(":", 1)
            header[key] = value.strip()
        elif line and not line.startswith("#"):
            sha, shipped, rest = line.split(None, 2)
            rel, _, link = rest.partition(" -> ")
            files[rel] = ManifestFile(rel, sha, shipped == "yes", link)
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise ValueError(f"{path}: header lacks {', '.join(missing)}")
    complete = header["complete"].split()
    tops = header["top-level"].split()
    return Manifest(header["repository"], header["commit"], header["distribution"], complete, tops, files)


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _skipped(rel: str) -> bool:
    return "__pycache__" in PurePosixPath(rel).parts or rel.endswith(".pyc")


def installed_files(manifest: Manifest, root: Path | None = None) -> tuple[Path, set[str], list[str]]:
    """``(root, files, notes)``: the installed files of the manifest's top-level folders, relative to ``root``
    (the distribution's site folder unless given). ``notes`` names problems found on the way (wrong version,
    files the distribution installs outside its top-level folders)."""
    notes: list[str] = []
    found: set[str] = set()
    if root is None:
        from importlib import metadata

        try:
            dist = metadata.distribution(manifest.dist_name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"upstream_manifest.py: {manifest.dist_name} is not installed in {sys.prefix}") from None
        if dist.version != manifest.dist_version:
            notes.append(
                f"installed {manifest.dist_name} is {dist.version}, the manifest is for {manifest.dist_version}"
            )
        root = Path(dist.locate_file(""))
        for f in dist.files or []:
            rel = PurePosixPath(f).as_posix()
            if _skipped(rel) or rel.split("/", 1)[0].endswith(".dist-info"):
                continue
            if rel.split("/", 1)[0] not in manifest.tops:
                notes.append(f"extra: {rel} (installed outside {', '.join(manifest.tops)})")
                continue
            found.add(rel)
    for top in manifest.tops:  # also what lies on disk without being in the RECORD
        folder = root / top
        if folder.is_dir():
            found |= {p.relative_to(root).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    return root, {rel for rel in found if not _skipped(rel)}, notes


def check(manifest: Manifest, root: Path | None = None) -> tuple[list[str], list[str]]:
    """``(problems, allowed_absent)``: changed / extra / missing files, and the unshipped upstream files absent."""
    root, found, problems = installed_files(manifest, root)
    for rel in sorted(found):
        entry = manifest.files.get(rel)
        if entry is None:
            problems.append(f"extra: {rel} (not in the upstream tree)")
        elif (root / rel).is_symlink() or _sha256(root / rel) != entry.sha256:
            problems.append(f"changed: {rel} (sha256 differs from upstream)")
    absent_ok = []
    for rel, entry in sorted(manifest.files.items()):
        if rel not in found:
            if entry.shipped:
                problems.append(f"missing: {rel}")
            else:
                absent_ok.append(rel)
    return problems, absent_ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write a manifest from a git directory")
    b.add_argument("--git-dir", required=True)
    b.add_argument("--commit", required=True)
    b.add_argument("--repository", required=True, help="owner/name, recorded in the header")
    b.add_argument("--distribution", required=True, help="NAME==VERSION of the installed distribution to check")
    b.add_argument("--complete", nargs="+", required=True, help="top-level folders an install must hold entirely")
    b.add_argument("--top", nargs="*", default=[], help="other top-level folders the distribution installs")
    b.add_argument("-o", "--output", type=Path, required=True)
    c = sub.add_parser("check", help="compare the installed distribution with a manifest")
    c.add_argument("manifest", type=Path)
    c.add_argument("--root", type=Path, help="a folder holding copies of the top-level folders, instead of the install")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        manifest = build(args.git_dir, args.commit, args.repository, args.distribution, args.complete, args.top)
        write(manifest, args.output)
        print(f"{args.output}: {len(manifest.files)} files of {manifest.repository} at {manifest.commit}")
        return 0
    manifest = read(args.manifest)
    problems, absent_ok = check(manifest, args.root)
    where = f"{manifest.repository} at {manifest.commit[:12]}"
    if problems:
        print(
            f"{manifest.dist_name} does not match {where} ({args.manifest}): {len(problems)} difference(s):\n  - "
            + "\n  - ".join(problems)
            + f"\nDo not use this install: reinstall {manifest.distribution} from the lock "
            "(make env), or, if upstream moved on deliberately, rebuild the manifest from the new commit after "
            "review (see docs/install.md).",
            file=sys.stderr,
        )
        return 1
    shipped = sum(1 for f in manifest.files.values() if f.shipped)
    print(
        f"{manifest.dist_name} matches {where}: {shipped} files equal"
        + (f"; not shipped by the package, as expected: {', '.join(absent_ok)}" if absent_ok else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
