"""bench/gpu_suite.py on the CPU: the plan (--dry-run), the one-line refusal without CUDA, the budget (per-step
deadlines, a stopped step keeps what it printed, a step not started once the budget is spent, the table and its JSON
written after every step), and its readers of the benches' output. Slow: the parity child's code path on the CPU
(bf16 store, fp32 recomputation) and the train bench's real output through the suite's reader."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch

from tests.helpers.paths import REPO

SUITE = REPO / "bench" / "gpu_suite.py"


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


suite = load_suite()


def run_suite_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SUITE), *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def test_dry_run_prints_every_step_its_share_of_the_budget_and_every_goal():
    done = run_suite_script("--dry-run", "--budget-s", "540")
    assert done.returncode == 0, done.stderr
    shares = dict(re.findall(r"^  (\w+) +(\d+) s  ", done.stdout, re.M))
    assert list(shares) == ["teacher", "sam3", "train", "parity", "pipeline"]
    assert sum(map(int, shares.values())) == 540
    for goal in (">= 70 %", ">= 200 inst/s", ">= 80 %", ">= 99.9 %", "<= codec bound", "goal runs"):
        assert goal in done.stdout, goal
    for command in ("bench/teacher_gpu.py", "teacher_sam3.py --teachers sam3:instance", "train_gpu.py --compile true"):
        assert command in done.stdout, command
    half = dict(re.findall(r"^  (\w+) +(\d+) s  ", run_suite_script("--dry-run", "--budget-s", "270").stdout, re.M))
    assert all(abs(int(half[k]) * 2 - int(v)) <= 1 for k, v in shares.items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the suite would run")
def test_without_cuda_it_says_so_in_one_line_and_measures_nothing(tmp_path):
    done = run_suite_script("--budget-s", "60", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gpu_suite: no CUDA device here (torch ")
    assert not (tmp_path / "out").exists()


TEACHER_TINY = """# teacher-logits throughput on cuda:0 (NVIDIA H200); torch 2.11.0+cu130, 16 CPUs
## sam2.1_hiera_tiny: random weights, cuda:0 (bf16), teacher build 3.1 s
path                                              img/s    inst/s  vs encoder
encoder alone, batch 64 (the limit)               359.0    2800.2       1.00x
stage, predictor path (195 inst)                   13.1     102.9       0.04x
stage, batched x16 (3900 inst)                    133.7    1043.0       0.37x
batched over predictor path: 10.14x; peak device memory 6.1 GiB; GPU utilisation 54 %; batch splits 0; JPEGs \
decoded on the device 500; teacher calls 80 % of the stage's time
"""


def fake_step(suite, name: str, share: float, code: str, parse, *rows):
    return suite.Step(name, share, list(rows), lambda ctx: [sys.executable, "-c", code], parse)


def test_a_step_past_its_deadline_is_stopped_and_keeps_what_it_printed(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "MIN_STEP_S", 1.0)
    prints_then_hangs = f"import time; print({TEACHER_TINY!r}, flush=True); time.sleep(600)"
    teacher = fake_step(
        suite,
        "teacher",
        10,
        prints_then_hangs,
        suite.parse_teacher,
        suite.Row("teacher_util_tiny", "tiny", ">= 70 %", lambda v: v >= 70),
        suite.Row("teacher_util_large", "large", ">= 70 %", lambda v: v >= 70),
    )
    later = fake_step(suite, "later", 1, "print('never')", suite.parse_json_line("X "), suite.Row("x", "x", "runs"))
    out = tmp_path / "out"
    start = __import__("time").monotonic()
    rc = suite.run_suite([teacher, later], 4.0, out, "# header", {"tmp": str(tmp_path)})
    took = __import__("time").monotonic() - start
    assert rc == 1 and took < 15  # 4 * 10/11 s, then TERM: the sleeping child is gone at once
    assert teacher.status.startswith("stopped at its deadline (4 s)") and later.status.startswith("not started")
    tiny, large = teacher.rows
    assert (tiny.value, tiny.verdict, tiny.measured) == (54.0, "miss", "54 % (1,043 inst/s)")
    assert large.verdict == "timeout" and large.measured.startswith("stopped at its deadline")
    data = json.loads((out / "gpu_suite.json").read_text())
    assert [s["name"] for s in data["steps"]] == ["teacher", "later"]
    assert data["steps"][0]["rows"][0]["measured"] == "54 % (1,043 inst/s)"
    assert data["steps"][1]["rows"][0]["measured"] == "budget spent"
    table = (out / "gpu_suite.md").read_text()
    assert (
        table.startswith("# header; budget 4 s, used ") and "| tiny | 54 % (1,043 inst/s) | >= 70 % | miss |" in table
    )
    log = (out / "teacher.log").read_text().splitlines()
    assert log[0].startswith("$ ") and any(line.startswith("stage, batched x16 (3900 inst) ") for line in log[1:])


def test_a_failed_step_shows_its_last_line_and_the_next_one_still_runs(tmp_path):
    fails = fake_step(
        suite,
        "sam3",
        1,
        "import sys; print('building'); sys.exit('FileNotFoundError: bpe_simple_vocab_16e6.txt.gz')",
        suite.parse_sam3,
        suite.Row("sam3_instance", "sam3", ">= 200 inst/s", lambda v: v >= 200),
    )
    figures = {"parity_decisions": [99.95, "99.950 %"], "parity_sigmoid": [-0.001, "0.0029 (bound 0.0039)"]}
    passes = fake_step(
        suite,
        "parity",
        1,
        f"print('PARITY ' + {json.dumps(json.dumps(figures))})",
        suite.parse_json_line("PARITY "),
        suite.Row("parity_decisions", "decisions", ">= 99.9 %", lambda v: v >= 99.9),
        suite.Row("parity_sigmoid", "sigmoid", "<= codec bound", lambda v: v <= 0),
    )
    rc = suite.run_suite([fails, passes], 120, tmp_path, "# h", {"tmp": str(tmp_path)})
    assert rc == 1 and fails.status == "failed (exit 1)"
    assert fails.rows[0].verdict == "failed"
    assert fails.rows[0].measured == "failed (exit 1): FileNotFoundError: bpe_simple_vocab_16e6.txt.gz"
    assert [r.verdict for r in passes.rows] == ["pass", "pass"] and passes.rows[0].measured == "99.950 %"
    assert suite.run_suite([passes], 120, tmp_path, "# h", {"tmp": str(tmp_path)}) == 0  # every judged row passes
    only_tiny = fake_step(
        suite,
        "teacher",
        1,
        f"print({TEACHER_TINY!r})",
        suite.parse_teacher,
        suite.Row("teacher_util_tiny", "tiny", ">= 70 %", lambda v: v >= 70),
        suite.Row("teacher_util_large", "large", ">= 70 %", lambda v: v >= 70),
    )
    suite.run_suite([only_tiny], 120, tmp_path, "# h", {"tmp": str(tmp_path)})
    assert [(r.verdict, r.measured) for r in only_tiny.rows] == [
        ("miss", "54 % (1,043 inst/s)"),
        ("not measured", "not in the output"),
    ]


def test_the_readers_of_the_benches_output():
    got = suite.parse_teacher(
        TEACHER_TINY.replace("\\\n", "")
        + "## sam2.1_hiera_large: random weights, cpu (fp32)\nstage, batched x1 (12 inst)  1.0  7.5  0.9x\n"
        "batched over predictor path: 1.00x; peak device memory n/a (CPU); GPU utilisation n/a; batch splits 0\n",
        {},
    )
    assert got["teacher_util_tiny"] == (54.0, "54 % (1,043 inst/s)")
    assert got["teacher_util_large"] == (None, "n/a (no NVML here)")
    line = (
        "compile true : bare step    3222.0 samples/s; train stage (150 steps, 8 loader workers)    2700.5 samples/s "
        "= 84 % of the bare step; 3 % of its time waiting for batches"
    )
    value, measured = suite.parse_train(line, {})["train_compiled"]
    assert round(value, 1) == 83.8 and measured == "84 % (2,700 of 3,222 samples/s, 8 workers, 3 % waiting)"
    assert suite.parse_json_line("PIPELINE ")("Running stage 'sample':\nRunning stage 'train':\n", {}) == {
        "pipeline": (None, "stopped in stage train")
    }


def test_sam3_reader_turns_encode_and_per_box_seconds_into_coco_instances_per_second(tmp_path):
    rows = [{"teacher": "sam3:instance", "encode_s": 0.035, "per_prompt_s": 0.004, "device": "cuda:0 (bf16)"}]
    (tmp_path / "sam3.json").write_text(json.dumps([{**rows[0], "images_timed": 5}]))
    value, measured = suite.parse_sam3("", {"tmp": str(tmp_path)})["sam3_instance"]
    assert round(value) == round(7.3 / (0.035 + 7.3 * 0.004)) == 114  # issue 33's last measurement
    assert measured == "114 inst/s (35 ms encode + 4.0 ms a box, cuda:0 (bf16), 5 images)"


@pytest.mark.slow
def test_parity_child_on_the_cpu_compares_a_bf16_store_with_an_fp32_recomputation(tmp_path):
    """The code path the GPU runs, on the CPU: a bf16-autocast store of one image, recomputed in fp32."""
    coco, _ = suite.coco_folder(None, tmp_path)
    done = subprocess.run(
        [sys.executable, str(SUITE), "--child", "parity", "--child-device", "cpu", "--coco", coco]
        + ["--parity-images", "1", "--parity-sample", "3"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    figures = suite.parse_json_line("PARITY ")(done.stdout, {})
    decisions, sigmoid = figures["parity_decisions"], figures["parity_sigmoid"]
    assert 90 <= decisions[0] <= 100 and re.match(r"[\d.]+ % \(\d+ of [\d,]+ pixels flip; 3 instances", decisions[1])
    assert re.match(r"[\d.]+ \(bound 0\.0039\); max \|delta logit\| after the codec [\d.]+$", sigmoid[1]), sigmoid
    assert "on cpu (fp32)" in done.stdout  # the recomputation's runtime, whatever the store recorded


@pytest.mark.slow
def test_the_train_reader_reads_the_train_bench_itself():
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "train_gpu.py")], capture_output=True, text=True, cwd=REPO, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    value, measured = suite.parse_train(done.stdout, {})["train_eager"]
    assert value > 0 and re.match(r"\d+ % \([\d,]+ of [\d,]+ samples/s, 0 workers, \d+ % waiting\)$", measured)
