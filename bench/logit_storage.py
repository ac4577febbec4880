"""Storage benchmark for the teacher-logit store: bytes per instance on disk and fidelity of each codec.

Run from the repository root:  ``.venv/bin/python bench/logit_storage.py [--coco DIR] [--noise 0.3]``

No teacher is needed: realistic logits are made from the real COCO masks in ``../shared/data/coco-sample``
(train2017 + val2017). Recipe, per non-crowd annotation whose PicoSAM3 ROI has both sides >= 4 px:

1. ``mask`` = pycocotools ``annToMask``, cut to ``crops.roi_box(bbox, padding=0.1)`` and resized to 96x96
   (bilinear on 0/1, then >= 0.5): the student's crop frame.
2. ``d`` = signed distance to the mask edge in crop pixels (scipy EDT; > 0 inside, +-0.5 on the pixels
   next to the edge).
3. ``logit = clip(slope * d + smooth + noise, -32, 32)``: ``slope`` log-uniform in [1, 6] logits per crop pixel
   per instance (how sharp the teacher's edge is at crop scale: SAM2's 256x256 low-res logits are upsampled
   for small objects, downsampled for large ones); ``smooth`` = a 6x6 grid of normal(0, 2) upsampled bicubically
   (uneven confidence across the object); ``noise`` = normal(0, ``--noise``) per pixel; SAM2 clamps to +-32.

Each codec is written through the real store (``create_store`` / ``write_shard``) and measured on disk; the
PicoSAM3 layout (one ``torch.save`` of ``{"logits": float16 [1, 96, 96], "score", "bbox", "roi", "image_id"}``
per annotation) is written too, and its real file sizes measured (apparent and allocated, i.e. file-system
blocks). Fidelity is against the float32 logits: the largest |sigmoid difference| and the share of pixels
whose decision (logit > 0) changes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from picosam_pipeline.config import TeacherConfig  # noqa: E402
from picosam_pipeline.data.crops import roi_box  # noqa: E402
from picosam_pipeline.teacher.codec import CODECS, encode_logits  # noqa: E402
from picosam_pipeline.teacher.store import create_store, open_store  # noqa: E402

DEFAULT_COCO = REPO.parent / "shared" / "data" / "coco-sample"


def coco_like_logits(
    coco_dir: str | Path, size: int = 96, noise: float = 0.3, seed: int = 0, limit: int | None = None
) -> dict[str, np.ndarray]:
    """Realistic teacher logits from real COCO masks (recipe in the module docstring); ``limit``: at most that many.

    Returns:
        ``logits`` float32 ``(n, size, size)`` in [-32, 32]; ``ann_id``, ``image_id`` int64 ``(n,)``;
        ``crop_box`` int32 ``(n, 4)``; ``bbox`` float64 ``(n, 4)`` COCO xywh; ``confidence`` float32 ``(n,)``
        (uniform in [0.5, 1], a stand-in for the teacher's predicted IoU).
    """
    from PIL import Image
    from pycocotools.coco import COCO
    from scipy.ndimage import distance_transform_edt

    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in ("logits", "ann_id", "image_id", "crop_box", "bbox")}
    for split in ("train2017", "val2017"):
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(Path(coco_dir) / "annotations" / f"instances_{split}.json"))
        for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
            image = coco.imgs[ann["image_id"]]
            box, _ = roi_box(ann["bbox"], image["width"], image["height"], padding=0.1)
            if min(box.width, box.height) < 4 or len(rows["ann_id"]) == limit:
                continue
            crop = coco.annToMask(ann)[box.y1 : box.y2, box.x1 : box.x2].astype(np.float32)
            mask = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR)) >= 0.5
            d = np.where(mask, distance_transform_edt(mask) - 0.5, 0.5 - distance_transform_edt(~mask))
            slope = np.exp(rng.uniform(np.log(1.0), np.log(6.0)))
            coarse = Image.fromarray(rng.normal(0.0, 2.0, (6, 6)).astype(np.float32))
            smooth = np.asarray(coarse.resize((size, size), Image.BICUBIC))
            logits = slope * d + smooth + rng.normal(0.0, noise, (size, size))
            rows["logits"].append(np.clip(logits, -32, 32).astype(np.float32))
            rows["ann_id"].append(ann["id"])
            rows["image_id"].append(ann["image_id"])
            rows["crop_box"].append(tuple(box))
            rows["bbox"].append(ann["bbox"])
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["ann_id"], out["image_id"] = out["ann_id"].astype(np.int64), out["image_id"].astype(np.int64)
    out["crop_box"] = out["crop_box"].astype(np.int32)
    out["confidence"] = rng.uniform(0.5, 1.0, len(out["ann_id"])).astype(np.float32)
    return out


def fidelity(original: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """Largest / mean |sigmoid difference| and the share of pixels whose decision (logit > 0) changes."""
    err = np.abs(_sigmoid(decoded) - _sigmoid(original))
    return {
        "max_sigmoid_err": float(err.max()),
        "mean_sigmoid_err": float(err.mean()),
        "flipped": float(((decoded > 0) != (original > 0)).mean()),
    }


def storage_figures(
    data: dict[str, np.ndarray],
    work_dir: str | Path,
    instances_per_shard: int | str = "auto",
    compression_level: int = 5,
) -> list[dict]:
    """Write ``data`` (from :func:`coco_like_logits`) with every codec and as PicoSAM3 ``.pt`` files; measure.

    Returns one row per layout: ``layout``, ``bytes`` and ``allocated`` (file-system blocks) per instance,
    ``logits_bytes`` (the logits array alone, stores only), fidelity (:func:`fidelity`), and write / read
    rates in instances per second (reads: random batches of 64 rows).
    """
    work_dir = Path(work_dir)
    logits, n = data["logits"], len(data["logits"])
    side = logits.shape[-1]
    rows = [
        {
            "layout": "raw float32",
            "bytes": 4.0 * side * side,
            "allocated": 4.0 * side * side,
            **fidelity(logits, logits),
        }
    ]
    for codec in CODECS:
        path = work_dir / f"{codec}.zarr"
        start = time.perf_counter()
        store = create_store(
            path,
            side=side,
            instances_per_shard=instances_per_shard,
            codec=codec,
            compression_level=compression_level,
            attrs={"bench": "coco_like_logits"},
            rows=dict(
                ann_id=data["ann_id"],
                image_id=data["image_id"],
                crop_box=data["crop_box"],
                stored_box=data["crop_box"].astype(np.float64),
            ),
        )
        for k in store.pending_shards():
            r = store.shard_slice(k)
            store.write_shard(k, logits[r], confidence=data["confidence"][r])
        write_rate = n / (time.perf_counter() - start)
        reader = open_store(path)
        decoded = reader.read_logits(slice(None))
        batches = np.random.default_rng(0).integers(0, n, (20, 64))
        start = time.perf_counter()
        for batch in batches:
            reader.read_logits(batch)
        read_rate = batches.size / (time.perf_counter() - start)
        apparent, allocated = _sizes(path)
        rows.append(
            {
                "layout": f"zarr {codec}",
                "bytes": apparent / n,
                "allocated": allocated / n,
                "logits_bytes": _sizes(path / "logits")[0] / n,
                **fidelity(logits, decoded),
                "write_per_s": write_rate,
                "read_per_s": read_rate,
            }
        )
    rows.append(_picosam3_files(data, work_dir / "pt"))
    return rows


def shuffle_sweep(logits: np.ndarray, compression_level: int = 5) -> dict[str, dict[str, float]]:
    """Bytes per instance of each codec's values under Blosc-zstd with each shuffle (one chunk per instance)."""
    import numcodecs

    out = {}
    for name, codec in CODECS.items():
        values = encode_logits(logits, codec)
        out[name] = {
            label: sum(len(numcodecs.Blosc("zstd", compression_level, shuffle).encode(v)) for v in values) / len(values)
            for label, shuffle in (("noshuffle", 0), ("shuffle", 1), ("bitshuffle", 2))
        }
    return out


def _picosam3_files(data: dict[str, np.ndarray], folder: Path) -> dict:
    """PicoSAM3's cache: one ``ann_{id}.pt`` per annotation (``torch.save`` of a dict, float16 logits)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, ann_id in enumerate(data["ann_id"]):
        torch.save(
            {
                "logits": torch.from_numpy(data["logits"][i][None]).half(),
                "score": float(data["confidence"][i]),
                "bbox": [float(v) for v in data["bbox"][i]],
                "roi": tuple(int(v) for v in data["crop_box"][i]),
                "image_id": int(data["image_id"][i]),
            },
            folder / f"ann_{ann_id}.pt",
        )
    write_rate = len(data["ann_id"]) / (time.perf_counter() - start)
    decoded = np.stack([torch.load(folder / f"ann_{a}.pt")["logits"][0].float().numpy() for a in data["ann_id"]])
    apparent, allocated = _sizes(folder)
    n = len(data["ann_id"])
    return {
        "layout": "PicoSAM3 .pt per annotation",
        "bytes": apparent / n,
        "allocated": allocated / n,
        **fidelity(data["logits"], decoded),
        "write_per_s": write_rate,
    }


def _sizes(path: Path) -> tuple[int, int]:
    """Apparent bytes and allocated bytes (512-byte blocks in use) of the files under ``path``."""
    files = [f.stat() for f in path.rglob("*") if f.is_file()]
    return sum(s.st_size for s in files), sum(s.st_blocks * 512 for s in files)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", default=str(DEFAULT_COCO), help="COCO folder with annotations/instances_*2017.json")
    parser.add_argument("--noise", type=float, default=0.3, help="per-pixel logit noise (std) of the recipe")
    parser.add_argument(
        "--instances-per-shard",
        type=lambda v: v if v == "auto" else int(v),
        default=TeacherConfig().instances_per_shard,
        help="K, instances per store shard, or auto",
    )
    parser.add_argument("--level", type=int, default=TeacherConfig().compression_level, help="Blosc-zstd level")
    args = parser.parse_args()
    if not (Path(args.coco) / "annotations").is_dir():
        sys.exit(f"{args.coco}/annotations not found: pass --coco DIR (the coco-sample of ../shared/data)")

    import numcodecs
    import zarr

    data = coco_like_logits(args.coco, noise=args.noise)
    logits = data["logits"]
    print(
        f"# {len(logits)} COCO instances, 96x96 logits (mask share {(logits > 0).mean():.3f}, noise {args.noise}); "
        f"K={args.instances_per_shard}, zstd level {args.level}; zarr {zarr.__version__}, numcodecs "
        f"{numcodecs.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = storage_figures(data, tmp, args.instances_per_shard, args.level)
    print(
        f"{'layout':<28} {'B/inst':>8} {'alloc':>8} {'logits':>8} {'vs f32':>7} {'max|dsig|':>10} "
        f"{'mean|dsig|':>10} {'flipped':>8} {'write/s':>8} {'read/s':>8}"
    )
    for r in rows:
        logits_bytes = f"{r['logits_bytes']:8.0f}" if "logits_bytes" in r else f"{'':8}"
        rates = "".join(f" {r[k]:8.0f}" if k in r else f" {'':8}" for k in ("write_per_s", "read_per_s"))
        print(
            f"{r['layout']:<28} {r['bytes']:8.0f} {r['allocated']:8.0f} {logits_bytes} "
            f"{rows[0]['bytes'] / r['bytes']:6.1f}x "
            f"{r['max_sigmoid_err']:10.5f} {r['mean_sigmoid_err']:10.6f} {r['flipped']:8.5f}{rates}"
        )
    print("\n# Blosc-zstd bytes per instance by shuffle (values only, one chunk per instance)")
    for codec, sizes in shuffle_sweep(logits, args.level).items():
        print(f"{codec:<14} " + "  ".join(f"{label} {b:6.0f}" for label, b in sizes.items()))


if __name__ == "__main__":
    main()
