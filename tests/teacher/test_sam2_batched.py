"""The batched teacher pass: SAM2 on its own modules (teacher/sam2_batched.py), images read ahead
(teacher/image_feed.py), shards written behind compute (teacher/shard_writer.py), crops and codec on the device.

The ``slow`` test runs the real random-weight SAM2.1-tiny through the stage three ways on the sample -- SAM2's own
``SAM2ImagePredictor`` one image at a time (the stage's path before), and the batched path at 1 and 8 images per
encoder forward -- and checks that the stored mask decisions agree on >= 99.99 % of the pixels.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from picosam_pipeline.cli import cli
from picosam_pipeline.config import TeacherConfig
from picosam_pipeline.device import Runtime, resolve_runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.stages import teacher_logits
from picosam_pipeline.teacher import runner
from picosam_pipeline.teacher.base import RandomWeightsWarning, TeacherOutput
from picosam_pipeline.teacher.codec import CODECS, SIGMOID_ERROR_BOUND, encode_logits, encode_logits_torch
from picosam_pipeline.teacher.geometry import crop_logits
from picosam_pipeline.teacher.image_feed import gpu_jpeg_bytes, image_batches
from picosam_pipeline.teacher.sam2_batched import Sam2Teacher
from picosam_pipeline.teacher.sam2_predictor import Sam2PredictorTeacher
from picosam_pipeline.teacher.shard_writer import PendingShard, ShardAssembler, ShardWriter
from picosam_pipeline.teacher.store import create_store, open_store
from tests.helpers.teacher_project import config

CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=0)


@pytest.fixture(scope="module")
def tiny() -> Sam2Teacher:
    cfg = TeacherConfig(model="sam2.1_hiera_tiny", checkpoint=None, allow_random_weights=True)
    with pytest.warns(RandomWeightsWarning):
        return Sam2Teacher.build(cfg, CPU)


def images_and_boxes() -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """Two random images of different sizes with 3 and 4 boxes (each encode costs seconds on the CPU)."""
    rng = np.random.default_rng(1)
    images, boxes = [], []
    for (h, w), n in (((96, 128), 3), ((120, 90), 4)):
        images.append(torch.from_numpy(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)))
        x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
        boxes.append(
            np.stack([x1, y1, x1 + rng.uniform(4, w / 2, n), y1 + rng.uniform(4, h / 2, n)], 1).astype(np.float32)
        )
    return images, boxes


@pytest.fixture(scope="module")
def together(tiny) -> list[TeacherOutput]:
    """Both images in one batch: one encoder forward, all 7 prompts in one decoder call."""
    images, boxes = images_and_boxes()
    return tiny.predict_images(images, boxes, "roi")


def test_a_batch_of_images_gives_what_each_image_gives_alone(tiny, together):
    images, boxes = images_and_boxes()
    for image, image_boxes, out in zip(images, boxes, together):
        alone = tiny.predict_images([image], [image_boxes], "roi")[0]
        assert out.image_logits.shape == (len(image_boxes), 256, 256) and out.confidence.shape == (len(image_boxes),)
        torch.testing.assert_close(out.image_logits, alone.image_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.confidence, alone.confidence, rtol=1e-4, atol=1e-4)


def test_out_of_memory_splits_the_batch_and_gives_the_same_logits(tiny, together, caplog):
    images, boxes = images_and_boxes()
    encode, decoder_forward = tiny.model.forward_image, tiny.model.sam_mask_decoder.forward
    calls = {"encoder": [], "decoder": []}

    def small_encoder(pixels):
        calls["encoder"].append(len(pixels))
        if len(pixels) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return encode(pixels)

    def small_decoder(**kwargs):
        calls["decoder"].append(len(kwargs["image_embeddings"]))
        if len(kwargs["image_embeddings"]) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return decoder_forward(**kwargs)

    tiny.model.forward_image, tiny.model.sam_mask_decoder.forward = small_encoder, small_decoder
    splits, decode_batch = tiny.splits, tiny.decode_batch
    try:
        got = tiny.predict_images(images, boxes, "roi")
    finally:
        tiny.model.forward_image, tiny.model.sam_mask_decoder.forward = encode, decoder_forward
        tiny.splits, tiny.decode_batch = splits, decode_batch
    assert calls["encoder"] == [2, 1, 1]  # 2 -> 1 + 1
    # On a CPU each image's prompts are their own decoder call: 3 fit, 4 do not; the chunk is halved from 32 until
    # the last image's prompts go in calls of 2
    assert calls["decoder"][0] == 3 and 4 in calls["decoder"] and calls["decoder"][-2:] == [2, 2]
    assert "splitting it" in caplog.text and caplog.text.count("splitting it") == 1  # said once
    for a, b in zip(together, got):
        torch.testing.assert_close(a.image_logits, b.image_logits, rtol=1e-4, atol=1e-4)


def test_crops_of_several_images_in_one_call_equal_one_call_per_image():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(0, 4, size=(5, 32, 32)).astype(np.float32))
    sizes = np.array([[640, 480]] * 2 + [[300, 500]] * 3)
    boxes = np.array([[0, 0, 100, 100], [600, 400, 640, 480], [10, 20, 200, 300], [0, 0, 300, 500], [5, 5, 9, 9]])
    together = crop_logits(logits, sizes, boxes, 24, 0.25)
    apart = torch.cat(
        [
            crop_logits(logits[:2], (640, 480), boxes[:2], 24, 0.25),
            crop_logits(logits[2:], (300, 500), boxes[2:], 24, 0.25),
        ]
    )
    assert torch.equal(together, apart)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_the_codec_on_the_device_gives_the_same_codes(codec):
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.normal(0, 8, 200_000), rng.normal(0, 1e-3, 20_000), [0.0, 1e-9, -1e-9, 7e4, -7e4, 2.0**-30]]
    ).astype(np.float32)
    assert np.array_equal(encode_logits_torch(torch.from_numpy(x), codec).numpy(), encode_logits(x, codec))
    with pytest.raises(ValueError, match="1 NaN/inf"):
        encode_logits_torch(torch.tensor([0.0, float("nan")]), codec)


def test_non_finite_teacher_output_is_refused_before_anything_is_stored():
    rows = runner.InstanceRows(
        ann_id=np.array([1]),
        image_id=np.array([7]),
        split=np.array(["val"], object),
        image_path=np.array(["x.jpg"], object),
        size=np.array([[64, 48]]),
        prompt=np.array([[1, 1, 9, 9]], np.float32),
        crop_box=np.array([[0, 0, 16, 16]], np.int32),
    )
    cfg = TeacherConfig(store_size=8)
    bad = TeacherOutput(torch.full((1, 16, 16), float("nan")), torch.ones(1))
    _, _, flags = runner.stored_codes([bad], [rows], cfg)
    with pytest.raises(
        PipelineError,
        match=r"sam2.1_hiera_tiny \(backend torch\) returned NaN/inf logits or "
        r"confidences for 1 instance\(s\): ann_id 1 of image 7;",
    ):
        runner.refuse_non_finite(flags.numpy(), [rows], cfg)


def jpeg(size=(64, 48), **save) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def test_only_plain_jpegs_of_the_indexed_size_go_to_the_gpu_decoder(tmp_path):
    files = {"plain.jpg": jpeg(), "progressive.jpg": jpeg(progressive=True), "truncated.jpg": jpeg()[:-200]}
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: PIL applies it, nvJPEG would not
    files["rotated.jpg"] = jpeg(exif=exif.tobytes())
    png = io.BytesIO()
    Image.new("RGB", (64, 48)).save(png, "PNG")
    files["png.jpg"] = png.getvalue()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    take = {name: gpu_jpeg_bytes(str(tmp_path / name), (64, 48)) is not None for name in files}
    assert take == {
        "plain.jpg": True,
        "progressive.jpg": False,
        "truncated.jpg": False,
        "rotated.jpg": False,
        "png.jpg": False,
    }
    assert gpu_jpeg_bytes(str(tmp_path / "plain.jpg"), (48, 64)) is None  # not the size the index has
    assert gpu_jpeg_bytes(str(tmp_path / "missing.jpg"), (64, 48)) is None  # PIL's decode names the problem


def test_image_batches_come_in_order_on_the_cpu():
    groups = [np.arange(i, i + 1) for i in range(5)]
    loaded = []

    def load(i: int) -> np.ndarray:
        loaded.append(i)
        return np.full((4 + i, 6, 3), i, np.uint8)

    batches = list(image_batches(groups, load, lambda i: b"never asked on a CPU", 2, torch.device("cpu"), threads=2))
    assert [[int(g[0]) for g in b.groups] for b in batches] == [[0, 1], [2, 3], [4]]
    assert [int(p[0, 0, 0]) for b in batches for p in b.pixels] == [0, 1, 2, 3, 4]
    assert [tuple(p.shape) for p in batches[2].pixels] == [(8, 6, 3)] and sorted(loaded) == [0, 1, 2, 3, 4]


def test_shards_are_handed_out_when_their_last_row_arrives_and_write_errors_surface(tmp_path):
    jobs = [PendingShard(0, None), PendingShard(1, None)]
    jobs[0].rows, jobs[1].rows = range(4), range(2)  # only len() is used
    assembler = ShardAssembler(jobs, side=2, dtype=np.dtype(np.uint8))
    codes = np.arange(6 * 4, dtype=np.uint8).reshape(6, 2, 2)
    assert assembler.add(np.array([3, 4, 5]), codes[[3, 4, 5]], np.ones(3, np.float32)) == [1]
    assert assembler.add(np.array([0, 1, 2]), codes[:3], np.ones(3, np.float32)) == [0]
    assert np.array_equal(assembler.pop(0)[0], codes[:4]) and np.array_equal(assembler.pop(1)[0], codes[4:])

    store = create_store(
        tmp_path / "s.zarr",
        side=2,
        instances_per_shard=2,
        codec="sigmoid_uint8",
        compression_level=1,
        attrs={},
        rows=dict(ann_id=[1, 2], image_id=[1, 1], crop_box=[[0, 0, 4, 4]] * 2, stored_box=[[0.0, 0.0, 4.0, 4.0]] * 2),
    )
    rows = runner.InstanceRows(
        ann_id=np.array([1, 2]),
        image_id=np.array([1, 1]),
        split=np.array(["v", "v"], object),
        image_path=np.array(["a", "a"], object),
        size=np.array([[8, 8]] * 2),
        prompt=np.zeros((2, 4), np.float32),
        crop_box=np.array([[0, 0, 4, 4]] * 2, np.int32),
    )
    with ShardWriter(store) as writer:
        writer.submit(PendingShard(0, rows), codes[:2], np.ones(2, np.float32))
    assert open_store(tmp_path / "s.zarr").done_shards().tolist() == [True]
    with pytest.raises(ValueError, match="encoded logits must be uint8"):
        with ShardWriter(store) as writer:
            writer.submit(PendingShard(0, rows), codes[:2].astype(np.float32), np.ones(2, np.float32))


@pytest.fixture(scope="module")
def project(teacher_project) -> tuple[Path, list[str]]:
    """The session's teacher project (tiny_project with 2 val images)."""
    return teacher_project


def run_stage(project, out: Path, *more: str):
    cfg = config(
        project[0],
        project[1],
        "teacher.checkpoint=null",
        f"teacher.out={out}",
        f"runtime.metrics_dir={out.parent / 'metrics'}",
        *more,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)  # said when a teacher is built, not when reused
        teacher_logits.run(cfg, resolve_runtime(cfg.runtime))
    return open_store(out)


@pytest.mark.slow
def test_the_batched_pass_stores_what_the_predictor_path_stored_whatever_the_batch(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project[0])
    monkeypatch.setattr(runner, "_session", None)
    monkeypatch.setattr(runner, "build_teacher", Sam2PredictorTeacher.build)
    reference = run_stage(project, tmp_path / "predictor" / "logits.zarr", "teacher.images_per_batch=1")
    monkeypatch.undo()
    monkeypatch.chdir(project[0])
    monkeypatch.setattr(runner, "_session", None)
    stores = {
        n: run_stage(project, tmp_path / f"batch{n}" / "logits.zarr", f"teacher.images_per_batch={n}") for n in (1, 8)
    }
    expected = reference.read_logits(slice(None))
    sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v.astype(np.float64)))  # noqa: E731
    for n, store in stores.items():
        got = store.read_logits(slice(None))
        assert got.shape == expected.shape and len(got) > 10
        assert ((got > 0) == (expected > 0)).mean() >= 0.9999, n
        assert np.abs(sigmoid(got) - sigmoid(expected)).max() <= SIGMOID_ERROR_BOUND["sigmoid_uint8"] + 1e-6, n
        assert np.allclose(store.read_meta()["confidence"], reference.read_meta()["confidence"], atol=1e-4)
    assert stores[8].attrs["teacher"]["build"]["path"] == "model modules, batched on the device"
    result = CliRunner().invoke(cli, ["verify-logits", str(stores[8].path), "--sample", "6", "--device", "cpu"])
    assert result.exit_code == 0 and result.output.rstrip().endswith("OK"), result.output
