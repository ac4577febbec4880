"""Teacher adapters: SAM2.1-tiny with random weights (real model, CPU), safe checkpoint loading, SAM3 pieces.

Here: SAM3's probability -> logit conversion and the missing-extra error; the SAM3 teachers themselves run in
``test_sam3.py`` (real sam3 0.1.4 code, seeded random weights: its checkpoint is gated).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from picosam_pipeline.config import SAM2_MODELS, TeacherConfig
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.teacher.base import RandomWeightsWarning
from picosam_pipeline.teacher.build import build_teacher
from picosam_pipeline.teacher.sam2_batched import Sam2Teacher
from picosam_pipeline.teacher.sam2_predictor import sam2_config_name
from picosam_pipeline.teacher.sam3_teacher import probabilities_to_logits
from picosam_pipeline.teacher.weights import state_dict_sha256
from tests.helpers.malicious_pickle import CodeOnLoad
from tests.helpers.paths import REPO

CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=0)
BOXES = np.array([[10, 12, 60, 70], [0, 0, 127, 95], [70, 30, 120, 90], [40, 40, 48, 50]], np.float32)
POINTS = np.array([[30, 40], [100, 60], [0, 0]], np.float32)


def random_tiny(seed: int = 0, **fields) -> tuple[TeacherConfig, Runtime]:
    cfg = TeacherConfig(model="sam2.1_hiera_tiny", checkpoint=None, allow_random_weights=True, **fields)
    return cfg, Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=seed)


def build_quietly(cfg: TeacherConfig, runtime: Runtime) -> Sam2Teacher:
    with pytest.warns(RandomWeightsWarning, match="RANDOM weights"):
        return build_teacher(cfg, runtime)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny(image):
    """A random-weight SAM2.1-tiny with the test image set and BOXES / POINTS decoded once (shared: CPU is scarce).

    Returns ``(teacher, box_output, point_output, calls)``; ``calls`` counts image-encoder and mask-decoder runs.
    """
    teacher = build_quietly(*random_tiny())
    calls = {"encoder": 0, "decoder": 0}
    teacher.model.image_encoder.register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    teacher.model.sam_mask_decoder.register_forward_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))
    teacher.set_image(image)
    return teacher, teacher.predict_boxes(BOXES), teacher.predict_points(POINTS), calls


def test_one_encoder_pass_per_image_and_one_decoder_call_per_prompt_batch(tiny):
    teacher, boxes_out, points_out, calls = tiny
    assert boxes_out.image_logits.shape == (len(BOXES), 256, 256) and boxes_out.image_logits.dtype == torch.float32
    assert boxes_out.confidence.shape == (len(BOXES),) and boxes_out.confidence.dtype == torch.float32
    assert points_out.image_logits.shape == (len(POINTS), 256, 256) and points_out.confidence.shape == (len(POINTS),)
    decoder_before = calls["decoder"]
    single = teacher.predict_boxes(BOXES[:1])
    assert single.image_logits.shape == (1, 256, 256) and single.confidence.shape == (1,)
    assert calls["decoder"] == decoder_before + 1
    assert decoder_before == 2  # 4 boxes in one decoder call, 3 points in another
    assert calls["encoder"] == 1  # the image was encoded once, whatever the number of instances
    assert teacher.predict_boxes(np.zeros((0, 4))).image_logits.shape == (0, 256, 256)


def test_outputs_are_bounded_logits_and_predicted_ious(tiny):
    _, boxes_out, points_out, _ = tiny
    for out in (boxes_out, points_out):
        assert torch.isfinite(out.image_logits).all() and out.image_logits.abs().max() <= 32.0
        assert out.image_logits.std() > 0  # a real decoder output, not a constant
        assert ((out.confidence >= 0) & (out.confidence <= 1)).all()  # SAM2's sigmoid IoU head


def test_batched_decode_equals_one_prompt_at_a_time(tiny):
    teacher, boxes_out, points_out, _ = tiny
    for i in (0, 3):
        single = teacher.predict_boxes(BOXES[i : i + 1])
        torch.testing.assert_close(boxes_out.image_logits[i], single.image_logits[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(boxes_out.confidence[i], single.confidence[0], rtol=1e-4, atol=1e-4)
    single = teacher.predict_points(POINTS[1:2])
    torch.testing.assert_close(points_out.image_logits[1], single.image_logits[0], rtol=1e-4, atol=1e-4)


def test_many_prompts_are_decoded_in_chunks(tiny, monkeypatch):
    teacher, boxes_out, _, calls = tiny
    monkeypatch.setattr(teacher, "decode_batch", 3)
    before = calls["decoder"]
    out = teacher.predict_boxes(BOXES)  # 4 boxes: chunks of 3 and 1
    assert calls["decoder"] == before + 2
    torch.testing.assert_close(out.image_logits, boxes_out.image_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.confidence, boxes_out.confidence, rtol=1e-4, atol=1e-4)


def test_keeps_the_mask_with_the_highest_predicted_iou_as_the_predictor_does(tiny, image):
    """The batched path against sam2's own SAM2ImagePredictor on the same model: the same best-of-3 logits."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    teacher, boxes_out, points_out, _ = tiny
    predictor = SAM2ImagePredictor(teacher.model)
    with torch.inference_mode():
        predictor.set_image(image)
        _, iou, low_res = predictor.predict(box=BOXES, multimask_output=True, return_logits=True)
        _, point_iou, point_low_res = predictor.predict(
            point_coords=POINTS[:, None], point_labels=np.ones((3, 1)), multimask_output=True, return_logits=True
        )
    best = iou.argmax(axis=1)
    np.testing.assert_allclose(boxes_out.confidence.numpy(), iou.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(
        boxes_out.image_logits.numpy(), low_res[np.arange(len(BOXES)), best], rtol=1e-5, atol=1e-4
    )
    best = point_iou.argmax(axis=1)
    np.testing.assert_allclose(points_out.image_logits.numpy(), point_low_res[np.arange(3), best], rtol=1e-5, atol=1e-4)


class StubDecoder(torch.nn.Module):
    """Stands in for SAM2's mask decoder: 3 masks per prompt, mask k of prompt i filled with 10 i + k."""

    def __init__(self, iou: np.ndarray):
        super().__init__()
        self.iou = torch.from_numpy(iou.astype(np.float32))

    def forward(self, image_embeddings, sparse_prompt_embeddings, multimask_output, **_):
        n = len(sparse_prompt_embeddings)
        low = (10 * torch.arange(n)[:, None] + torch.arange(3)[None, :]).float()[:, :, None, None]
        return low.expand(n, 3, 256, 256).clone(), self.iou[:n], None, None


@pytest.mark.parametrize("n", [1, 3])
def test_selection_picks_argmax_per_instance(tiny, n):
    teacher = tiny[0]
    iou = np.array([[0.1, 0.9, 0.3], [0.8, 0.2, 0.1], [0.2, 0.3, 0.7]])
    decoder = teacher.model.sam_mask_decoder
    teacher.model.sam_mask_decoder = StubDecoder(iou)  # (monkeypatch's undo deletes registered submodules)
    try:
        out = teacher.predict_points(POINTS[:n])
    finally:
        teacher.model.sam_mask_decoder = decoder
    best = iou[:n].argmax(axis=1)  # 1, 0, 2
    assert out.confidence.tolist() == pytest.approx(iou[:n].max(axis=1).tolist())
    assert out.image_logits[:, 0, 0].tolist() == [10 * i + b for i, b in enumerate(best)]


def test_random_weights_are_seeded_identically_in_every_process(tiny):
    teacher = tiny[0]
    assert teacher.metadata["weights"] == "random weights" and teacher.metadata["checkpoint"] is None
    assert teacher.metadata["weights_sha256"] == state_dict_sha256(teacher.model)
    rng_before = torch.get_rng_state()
    other = build_quietly(*random_tiny(seed=1))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    assert other.metadata["weights_sha256"] != teacher.metadata["weights_sha256"]  # the seed is what decides

    # A fresh interpreter, as a dask worker would be, builds the same weights.
    script = (
        "import warnings, torch; warnings.simplefilter('ignore')\n"
        "from picosam_pipeline.config import TeacherConfig\n"
        "from picosam_pipeline.device import Runtime\n"
        "from picosam_pipeline.teacher.build import build_teacher\n"
        "cfg = TeacherConfig(model='sam2.1_hiera_tiny', checkpoint=None, allow_random_weights=True)\n"
        "print(build_teacher(cfg, Runtime(torch.device('cpu'), None, 0)).metadata['weights_sha256'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == teacher.metadata["weights_sha256"]


def test_checkpoint_round_trip_loads_safely_and_reproduces_outputs(tiny, image, tmp_path):
    teacher, boxes_out, _, _ = tiny
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": teacher.model.state_dict()}, path)  # the official SAM2 checkpoint layout
    cfg = TeacherConfig(model="sam2.1_hiera_tiny", checkpoint=str(path), allow_random_weights=False)
    loaded = build_teacher(
        cfg, Runtime(torch.device("cpu"), None, seed=123)
    )  # seed differs: weights come from the file

    assert loaded.metadata["weights"] == "checkpoint"
    assert loaded.metadata["checkpoint"] == str(path)
    assert loaded.metadata["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert state_dict_sha256(loaded.model) == teacher.metadata["weights_sha256"]
    loaded.set_image(image)
    got = loaded.predict_boxes(BOXES)
    torch.testing.assert_close(got.image_logits, boxes_out.image_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.confidence, boxes_out.confidence, rtol=0, atol=1e-6)


def test_missing_checkpoint_is_refused_with_the_fix(tmp_path):
    missing = tmp_path / "checkpoints" / "sam2.1_hiera_tiny.pt"
    cfg = TeacherConfig(model="sam2.1_hiera_tiny", checkpoint=str(missing), allow_random_weights=False)
    with pytest.raises(PipelineError) as err:
        build_teacher(cfg, CPU)
    assert str(missing) in str(err.value)
    assert "picosam-pipeline fetch sam2.1_hiera_tiny" in str(err.value)
    assert "allow_random_weights" in str(err.value)


def test_mismatched_checkpoint_is_refused(tiny, tmp_path):
    teacher = tiny[0]
    state = dict(teacher.model.state_dict())
    dropped = sorted(state)[0]
    del state[dropped]
    path = tmp_path / "partial.pt"
    torch.save(state, path)  # a bare state dict is accepted too, but this one lacks a key
    cfg = TeacherConfig(model="sam2.1_hiera_tiny", checkpoint=str(path))
    with pytest.raises(PipelineError, match="1 missing keys") as err:
        build_teacher(cfg, CPU)
    assert dropped in str(err.value) and str(path) in str(err.value)


def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": CodeOnLoad(marker)}, path)
    cfg = TeacherConfig(model="sam2.1_hiera_tiny", checkpoint=str(path))

    with pytest.raises(PipelineError, match="refused") as err:
        build_teacher(cfg, CPU)
    assert str(path) in str(err.value)
    assert "it asks for " in str(err.value) and "malicious_pickle.write_marker" in str(err.value)
    # our own advice (the official file, or tensors re-saved by its maker), never torch's: weights_only=False or
    # allow-listing the global, both of which run the file's code
    assert "picosam-pipeline fetch" in str(err.value)
    assert not re.search(r"weights_only|allowlist|safe_globals|trust", str(err.value)), str(err.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load WOULD have run it
    assert marker.exists()


def test_every_sam2_model_name_maps_to_a_packaged_config():
    import sam2
    from hydra import compose

    names = {m: sam2_config_name(m) for m in SAM2_MODELS}
    assert names["sam2.1_hiera_base_plus"] == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    assert names["sam2_hiera_large"] == "configs/sam2/sam2_hiera_l.yaml"
    for model, name in names.items():
        assert (Path(sam2.__file__).parent / name).is_file(), model
        assert compose(config_name=name).model.image_encoder.trunk.embed_dim > 0  # Hydra resolves it
    with pytest.raises(ValueError):
        sam2_config_name("sam3")


def test_sam3_without_the_extra_names_the_install_command(monkeypatch):
    # None in sys.modules makes `import sam3...` fail even where it is installed (and already imported)
    for name in ["sam3", *(n for n in sys.modules if n.startswith("sam3."))]:
        monkeypatch.setitem(sys.modules, name, None)
    cfg = TeacherConfig(model="sam3", checkpoint=None, allow_random_weights=True)
    with pytest.raises(PipelineError, match=r"pip install 'picosam-pipeline\[sam3\]'"):
        build_teacher(cfg, CPU)


def test_probabilities_to_logits():
    p = torch.tensor([0.0, 1e-9, 0.1, 0.5, 0.9, 1.0 - 1e-9, 1.0], dtype=torch.float32)
    logits = probabilities_to_logits(p)
    assert logits.dtype == torch.float32
    bound = float(np.log((1 - 1e-7) / 1e-7))  # 16.118
    torch.testing.assert_close(logits[[0, 1]], torch.full((2,), -bound), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[[5, 6]], torch.full((2,), bound), rtol=0, atol=1e-5)
    assert logits[3] == 0
    torch.testing.assert_close(torch.sigmoid(logits[2:5]), p[2:5], rtol=1e-6, atol=1e-7)  # inverse of sigmoid
    assert torch.all(logits[1:] >= logits[:-1])
    half = probabilities_to_logits(torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(0)).half())
    assert half.shape == (4, 5, 6) and half.dtype == torch.float32
