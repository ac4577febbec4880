"""Inputs shared by the train, evaluate and deploy tests: the built-in sample prepared, a GT-mask teacher store,
packed shards, and a random-weight student whose masks cover about half of each crop.

tests/conftest.py builds them once per session (fixtures ``sample_inputs``, ``sample_shards``, ``sample_student``);
the functions here build variants (another store, other pack params) into a test's own folder."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import numpy as np
import torch

from picosam_pipeline.config import Config, PackConfig, PrepareConfig, RuntimeConfig, SampleConfig, SplitSource
from picosam_pipeline.stages import pack, prepare, sample
from picosam_pipeline.teacher.gt_mask import write_mask_teacher_store
from picosam_pipeline.train.loader import make_loader
from picosam_pipeline.train.shards import read_shard_index
from picosam_pipeline.train.students import NORMALIZATION, build_student, normalize


def build_inputs(root: Path, *, context_margin: float = 0.0, splits: list[SplitSource] | None = None) -> Config:
    """Index + GT-mask teacher store under ``root`` (the built-in sample unless ``splits``); returns the config."""
    builtin = splits is None
    if builtin:
        sample_dir = root / "sample"
        splits = [
            SplitSource(s, str(sample_dir / f"annotations/instances_{s}.json"), str(sample_dir / s))
            for s in ("train", "val")
        ]
    cfg = Config(
        runtime=RuntimeConfig(device="cpu", metrics_dir=str(root / "metrics")),
        sample=SampleConfig(out_dir=str(root / "sample"), train_images=6, val_images=3, plant_bad_inputs=False),
        prepare=PrepareConfig(splits=splits, out_dir=str(root / "prepared")),
        pack=PackConfig(
            index=str(root / "prepared/index.parquet"),
            stores_dir=str(root / "stores"),
            teachers=["gt"],
            splits=[s.name for s in splits],
            out_dir=str(root / "shards"),
            samples_per_shard=8,
        ),
    )
    if builtin:
        sample.run(cfg, None)
    prepare.run(cfg, None)
    write_mask_teacher_store(
        cfg.pack.index, cfg.pack.store_paths()["gt"], splits=cfg.pack.splits, context_margin=context_margin
    )
    return cfg


def elsewhere(cfg: Config, root: Path) -> Config:
    """``cfg`` writing into ``root``: its metrics to ``root/metrics``, pack to ``root/shards`` (the inputs it reads stay
    where they are): how a test runs stages on the session's shared inputs without writing into them."""
    return dataclasses.replace(
        cfg,
        runtime=dataclasses.replace(cfg.runtime, metrics_dir=str(root / "metrics")),
        pack=dataclasses.replace(cfg.pack, out_dir=str(root / "shards")),
    )


def own_store(cfg: Config, stores_dir: Path, name: str = "gt", **store_params) -> Config:
    """A GT-mask teacher store ``<stores_dir>/<name>.zarr`` of ``cfg``'s index (``store_params``: ``context_margin``,
    ``prompt``, ``gain``, ``confidence``); returns ``cfg`` packing from ``stores_dir``."""
    write_mask_teacher_store(cfg.pack.index, Path(stores_dir) / f"{name}.zarr", splits=cfg.pack.splits, **store_params)
    return dataclasses.replace(cfg, pack=dataclasses.replace(cfg.pack, stores_dir=str(stores_dir)))


def run_pack(cfg: Config, out: Path, **pack_params) -> dict:
    """Run the pack stage into ``out`` with ``pack_params`` overriding the section; returns its details
    (``<out>/report.json``: frame, teachers, per split and total counts; ``metrics/pack.json`` holds the headline)."""
    cfg = dataclasses.replace(cfg, pack=dataclasses.replace(cfg.pack, out_dir=str(out), **pack_params))
    pack.run(cfg, None)
    return json.loads((Path(out) / "report.json").read_text())


def tiny_export(root: Path, size: int = 16) -> Path:
    """``root/export``, the export stage's folder for a camera-input network of two convs (``size`` px, ImageNet
    normalisation in the graph) quantised by MCT for the IMX500: what the package stage converts, in seconds
    instead of the student's minutes. The stage's files come from the quantize stage's layout (``root/quantize``)."""
    from torch import nn

    from picosam_pipeline.config import load_config
    from picosam_pipeline.data.crops import crop_convention
    from picosam_pipeline.deploy import onnx_export as files
    from picosam_pipeline.deploy.quantize import RgbModel, camera_input_model, quantize
    from picosam_pipeline.stages import export

    torch.manual_seed(0)
    net = camera_input_model(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1)).eval())
    int8 = quantize(net, [torch.rand(8, 3, size, size) for _ in range(2)])  # [0, 1): the camera's p / 256 input
    quantized = root / "quantize"
    quantized.mkdir(parents=True)
    files.export_quantized(int8, quantized / files.QUANTIZE_MCTQ_FILE, fmt="mctq", input_size=size)
    files.export_quantized(int8, quantized / files.QUANTIZE_FAKEQUANT_FILE, fmt="fakequant", input_size=size)
    rgb = torch.rand(4, 3, size, size).numpy()
    logits = RgbModel(int8, "int8", size)(rgb)
    np.savez(quantized / files.QUANTIZE_PROBE_FILE, rgb=rgb, int8_logits=logits, float_logits=logits)
    meta = {"student": "tiny", "input_size": size, "normalization": dataclasses.asdict(NORMALIZATION)}
    crop = crop_convention("roi", roi_padding=0.1, window=96, input_size=size)
    (quantized / files.QUANTIZE_REPORT_FILE).write_text(
        json.dumps({"student_meta": meta, "crop": crop, "tpc_version": "4.0", "method": "ptq"})
    )
    cfg = load_config(
        None,
        [
            f"export.quantized_dir={quantized}",
            f"export.out_dir={root / 'export'}",
            f"runtime.metrics_dir={root / 'metrics'}",
            "export.min_mask_agreement=0.9",
        ],
    )
    export.run(cfg, None)
    return root / "export"


def read_tar_samples(path: Path) -> list[dict[str, bytes]]:
    """Samples of a shard in file order, read with the standard library (independently of the loader)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def split_samples(split_dir: Path) -> list[dict[str, bytes]]:
    index = read_shard_index(split_dir)
    return [s for entry in index.shards for s in read_tar_samples(index.shard_path(entry))]


def half_foreground_student(shards) -> torch.nn.Module:
    """A random-weight PicoSAM2 whose head bias puts the median logit on the val crops at 0, so its masks are
    texture-dependent and about half the crop: IoUs spread over (0, 1) instead of an all-background 0."""
    torch.manual_seed(0)
    model = build_student("picosam2").eval()
    batch = next(iter(make_loader(shards, batch_size=8, shuffle_buffer=0, num_workers=0, seed=0)))
    with torch.no_grad():
        model.output_head.bias -= model(normalize(batch["image"])).median()
    return model
