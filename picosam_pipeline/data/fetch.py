"""Fetch the real assets: COCO 2017 images and annotations, LVIS v1 annotations, SAM2.1 checkpoints.

Each asset lands where the default ``params.yaml`` looks for it (paths relative to the destination root,
``data`` by default): checkpoints as ``checkpoints/<model>.pt`` (``teacher.checkpoint``), COCO unpacked to
``datasets/coco2017/{train2017,val2017,annotations/instances_*2017.json}`` and LVIS v1 to
``datasets/lvis_v1/annotations/lvis_v1_{train,val}.json``: the layouts of ``picosam_pipeline/datasets.py``,
so ``dataset.name`` alone switches the pipeline. ``fetch coco2017`` / ``fetch lvis_v1`` fetch a whole dataset;
LVIS reuses the COCO 2017 images, hard-linked into ``datasets/lvis_v1/{train2017,val2017}`` (no second copy
on disk, and DVC sees real files it can hash).

A download streams into ``<file>.part``; a rerun resumes it with an HTTP ``Range`` request (and starts over
when the server ignores ``Range``). The sha256 is computed while streaming and checked before the file is
renamed into place, so nothing unverified ever sits under the final name. Assets whose publisher gives no
sha256 are trusted on first use: the digest of the first complete download is recorded in
``<root>/assets.lock.json`` (meant to be committed) and every later download must match it.

Only the standard library talks to the network (``urllib``), with short timeouts: without network a fetch
fails within seconds and says which file to download by hand and exactly where to put it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from picosam_pipeline.data.checksums import sha256_file
from picosam_pipeline.errors import PipelineError

CHUNK = 1 << 20  # bytes per read / write / hash update
DEFAULT_TIMEOUT = 10.0  # s to connect or to wait for the next bytes; offline DNS failures return at once
DEFAULT_RESUMES = 3  # automatic Range resumes of a transfer that breaks off after it started
LOCK_NAME = "assets.lock.json"
USER_AGENT = "picosam-pipeline-fetch"


@dataclass(frozen=True)
class Asset:
    """One downloadable file and where it ends up; paths are relative to the destination root."""

    name: str
    url: str
    path: str  # where the download is kept: the checkpoint itself, or the archive until it is unpacked
    sha256: str | None  # published digest; None = trust on first use (recorded in the lock file)
    hash_source: str  # where ``sha256`` was published (shown by --list and in mismatch messages)
    size: str  # approximate download size, for --list and the manual-download message
    unpack_to: str | None = None  # unpack the zip here, then delete it; None: the download is the asset
    provides: tuple[str, ...] = ()  # paths an unpacked asset creates; present = nothing to do

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.provides if self.unpack_to else (self.path,)


# Published digests. COCO and LVIS: TensorFlow Datasets' download checksums (tensorflow/datasets,
# tensorflow_datasets/url_checksums/coco.txt and tensorflow_datasets/object_detection/lvis/checksums.tsv;
# the LVIS entry lists the same object under https://s3-us-west-2.amazonaws.com/dl.fbaipublicfiles.com/).
# SAM2.1 tiny: the Git LFS SHA256 of sam2.1_hiera_tiny.pt in Meta's own Hugging Face repository
# (huggingface.co/facebook/sam2.1-hiera-tiny), taken to be the same 092824 file as dl.fbaipublicfiles.com
# serves (a mismatch would say so; --sha256 overrides). For small / base_plus / large no digest published
# by Meta or a curated registry was found (only re-uploads by third parties), so they are trusted on first use.
_TFDS_COCO = "tensorflow/datasets url_checksums/coco.txt"
_TFDS_LVIS = "tensorflow/datasets object_detection/lvis/checksums.tsv"
_SAM2_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
_COCO, _LVIS = "datasets/coco2017", "datasets/lvis_v1"  # dataset folders (picosam_pipeline/datasets.py)


def _checkpoint(model: str, sha256: str | None, hash_source: str, size: str) -> Asset:
    return Asset(model, f"{_SAM2_BASE}/{model}.pt", f"checkpoints/{model}.pt", sha256, hash_source, size)


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "coco_train2017",
            "http://images.cocodataset.org/zips/train2017.zip",
            "downloads/train2017.zip",
            "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
            _TFDS_COCO,
            "19.3 GB",
            unpack_to=_COCO,
            provides=(f"{_COCO}/train2017",),
        ),
        Asset(
            "coco_val2017",
            "http://images.cocodataset.org/zips/val2017.zip",
            "downloads/val2017.zip",
            "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",
            _TFDS_COCO,
            "816 MB",
            unpack_to=_COCO,
            provides=(f"{_COCO}/val2017",),
        ),
        Asset(
            "coco_annotations2017",
            "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
            "downloads/annotations_trainval2017.zip",
            "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268",
            _TFDS_COCO,
            "253 MB",
            unpack_to=_COCO,
            provides=(f"{_COCO}/annotations/instances_train2017.json", f"{_COCO}/annotations/instances_val2017.json"),
        ),
        Asset(
            "lvis_v1_val",
            "https://dl.fbaipublicfiles.com/LVIS/lvis_v1_val.json.zip",
            "downloads/lvis_v1_val.json.zip",
            "5cae9a3c79aadb667550c2b5dcf7f4d86e059a41ec91ef690225b667e28e9ba5",
            _TFDS_LVIS,
            "64 MB",
            unpack_to=f"{_LVIS}/annotations",
            provides=(f"{_LVIS}/annotations/lvis_v1_val.json",),
        ),
        Asset(
            "lvis_v1_train",
            "https://dl.fbaipublicfiles.com/LVIS/lvis_v1_train.json.zip",
            "downloads/lvis_v1_train.json.zip",
            None,
            "",
            "350 MB",
            unpack_to=f"{_LVIS}/annotations",
            provides=(f"{_LVIS}/annotations/lvis_v1_train.json",),
        ),
        _checkpoint(
            "sam2.1_hiera_tiny",
            "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
            "huggingface.co/facebook/sam2.1-hiera-tiny (Git LFS SHA256)",
            "156 MB",
        ),
        _checkpoint("sam2.1_hiera_small", None, "", "184 MB"),
        _checkpoint("sam2.1_hiera_base_plus", None, "", "324 MB"),
        _checkpoint("sam2.1_hiera_large", None, "", "898 MB"),
    ]
}


# Whole datasets by the names `dataset.name` uses: their assets in fetch order, and image folders that LVIS
# shares with COCO (hard-linked from -> to after the assets are in place).
DATASETS: dict[str, tuple[str, ...]] = {
    "coco2017": ("coco_annotations2017", "coco_val2017", "coco_train2017"),
    "lvis_v1": ("lvis_v1_val", "lvis_v1_train", "coco_val2017", "coco_train2017"),
}
SHARED_IMAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "lvis_v1": ((f"{_COCO}/val2017", f"{_LVIS}/val2017"), (f"{_COCO}/train2017", f"{_LVIS}/train2017")),
}


class _Unreachable(Exception):
    """No HTTP response at all (DNS failure, refused, timeout): offline or wrong host; not retried."""


class _Interrupted(Exception):
    """The transfer started and broke off; the ``.part`` file keeps what arrived and can be resumed."""


# --------------------------------------------------------------------------------------------------
# public API


def get_asset(name: str) -> Asset:
    """The table entry for ``name``; :class:`PipelineError` naming the known assets otherwise."""
    if name not in ASSETS:
        raise PipelineError(
            f"unknown asset {name!r}; the assets are: {', '.join(ASSETS)} (see `picosam-pipeline fetch --list`)"
        )
    return ASSETS[name]


def expand(names: list[str] | tuple[str, ...]) -> list[Asset]:
    """The assets of ``names`` (asset names or whole datasets of :data:`DATASETS`), each once, in order."""
    seen: dict[str, Asset] = {}
    for name in names:
        for asset in DATASETS[name] if name in DATASETS else (name,):
            seen.setdefault(asset, get_asset(asset))
    return list(seen.values())


def link_images(root: str | Path, dataset: str) -> str:
    """Hard-link the image folders ``dataset`` shares with COCO (``SHARED_IMAGES``) into its own folder.

    Hard links cost no space and are real files to DVC (it does not follow symlinked folders). Files already
    linked are skipped, so a rerun finishes an interrupted one. Raises PipelineError when the source is
    missing or sits on another file system (hard links cannot cross it).
    """
    root, linked = Path(root), 0
    for src, dst in SHARED_IMAGES.get(dataset, ()):
        src, dst = root / src, root / dst
        if not src.is_dir():
            raise PipelineError(
                f"{src} is missing: fetch the COCO images first (`picosam-pipeline fetch {dataset}` fetches them)"
            )
        dst.mkdir(parents=True, exist_ok=True)
        for image in tqdm(sorted(src.iterdir()), desc=f"link {dst.name}", unit="img"):
            target = dst / image.name
            if target.exists():
                continue
            try:
                os.link(image, target)
            except OSError as err:
                raise PipelineError(
                    f"cannot hard-link {image} to {target} ({err.strerror}): {dataset} shares the COCO "
                    f"images and needs {dst} on the same file system as {src}"
                ) from None
            linked += 1
    return f"{dataset}: {linked} COCO images linked into {root / _LVIS}" if linked else f"{dataset}: images in place"


def tracked_paths(names: list[str] | tuple[str, ...], root: str | Path = "data") -> list[Path]:
    """What ``fetch --track`` hands to ``dvc add`` for ``names``: a dataset's whole folder, else each asset's
    outputs."""
    paths: list[Path] = []
    for name in names:
        new = (
            [Path(root) / "datasets" / name] if name in DATASETS else [Path(root) / p for p in get_asset(name).outputs]
        )
        paths += [p for p in new if p not in paths]
    return paths


def track(paths: list[Path]) -> str:
    """``dvc add`` ``paths`` (run from the DVC project's root) and say which files to commit to git.

    Raises PipelineError when DVC fails (not a DVC project, a path outside it, ...), with DVC's own message.
    """
    import subprocess
    import sys

    dvc = Path(sys.executable).with_name("dvc")  # the DVC of this environment, as dvc.yaml's commands are
    result = subprocess.run(
        [str(dvc) if dvc.exists() else "dvc", "add", *map(str, paths)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise PipelineError(
            f"`dvc add {' '.join(map(str, paths))}` failed: {result.stderr.strip() or result.stdout.strip()}; "
            "run fetch --track from the root of a DVC project (`dvc init`), or track the files by hand"
        )
    dvc_files = " ".join(f"{p}.dvc" for p in paths)
    return (
        f"tracked with DVC: {', '.join(map(str, paths))}; commit the pointers with "
        f"`git add {dvc_files} {' '.join(sorted({str(p.parent / '.gitignore') for p in paths}))}` and share the "
        "bytes with `dvc push`"
    )


def check_sha256(value: str) -> str:
    """Normalise a user-given digest (64 hex digits) to lower case."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise PipelineError(f"--sha256 {value!r}: expected 64 hexadecimal digits, as printed by `sha256sum FILE`")
    return value.lower()


def fetch(
    asset: Asset,
    root: str | Path = "data",
    *,
    url: str | None = None,
    sha256: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    resumes: int = DEFAULT_RESUMES,
    keep_archive: bool = False,
) -> str:
    """Put ``asset`` in place under ``root`` (download, verify, unpack) and return a one-line summary.

    Args:
        url: download from here instead of ``asset.url`` (a mirror); the digest check is unchanged.
        sha256: expected digest, overriding the published one and the lock file.
        timeout: seconds to connect or to wait for more data.
        resumes: how many times a transfer that breaks off is resumed automatically.
        keep_archive: keep the zip after unpacking (it is deleted by default to save disk).

    Raises:
        PipelineError: unreachable server (with manual-download instructions), HTTP error, digest
            mismatch, a transfer that kept breaking off, or an archive without the expected content.
    """
    root = Path(root)
    url = url or asset.url
    target = root / asset.path
    outputs = [root / p for p in asset.outputs]
    lock_path = root / LOCK_NAME
    lock = read_lock(lock_path)
    expected, source = _expected(asset, lock, lock_path, sha256)

    if asset.unpack_to and all(p.exists() for p in outputs):
        return f"{asset.name}: already in place ({', '.join(map(str, outputs))})"
    if target.exists():  # finished earlier (archive kept) or put there by hand
        digest = sha256_file(target)
        if expected is not None and digest != expected:
            raise PipelineError(
                f"{target} exists but its sha256 is {digest}, expected {expected} ({source}); "
                f"delete it and rerun `picosam-pipeline fetch {asset.name}` to download it again"
            )
        action = "verified"
    else:
        try:
            digest = download(
                url, target, expected=expected, source=source, timeout=timeout, resumes=resumes, desc=asset.name
            )
        except _Unreachable as err:
            raise PipelineError(_manual_hint(asset, url, target, expected, lock_path, str(err))) from None
        action = "downloaded"
    size = target.stat().st_size

    if asset.unpack_to:
        unpack(target, root / asset.unpack_to, outputs)
        if not keep_archive:
            target.unlink()
    if asset.sha256 is None and asset.name not in lock:  # recorded only now, after the archive proved readable
        record_first_use(lock_path, asset.name, url, digest, size)
        source += f"; recorded in {lock_path}"
    return f"{asset.name}: {action}, sha256 {digest} ({source}) -> {', '.join(map(str, outputs))}"


def download(
    url: str,
    target: Path,
    *,
    expected: str | None,
    source: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    resumes: int = DEFAULT_RESUMES,
    desc: str = "",
) -> str:
    """Download ``url`` to ``target`` through ``target.part``, resuming, and return the sha256 (hex).

    The file is renamed to ``target`` only when its digest equals ``expected`` (any digest when None).
    A mismatch removes the ``.part`` file; a transfer that keeps breaking off keeps it for a later resume.

    Raises:
        _Unreachable: no HTTP response (the caller turns it into manual-download instructions).
        PipelineError: HTTP error status, digest mismatch, or more than ``resumes`` interruptions.
    """
    part = target.with_name(target.name + ".part")
    for attempt in range(resumes + 1):
        try:
            digest = _transfer(url, part, timeout, desc)
            break
        except _Interrupted as err:
            if attempt == resumes:
                size = part.stat().st_size if part.exists() else 0
                raise PipelineError(
                    f"download of {url} broke off ({err}) after {resumes} resume(s); {part} keeps "
                    f"the {size} bytes received and rerunning the same command resumes from there"
                ) from None
    if expected is not None and digest != expected:
        size = part.stat().st_size
        part.unlink()
        raise PipelineError(
            f"sha256 mismatch for {url}: expected {expected} ({source}), got {digest}. The download "
            f"({size} bytes) was removed ({part}) and nothing was written to {target}. Rerun to "
            "download it again; a file that keeps arriving with another digest is not the published one "
            "(a broken mirror or proxy): fetch it from the official URL or a mirror you trust."
        )
    os.replace(part, target)  # atomic: target is either absent or complete and verified
    return digest


def unpack(archive: Path, dest: Path, outputs: list[Path]) -> None:
    """Unpack zip ``archive`` into ``dest`` and check that ``outputs`` exist afterwards.

    Members go to a staging folder inside ``dest`` first and are then moved in (whole folders by one
    rename where ``dest`` has none yet, merged where it has), so an interrupted unpack never leaves a
    half-filled ``dest/train2017`` that would later pass for complete.
    """
    staging = dest / f".{archive.name}.unpacking"
    if staging.exists():  # left by an interrupted run; the archive is still there, so start over
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            with tqdm(
                total=sum(m.file_size for m in members),
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"unpack {archive.name}",
            ) as bar:
                for member in members:
                    zf.extract(member, staging)  # drops absolute paths and '..'; CRC-checked on read
                    bar.update(member.file_size)
    except zipfile.BadZipFile as err:
        shutil.rmtree(staging)
        raise PipelineError(f"{archive} is not a readable zip archive ({err}); delete it and rerun fetch") from None
    _merge_tree(staging, dest)
    shutil.rmtree(staging)
    missing = [str(p) for p in outputs if not p.exists()]
    if missing:
        raise PipelineError(
            f"unpacked {archive} into {dest} but {missing} did not appear; the archive does not "
            "have the expected layout (a wrong --url?)"
        )


def read_lock(path: Path) -> dict[str, Any]:
    """The lock file (``{asset: {url, sha256, bytes, recorded}}``), empty when it does not exist."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(
            f"{path} is not valid JSON ({err}); restore it from git or delete the broken entry"
        ) from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a JSON object {{asset: {{sha256, ...}}}}; restore it from git")
    return data


def record_first_use(path: Path, name: str, url: str, digest: str, size: int | None) -> None:
    """Add ``name``'s digest to the lock file (rewritten atomically, keys sorted for stable diffs)."""
    lock = read_lock(path)
    lock[name] = {
        "url": url,
        "sha256": digest,
        "bytes": size,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def format_table(root: str | Path = "data") -> str:
    """The asset table for ``fetch --list``: name, size, destination, URL and where the sha256 comes from."""
    root = Path(root)
    lock_path = root / LOCK_NAME
    lock = read_lock(lock_path)
    lines = []
    for name, members in DATASETS.items():
        lines.append(f"{name}  (dataset: {', '.join(members)}) -> {root / 'datasets' / name}")
    for a in ASSETS.values():
        if a.sha256:
            digest = f"sha256 {a.sha256}  [{a.hash_source}]"
        elif a.name in lock:
            digest = f"sha256 {lock[a.name]['sha256']}  [recorded on first use in {lock_path}]"
        else:
            digest = f"sha256 not published: trusted on first use, then recorded in {lock_path}"
        lines += [
            f"{a.name}  ({a.size})  -> {', '.join(str(root / p) for p in a.outputs)}",
            f"    {a.url}",
            f"    {digest}",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# internals


def _expected(asset: Asset, lock: dict[str, Any], lock_path: Path, override: str | None) -> tuple[str | None, str]:
    """The digest to check against and where it comes from: --sha256, the table, the lock file, or none."""
    if override:
        return check_sha256(override), "given with --sha256"
    if asset.sha256:
        return asset.sha256, f"published, {asset.hash_source}"
    if asset.name in lock:
        return lock[asset.name]["sha256"], f"recorded in {lock_path} on first use"
    return None, "no published sha256, trusted on first use"


def _transfer(url: str, part: Path, timeout: float, desc: str) -> str:
    """One HTTP request appending the rest of ``url`` to ``part``; returns the sha256 of the whole file."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:  # resume: ask only for the bytes after what the .part already holds
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: either complete, or the .part is not this file
            total = (err.headers.get("Content-Range") or "").rpartition("/")[2]
            if total == str(have):
                return sha256_file(part)
            part.unlink()
            return _transfer(url, part, timeout, desc)
        raise PipelineError(
            f"{url} answered HTTP {err.code} {err.reason}; check the URL (or pass a mirror with --url)"
        ) from None
    except (urllib.error.URLError, OSError) as err:
        raise _Unreachable(str(getattr(err, "reason", err))) from None

    part.parent.mkdir(parents=True, exist_ok=True)  # only now: an offline attempt leaves no empty folders
    with resp:
        # 206 + a Content-Range starting where the .part ends: append. Anything else (a plain 200 from a
        # server that ignores Range, or from file://) resends the whole file: start over.
        resumed = have > 0 and resp.status == 206 and _range_start(resp.headers.get("Content-Range")) == have
        hasher = hashlib.sha256()
        if resumed:
            sha256_file(part, hasher)  # the kept prefix, so the digest covers the whole file
        else:
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length else None
        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=desc or part.name
            ) as bar,
        ):
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (OSError, http.client.HTTPException) as err:  # reset, read timeout, IncompleteRead
                    raise _Interrupted(f"{type(err).__name__}: {err}") from None
                if not chunk:
                    break
                f.write(chunk)
                hasher.update(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:  # http.client returns b"" when the peer closes early
        raise _Interrupted(f"connection closed at {size} of {total} bytes")
    return hasher.hexdigest()


def _range_start(content_range: str | None) -> int | None:
    """First byte of a ``Content-Range: bytes START-END/TOTAL`` header, or None."""
    m = re.match(r"bytes (\d+)-", content_range or "")
    return int(m.group(1)) if m else None


def _merge_tree(src: Path, dst: Path) -> None:
    """Move everything under ``src`` into ``dst``: renames where ``dst`` has no entry, merges folders."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        into = dst / entry.name
        if entry.is_dir() and into.is_dir():
            _merge_tree(entry, into)
        else:
            os.replace(entry, into)  # a new folder moves in whole; a file replaces an older copy


def _manual_hint(asset: Asset, url: str, target: Path, expected: str | None, lock_path: Path, reason: str) -> str:
    """The offline message: what to download by hand, where to put it, how to finish."""
    check = (
        f"its sha256 must be {expected}"
        if expected
        else f"no sha256 is published for it, so the first file found is trusted and its digest recorded in {lock_path}"
    )
    finish = ("verify" if expected else "record its sha256") + (" and unpack it" if asset.unpack_to else "")
    return (
        f"cannot reach {url} ({reason}); this machine seems to be offline or the host is blocked. "
        f"Download {url} ({asset.size}) by hand on a machine with network, copy it to {target} "
        f"({check}), then rerun `picosam-pipeline fetch {asset.name}` to {finish}."
    )
