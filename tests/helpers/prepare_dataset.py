"""A tiny COCO split on disk for the prepare stage's tests (good image 1 with annotation 1, and what a test adds),
the stage's config over it, and its outputs read back."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from picosam_pipeline.config import Config, PrepareConfig, RuntimeConfig, SplitSource

W, H = 64, 48  # every test image, in annotation orientation


def encode(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def noise_rgb(w: int = W, h: int = H) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return encode(noise_rgb(H, W), exif=exif.tobytes())  # stored 48x64, displayed 64x48


def truncated_jpeg() -> bytes:
    data = encode(noise_rgb())
    return data[: len(data) * 2 // 3]  # cut inside the scan data, as an interrupted download is


def annotation(ann_id: int, image_id: int, box=(10, 8, 20, 16), **extra) -> dict:
    x, y, w, h = box
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "iscrowd": 0,
        "area": float(w * h),
        "bbox": [x, y, w, h],
        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
        **extra,
    }


class Dataset:
    """A tiny COCO split on disk: image 1 is a good RGB JPEG with one good annotation (id 1)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, bytes | None] = {"good.jpg": encode(noise_rgb())}
        self.images = [{"id": 1, "file_name": "good.jpg", "width": W, "height": H}]
        self.annotations = [annotation(1, 1)]

    def add_image(self, image_id: int, name: str, data: bytes | None, n_anns: int = 1, **record) -> None:
        """Add an image (``data`` None: referenced but absent) with ``n_anns`` good annotations."""
        self.files[name] = data
        self.images.append({"id": image_id, "file_name": name, "width": W, "height": H, **record})
        self.annotations += [annotation(image_id * 100 + k, image_id) for k in range(n_anns)]

    def write(self, text: str | None = None, split: str = "val") -> SplitSource:
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            if data is not None:
                (self.root / "images" / name).write_bytes(data)
        path = self.root / f"instances_{split}.json"
        data = {"images": self.images, "annotations": self.annotations, "categories": [{"id": 1, "name": "thing"}]}
        path.write_text(text if text is not None else json.dumps(data))
        return SplitSource(split, str(path), str(self.root / "images"))


def prepare_config(tmp_path: Path, splits: list[SplitSource], **prepare) -> Config:
    return Config(
        runtime=RuntimeConfig(device="cpu", metrics_dir=str(tmp_path / "metrics")),
        prepare=PrepareConfig(splits=splits, out_dir=str(tmp_path / "prepared"), **prepare),
    )


def prepare_outputs(tmp_path: Path) -> tuple[dict, list[dict]]:
    metrics = json.loads((tmp_path / "prepared" / "report.json").read_text())  # the details
    headline = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    assert headline == {"kept": metrics["total"]["kept"], "dropped": metrics["total"]["dropped"]}
    lines = (tmp_path / "prepared" / "bad_inputs.jsonl").read_text().splitlines()
    return metrics, [json.loads(line) for line in lines]
