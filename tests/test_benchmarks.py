"""The device-aware benchmarks run end to end on the CPU at their CPU defaults (figures printed, none asserted)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO, shared_data_or_skip


def run_bench(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True, timeout=900, cwd=REPO
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_teacher_gpu_bench_prints_the_limit_the_stage_and_their_ratio_on_the_cpu():
    coco = shared_data_or_skip("coco-sample")
    out = run_bench("teacher_gpu.py", "--coco", str(coco), "--images", "1")
    assert re.search(r"encoder alone, batch 1 \(the limit\) +[\d.]+ +[\d.]+ +1\.00x", out), out
    assert re.search(r"stage, batched x1 \(\d+ inst\) +[\d.]+ +[\d.]+ +[\d.]+x", out), out
    assert "peak device memory n/a (CPU)" in out and re.search(r"full COCO train2017 .* [\d.]+ h", out), out
    assert re.search(r"100\.000 % of stored mask decisions agree", out), out  # batch 1 on a CPU: the predictor's
    assert "## sam3:" in out


@pytest.mark.slow
def test_train_gpu_bench_prints_the_bare_step_and_the_stage_on_the_cpu():
    out = run_bench("train_gpu.py")
    assert re.search(
        r"compile false: bare step +[\d.]+ samples/s; train stage \(4 steps, 0 loader workers\) +[\d.]+ "
        r"samples/s = \d+ % of the bare step; \d+ % of its time waiting for batches",
        out,
    ), out


@pytest.mark.slow
def test_loader_bench_prints_bytes_rates_and_the_epoch_boundaries_side_by_side():
    out = run_bench("loader.py", "--batches", "4", "--steps", "2", "--epochs", "2")
    assert re.search(r"^shards: [\d,]+ bytes/sample", out, re.M) and re.search(
        r"^loader: [\d,]+ samples/s", out, re.M
    ), out
    assert re.search(r"^ratio loader / trainer: [\d,.]+x", out, re.M), out
    for when in ("when the last one ends", "64 batches ahead"):
        assert re.search(
            rf"^epoch boundaries, next epoch's loader started {when}: 2 epochs of ~\d+ batches, each held "
            r"\d+ ms: [\d.]+ s, \d+ % waiting for batches",
            out,
            re.M,
        ), out


@pytest.mark.slow
def test_teacher_sam3_bench_prints_build_encode_and_per_prompt_figures():
    """The SAM3 paths cost minutes per image on a CPU: here only its SAM2.1-tiny row, the same code path."""
    coco = shared_data_or_skip("coco-sample")
    out = run_bench("teacher_sam3.py", "--coco", str(coco), "--teachers", "sam2.1_hiera_tiny", "--prompts", "2")
    assert re.search(r"sam2\.1_hiera_tiny +cpu \(fp32\) +[\d.]+ +[\d.]+ +[\d.]+ +32 +[\d.]+ +- +[\d.]+", out), out
    assert "RSS right after the build: sam2.1_hiera_tiny" in out


@pytest.mark.slow
def test_scale_bench_prints_every_stage_at_two_sizes_with_files_and_dvc_times(tmp_path):
    """Tiny sizes: the same code path as --instances 900000 (a broken stage or a lost figure fails here), on the
    built-in sample as a fresh clone runs it (no ../shared/data)."""
    out = run_bench("scale.py", "--sizes", "200", "400", "--work", str(tmp_path))
    assert re.search(r"^template: .*template \(splits train, val\)$", out, re.M), out
    for stage in ("prepare", "teacher", "pack", "loader", "evaluate"):
        assert re.search(rf"^{stage} +[\d,]+/s +[\d.]+ GB .*[\d,]+/s +[\d.]+ GB", out, re.M), out
    assert re.search(r"^teacher .* +\d+ files +[\d,]+/s .* +(\d+) files", out, re.M), out
    assert re.search(r"^dvc pull_s +[\d.]+ +[\d.]+", out, re.M) and "targets at 400 instances:" in out, out
    assert "marginal rate between the two largest sizes" in out and not list(tmp_path.iterdir())  # nothing left behind
