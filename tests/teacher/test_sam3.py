"""SAM3 teachers with the real ``sam3`` 0.1.4 model code and seeded random weights, on the CPU.

The fast tests check the workarounds of ``teacher/sam3_compat.py`` without building the model. The ``slow`` ones
run the ``teacher-logits`` stage on one sample image cut to its two largest instances (``prepare.min_area``): a
SAM3 image encoding costs minutes on a 2-core CPU (4.6 TFLOP at 1008x1008) and a box prompt tens of seconds, and
every process holds ~4.5 GiB, so each run is as small as it can be and the in-process teacher is released, its
memory handed back to the system (``give_memory_back``), before the two dask workers or the next test build theirs:
no process of this file goes above 6 GB. Skipped where the ``sam3`` extra is not installed (CI installs it).
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from picosam_pipeline.cli import cli
from picosam_pipeline.config import ConfigError, TeacherConfig
from picosam_pipeline.device import resolve_runtime
from picosam_pipeline.stages import teacher_logits
from picosam_pipeline.teacher import runner as teacher_runner
from picosam_pipeline.teacher import sam3_compat
from picosam_pipeline.teacher.codec import encode_logits
from picosam_pipeline.teacher.geometry import crop_logits
from picosam_pipeline.teacher.sam3_teacher import probabilities_to_logits
from picosam_pipeline.teacher.store import open_store
from tests.helpers.memory import give_memory_back
from tests.helpers.teacher_project import config, stage_figures, store_files, tiny_project

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sam3") is None,
    reason="the sam3 extra is not installed (pip install 'picosam-pipeline[sam3]'; CI has it)",
)

# The val image 200001 keeps its two largest instances (areas 9,207 and 10,005 px), one per shard.
SAM3 = ("prepare.min_area=9190", "teacher.model=sam3", "teacher.checkpoint=null", "teacher.instances_per_shard=1")


# --------------------------------------------------------------------------------------------------
# the workarounds, without a model


def test_device_map_sends_bare_cuda_to_the_teachers_device_and_skips_pin_memory_off_cuda():
    seen = []

    def record(*args, **kwargs):
        seen.append((args, kwargs))
        return "called"

    mode = sam3_compat.DeviceMap(torch.device("cuda:1"))  # the one-worker-per-GPU case: not cuda:0
    mode.__torch_function__(record, (), (), {"device": "cuda"})
    mode.__torch_function__(record, (), (), {"device": torch.device("cuda")})
    mode.__torch_function__(record, (), (), {"device": "cuda:0"})  # an explicit index is the caller's choice
    mode.__torch_function__(record, (), (), {"device": "cpu"})
    assert [k["device"] for _, k in seen] == [torch.device("cuda:1"), torch.device("cuda:1"), "cuda:0", "cpu"]
    x = torch.ones(3)
    with sam3_compat.DeviceMap(torch.device("cpu")):
        # what sam3's geometry encoder and position encodings do; both fail on a CUDA-less torch without the map
        assert x.pin_memory() is x
        assert torch.zeros(2, device="cuda").device == torch.device("cpu")
        assert x.to("cuda").device == torch.device("cpu") and x.cuda().device == torch.device("cpu")
    with pytest.raises((RuntimeError, AssertionError)):  # outside the map the hard-coded device fails here
        torch.zeros(2, device="cuda")


def test_sam3_imports_without_triton_and_its_triton_kernel_says_so():
    api = sam3_compat.import_sam3()
    assert callable(api.build_sam3_image_model)
    if importlib.util.find_spec("triton") is None:  # every CPU-only machine
        assert "triton" not in sys.modules  # torch must not see a stand-in triton
        from sam3.model.sam3_tracker_utils import edt_triton

        with pytest.raises(RuntimeError, match="triton .* is not installed"):
            edt_triton(torch.zeros(1, 4, 4))


def test_the_bpe_vocabulary_is_clips():
    path, sha256 = sam3_compat.bpe_vocabulary()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz" and sha256 == sam3_compat.BPE_SHA256


def test_point_prompts_need_the_instance_path():
    with pytest.raises(ConfigError, match="point prompts need t.sam3_path=instance"):
        TeacherConfig(model="sam3", prompt="point").validate("t")
    TeacherConfig(model="sam3", prompt="point", sam3_path="instance").validate("t")


# --------------------------------------------------------------------------------------------------
# the stage


def run_stage(root, sets, out, *more):
    metrics = out.parent / "metrics"  # beside the store, not around it: a stage never writes inside its metrics folder
    cfg = config(root, sets, f"teacher.out={out}", f"runtime.metrics_dir={metrics}", *more)
    teacher_logits.run(cfg, resolve_runtime(cfg.runtime))
    return cfg, stage_figures(metrics)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The stage sets the process's torch threads to its teacher's; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def release_teacher() -> None:
    """Drop this process's teacher (~4.5 GiB) and give its memory back before another build, here or in a worker."""
    teacher_runner._session = None
    give_memory_back()


@pytest.fixture
def sam3_memory(monkeypatch):
    """A stage test starts from a trimmed heap (what earlier tests of the session freed) with no cached teacher, and
    its teacher is released when it ends, passed or failed (then monkeypatch puts back the session it found)."""
    monkeypatch.setattr(teacher_runner, "_session", None)
    give_memory_back()
    yield
    release_teacher()


def check_the_per_box_path(cfg, store) -> None:
    """The processor's own per-box path (what PicoSAM3's precompute calls) gives the stored bytes of row 0, on the
    image this process's teacher still holds (a function of its own: its references to the teacher end here)."""
    teacher = teacher_runner._session.teacher
    rows = teacher_runner.instance_rows(cfg.teacher.index, ["val"], "roi")
    width, height = (int(v) for v in rows.size[0])
    x1, y1, x2, y2 = rows.prompt[0].astype(np.float64)
    state = {k: v for k, v in teacher._state.items()}
    state["backbone_out"] = dict(state["backbone_out"])
    with teacher._forward():
        teacher.processor.reset_all_prompts(state)
        state = teacher.processor.add_geometric_prompt(
            box=[(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height],
            label=True,
            state=state,
        )
    best = int(state["scores"].argmax())
    reference = crop_logits(
        probabilities_to_logits(state["masks_logits"][best, 0])[None],
        rows.size[:1],
        rows.crop_box[:1],
        cfg.teacher.store_size,
    )
    assert np.array_equal(store.read_raw([0]), encode_logits(reference.numpy(), store.codec))
    assert float(store.read_meta()["confidence"][0]) == float(state["scores"][best])


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~10 min on an idle 2-core CI machine; a loaded one takes far longer
def test_sam3_geometric_pass_is_finite_verifiable_and_byte_identical_on_two_dask_workers(
    tmp_path, monkeypatch, sam3_memory
):
    """PicoSAM3's path over 1 image, 2 instances, 2 shards: in this process, then on a LocalCluster of 2 workers (one
    shard each), 1 torch thread everywhere: the stored bytes depend on the thread count (2 threads here vs 1 in the
    workers, measured: 99.995 % of codes equal, none more than one step apart, every mask decision equal)."""
    sets = tiny_project(tmp_path, 1, *SAM3)
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "local" / "logits.zarr"
    cfg, metrics = run_stage(tmp_path, sets, local, "teacher.threads_per_worker=1")
    assert (metrics["model"], metrics["instances"], metrics["shards_computed"], metrics["encoder_passes"]) == (
        "sam3",
        2,
        2,
        1,
    )
    assert metrics["random_weights"] is True and metrics["all_instances_empty"] is False
    store = open_store(local)
    build = store.attrs["teacher"]["build"]
    assert store.attrs["teacher"]["config"]["sam3_path"] == "geometric" and build["sam3_path"] == "geometric"
    assert build["path"].startswith("geometric: Sam3Image.forward_grounding")
    # The two torch.empty parameters of the text encoder, found by the scan and drawn from the seed.
    assert build["initialised_after_build"] == [
        "backbone.language_backbone.encoder.positional_embedding",
        "backbone.language_backbone.encoder.text_projection",
    ]
    assert build["bpe_vocabulary_sha256"] == sam3_compat.BPE_SHA256
    logits, confidence = store.read_logits(slice(0, 2)), store.read_meta()["confidence"]
    assert np.isfinite(logits).all() and (logits.reshape(2, -1).std(axis=1) > 0.01).all()  # finite, not constant
    assert ((confidence > 0) & (confidence <= 1)).all()

    # The processor's own per-box path (what PicoSAM3's precompute calls) gives the stored bytes of row 0.
    check_the_per_box_path(cfg, store)

    # verify-logits recomputes a stored instance with the teacher the store records (this process's, same spec).
    result = CliRunner().invoke(cli, ["verify-logits", str(local), "--sample", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "100.00%" in result.output and "sam3" in result.output

    release_teacher()
    dask = tmp_path / "dask" / "logits.zarr"
    _, metrics = run_stage(
        tmp_path, sets, dask, "teacher.executor=dask", "teacher.n_workers=2", "teacher.threads_per_worker=1"
    )
    assert (metrics["executor"], metrics["workers"], metrics["shards_computed"]) == ("dask", 2, 2)
    # Both workers built the weights this process built (the stage refuses workers whose digests differ).
    assert open_store(dask).attrs == store.attrs
    assert store_files(local) == store_files(dask)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sam3_instance_path_decodes_all_boxes_of_an_image_in_one_call(tmp_path, monkeypatch, sam3_memory):
    sets = tiny_project(tmp_path, 1, *SAM3)
    monkeypatch.chdir(tmp_path)
    sam3_compat.import_sam3()  # sam3 imported the way the teacher imports it (triton stand-in), run alone too
    from sam3.model.sam3_image import Sam3Image

    calls = []
    predict_inst = Sam3Image.predict_inst
    monkeypatch.setattr(
        Sam3Image, "predict_inst", lambda self, state, **kw: calls.append(kw) or predict_inst(self, state, **kw)
    )
    out = tmp_path / "logits.zarr"
    _, metrics = run_stage(tmp_path, sets, out, "teacher.sam3_path=instance", "teacher.instances_per_shard=2")
    assert [kw["box"].shape for kw in calls] == [(2, 4)]  # both boxes of the image in one predict_inst call
    assert (metrics["instances"], metrics["encoder_passes"], metrics["all_instances_empty"]) == (2, 1, False)
    store = open_store(out)
    assert store.attrs["teacher"]["build"]["sam3_path"] == "instance"
    assert store.attrs["teacher"]["build"]["logits"].startswith("288x288 low-res mask logits")
    logits = store.read_logits(slice(0, 2))
    assert np.isfinite(logits).all() and (logits.reshape(2, -1).std(axis=1) > 0.01).all()
    # PicoSAM2's point prompts take the same path (one positive point per instance), here on the held image.
    teacher = teacher_runner._session.teacher
    points = teacher.predict_points(np.array([[100.0, 120.0], [200.0, 250.0], [30.0, 40.0]], np.float32))
    assert tuple(points.image_logits.shape) == (3, 288, 288) and torch.isfinite(points.image_logits).all()
    assert calls[-1]["point_coords"].shape == (3, 1, 2)
    del teacher, points
    release_teacher()
