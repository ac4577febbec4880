"""MCT's ONNX exports of an INT8 model, their onnxruntime checks and the export stage (``onnx_export.py``).

The model is ``tests.helpers.tiny_models.TinyStudent`` behind the normalisation conv, so MCT quantises it in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from picosam_pipeline.deploy.onnx_export import (
    CONTRACT_FILE,
    EXPORT_FAKEQUANT_FILE,
    EXPORT_MCTQ_FILE,
    METADATA_PREFIX,
    QUANTIZE_FAKEQUANT_FILE,
    QUANTIZE_MCTQ_FILE,
    QUANTIZE_PROBE_FILE,
    QUANTIZE_REPORT_FILE,
    compare_onnx,
    export_quantized,
    graph_io,
    legacy_torch_onnx_exporter,
    output_grid,
    output_step,
    read_onnx_metadata,
    stamp_metadata,
)
from picosam_pipeline.deploy.quantize import RgbModel, quantize
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.evaluate.onnx_runtime import is_mctq
from picosam_pipeline.train.students import NORMALIZATION
from tests.helpers.tiny_models import SIZE, tiny_camera_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both formats of the quantised tiny model, and 6 RGB crops with the torch INT8 logits on them."""
    int8 = quantize(tiny_camera_model(), [torch.rand(8, 3, SIZE, SIZE) for _ in range(2)])
    folder = tmp_path_factory.mktemp("export")
    files = {
        fmt: export_quantized(int8, folder / f"{fmt}.onnx", fmt=fmt, input_size=SIZE, metadata={"student": "tiny"})
        for fmt in ("mctq", "fakequant")
    }
    rgb = torch.rand(6, 3, SIZE, SIZE).numpy()
    return files, rgb, RgbModel(int8, "int8", SIZE)(rgb)


def test_legacy_exporter_is_scoped_to_the_block():
    original = torch.onnx.export
    with legacy_torch_onnx_exporter():
        assert torch.onnx.export.keywords == {"dynamo": False}
    assert torch.onnx.export is original


def test_both_formats_have_the_camera_input_and_logit_output(exported):
    files, _, _ = exported
    for path in files.values():
        (inp,), (out,) = graph_io(path)
        assert (inp.name, inp.shape, inp.dtype) == ("input", ("batch", 3, SIZE, SIZE), "float32")
        assert (out.name, out.shape, out.dtype) == ("output", ("batch", 1, SIZE, SIZE), "float32")
    assert is_mctq(files["mctq"]) and not is_mctq(files["fakequant"])
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(files["fakequant"])).graph.node}


def test_output_grid_is_the_same_in_both_formats_and_holds_the_torch_logits(exported):
    files, _, reference = exported
    grid = output_grid(files["mctq"])
    assert grid == output_grid(files["fakequant"]) and grid.bits == 8 and output_step(files["mctq"]) == grid.step
    assert np.log2(grid.step) == int(np.log2(grid.step))  # power-of-two thresholds (IMX500 target platform)
    levels = reference / grid.step
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert grid.range[0] <= reference.min() and reference.max() <= grid.range[1]


def test_onnxruntime_matches_the_quantized_torch_model(exported):
    files, rgb, reference = exported
    fq = compare_onnx(files["fakequant"], rgb, reference)
    assert fq.samples == 6 and fq.format == "fakequant"
    assert fq.max_diff_steps <= 8 and fq.mask_agreement >= 0.99
    mctq = compare_onnx(files["mctq"], rgb[:1], reference[:1], batch=1)  # custom-op kernels: slow, one crop
    assert mctq.format == "mctq" and mctq.max_diff_steps <= 8 and mctq.mask_agreement >= 0.99


def test_compare_onnx_notices_a_different_model(exported):
    files, rgb, reference = exported
    check = compare_onnx(files["fakequant"], rgb, reference + 50 * output_step(files["fakequant"]))
    assert check.max_diff_steps >= 49


def test_metadata_is_added_beside_mcts_own(exported, tmp_path):
    files, _, _ = exported
    meta = read_onnx_metadata(files["mctq"])
    assert meta[METADATA_PREFIX + "student"] == "tiny" and meta["tpc_platform_type"] == "imx500"
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(files["mctq"].read_bytes())
    stamp_metadata(copy, {"student": "other", "input": "rgb"})
    again = read_onnx_metadata(copy)
    assert again[METADATA_PREFIX + "student"] == "other" and again[METADATA_PREFIX + "input"] == "rgb"
    assert again["mct_version"] == meta["mct_version"]


def test_the_export_holds_no_fact_of_the_machine_that_wrote_it(exported, tmp_path):
    """MCT writes sys.version and torch's build tag into the file; the export keeps neither, so the same model is the
    same file on every machine (Python 3.12 with the registry's torch wrote 3.11's graph and weights in another
    file before)."""
    import onnx

    files, _, _ = exported
    meta = read_onnx_metadata(files["mctq"])
    assert "python_version" not in meta and meta["framework_version"] == torch.__version__.split("+")[0]
    model = onnx.load(str(files["mctq"]))  # as MCT leaves it on another machine
    model.metadata_props.add(key="python_version", value="3.12.1 (main, May  9 2026) [GCC 12.2.0]")
    for prop in model.metadata_props:
        if prop.key == "framework_version":
            prop.value = "2.13.0+cu130"
    other = tmp_path / "other.onnx"
    onnx.save(model, str(other))
    stamp_metadata(other, {})
    assert other.read_bytes() == files["mctq"].read_bytes()


def test_output_grid_of_a_float_model_is_an_error(tmp_path):
    path = tmp_path / "float.onnx"
    with pytest.warns(DeprecationWarning):  # the legacy TorchScript exporter
        torch.onnx.export(
            nn.Conv2d(3, 1, 1),
            torch.rand(1, 3, 4, 4),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
        )
    with pytest.raises(PipelineError, match="not written by a quantiser"):
        output_grid(path)


# --------------------------------------------------------------------------------------------------
# the stage


@pytest.fixture(scope="module")
def quantize_dir(exported, tmp_path_factory):
    """A folder laid out as the quantize stage writes it, holding the tiny model's exports."""
    files, rgb, reference = exported
    folder = tmp_path_factory.mktemp("quantize")
    (folder / QUANTIZE_MCTQ_FILE).write_bytes(files["mctq"].read_bytes())
    (folder / QUANTIZE_FAKEQUANT_FILE).write_bytes(files["fakequant"].read_bytes())
    np.savez(folder / QUANTIZE_PROBE_FILE, rgb=rgb, int8_logits=reference, float_logits=reference)
    meta = {"student": "picosam2", "input_size": SIZE, "normalization": dataclasses.asdict(NORMALIZATION)}
    crop = {"convention": "point", "prompt": "point", "paper": "PicoSAM2", "window": 96, "input_size": SIZE}
    (folder / QUANTIZE_REPORT_FILE).write_text(
        json.dumps({"student_meta": meta, "crop": crop, "tpc_version": "4.0", "method": "ptq"})
    )
    return folder


def _export_config(quantize_dir: Path, out: Path, **overrides):
    from picosam_pipeline.config import load_config

    cfg = load_config(None, [f"runtime.metrics_dir={out / 'metrics'}"])
    return dataclasses.replace(
        cfg,
        export=dataclasses.replace(
            cfg.export, quantized_dir=str(quantize_dir), out_dir=str(out / "export"), **overrides
        ),
    )


def test_stage_writes_checked_files_and_their_contract(quantize_dir, tmp_path):
    from picosam_pipeline.stages import export as export_stage

    cfg = _export_config(quantize_dir, tmp_path, min_mask_agreement=0.95)  # a random 16-px model: many logits near 0
    summary = export_stage.run(cfg, None)
    out = Path(cfg.export.out_dir)
    contract = json.loads((out / CONTRACT_FILE).read_text())
    assert contract["input"]["shape"] == ["batch", 3, SIZE, SIZE] and contract["input"]["channels"] == "RGB"
    assert contract["input"]["range"] == [0.0, 1.0] and contract["input"]["normalization"]["where"] == "in_graph"
    assert contract["input"]["normalization"]["mean"] == list(NORMALIZATION.mean)
    assert contract["output"]["shape"] == ["batch", 1, SIZE, SIZE]
    assert contract["output"]["quantization_step"] == output_step(out / EXPORT_MCTQ_FILE)
    assert set(summary) == {"fakequant", "mctq"} and set(contract["checks"]) == {*summary, "torch_int8_vs_float"}
    assert contract["checks"]["fakequant"]["mean_diff_steps"] <= contract["checks"]["fakequant"]["max_diff_steps"]
    assert contract["checks"]["mctq"]["samples"] == cfg.export.mctq_check_samples
    made = json.loads((quantize_dir / "report.json").read_text())
    assert contract["crop"] == made["crop"] and contract["crop"]["convention"] == "point"
    for name in (EXPORT_MCTQ_FILE, EXPORT_FAKEQUANT_FILE):
        assert read_onnx_metadata(out / name)[METADATA_PREFIX + "input_normalization"] == "in_graph"
        assert json.loads(read_onnx_metadata(out / name)[METADATA_PREFIX + "crop"]) == made["crop"]  # predict reads it
    metrics = json.loads((out / "report.json").read_text())
    assert metrics["checks"] == contract["checks"] and metrics["bytes"]["mctq"] > 0
    headline = json.loads((tmp_path / "metrics" / "export.json").read_text())
    assert headline == {
        "mctq_mask_agreement": contract["checks"]["mctq"]["mask_agreement"],
        "fakequant_mask_agreement": contract["checks"]["fakequant"]["mask_agreement"],
    }


def test_evaluate_feeds_the_fake_quant_file_rgb_as_it_is(quantize_dir, tmp_path):
    """``evaluate.int8_model`` may point at the fake-quant file: its metadata stops a second normalisation."""
    from picosam_pipeline.evaluate.predict import load_crop_model
    from picosam_pipeline.stages import export as export_stage

    cfg = _export_config(quantize_dir, tmp_path, min_mask_agreement=0.95)
    export_stage.run(cfg, None)
    model = load_crop_model(Path(cfg.export.out_dir) / EXPORT_FAKEQUANT_FILE, None)
    with np.load(quantize_dir / "probe.npz") as probe:
        diff = np.abs(model(probe["rgb"]) - probe["int8_logits"]).max()
    assert model.normalizes_input and diff <= 8 * output_step(quantize_dir / "quantized_mctq.onnx")
    assert model.crop["convention"] == "point"  # the exported model says which prompt it takes


def test_stage_fails_when_onnxruntime_disagrees_beyond_the_bound(quantize_dir, tmp_path):
    from picosam_pipeline.stages import export as export_stage

    shifted = tmp_path / "shifted"
    shifted.mkdir()
    for f in quantize_dir.iterdir():
        (shifted / f.name).write_bytes(f.read_bytes())
    with np.load(
        quantize_dir / "probe.npz"
    ) as probe:  # torch logits 40 steps off: a graph that computes something else
        step = output_step(quantize_dir / "quantized_mctq.onnx")
        np.savez(
            shifted / "probe.npz",
            rgb=probe["rgb"],
            int8_logits=probe["int8_logits"] + 40 * step,
            float_logits=probe["float_logits"],
        )
    with pytest.raises(
        PipelineError,
        match=r"disagrees with the quantised torch model.*[34]\d\.0 output steps, bound "
        r"export.max_diff_steps=16",
    ):
        export_stage.run(_export_config(shifted, tmp_path), None)


def test_stage_refuses_a_quantize_report_without_the_crop_convention(quantize_dir, tmp_path):
    from picosam_pipeline.stages import export as export_stage

    old = tmp_path / "old-quantize"
    shutil.copytree(quantize_dir, old)
    report = json.loads((old / "report.json").read_text())
    (old / "report.json").write_text(json.dumps({k: v for k, v in report.items() if k != "crop"}))
    with pytest.raises(PipelineError, match="does not record the student's crop convention.*rerun quantize"):
        export_stage.run(_export_config(old, tmp_path), None)
