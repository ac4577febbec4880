"""The training loop: schedule, checkpoint files, exact resume, val IoU, and a 2-process gloo DDP run.

Tests run at 32x32 crops (the students accept any multiple of 16) on a synthetic stand-in for the shard
loader: discs on noise, batches in the loader's dict format, a deterministic order per (seed, epoch).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from picosam_pipeline.config import Config, TrainConfig
from picosam_pipeline.device import Runtime
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.reports import last_run
from picosam_pipeline.stages import train as train_stage
from picosam_pipeline.train.checkpoints import (
    flatten_optimizer,
    load_checkpoint,
    load_student,
    save_student,
    unflatten_optimizer,
)
from picosam_pipeline.train.shards import read_shard_index
from picosam_pipeline.train.students import build_student, normalize
from picosam_pipeline.train.trainer import (
    EPOCH_LOOKAHEAD,
    LOG_COLUMNS,
    TrainData,
    batch_stream,
    epoch_seed,
    get_lr,
    train,
)
from tests.helpers.malicious_pickle import CodeOnLoad
from tests.helpers.pipeline_inputs import elsewhere

CPU = Runtime(device=torch.device("cpu"), autocast_dtype=None, seed=0)


class Interrupted(Exception):
    """Stands in for a kill: raised from inside the data stream."""


class SyntheticShards:
    """Loader stand-in: ``n`` disc samples, shuffled per epoch from (seed, epoch), the last batch partial.

    Batches have the keys and dtypes of ``loader.make_loader``. ``rank`` / ``world_size`` take every
    world_size-th sample, as the loader splits shards by rank. ``stop_after`` raises :class:`Interrupted`
    when that many batches have been handed out in total.
    """

    def __init__(
        self,
        n: int = 10,
        batch_size: int = 4,
        size: int = 32,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        stop_after: int | None = None,
    ) -> None:
        rng = np.random.default_rng(1000 + seed)
        yy, xx = np.mgrid[0:size, 0:size] + 0.5
        cy, cx = rng.uniform(0.35, 0.65, (2, n)) * size
        radius = rng.uniform(0.15, 0.35, n) * size
        gt = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2 < radius[:, None, None] ** 2
        colour = rng.uniform(0.5, 1.0, (n, 3, 1, 1))
        image = rng.uniform(0.0, 0.4, (n, 3, size, size)) * (1 - gt[:, None]) + colour * gt[:, None]
        self.samples = {
            "image": torch.tensor(image, dtype=torch.float32),
            "gt_mask": torch.tensor(gt[:, None], dtype=torch.float32),
            "teacher_logits": torch.tensor(
                6.0 * gt[:, None] - 3.0 + rng.normal(0, 1, (n, 1, size, size)), dtype=torch.float32
            ),
            "confidence": torch.tensor(rng.uniform(0.6, 1.0, (n, 1)), dtype=torch.float32),  # (B, K=1)
            "ann_id": torch.arange(n, dtype=torch.int64),
        }
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.stop_after, self.handed_out = stop_after, 0

    def epoch(self, epoch: int):
        order = np.random.default_rng(epoch_seed(self.seed, epoch)).permutation(len(self.samples["ann_id"]))
        order = order[self.rank :: self.world_size]
        for i in range(0, len(order), self.batch_size):
            if self.stop_after is not None and self.handed_out >= self.stop_after:
                raise Interrupted
            self.handed_out += 1
            yield {k: v[order[i : i + self.batch_size]] for k, v in self.samples.items()}

    def val(self):
        return ({k: v[i : i + 4] for k, v in self.samples.items()} for i in range(0, len(self.samples["ann_id"]), 4))

    def data(self) -> TrainData:
        return TrainData(
            train_epoch=self.epoch, val=self.val, input_size=32, fingerprint="synthetic", source="synthetic"
        )


@pytest.fixture(autouse=True)
def one_thread():
    # At 32x32 a step is a few ms of arithmetic; on a shared 2-core machine OpenMP threads waiting for each
    # other cost 10-50x that (measured), so these tests compute on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(**overrides) -> TrainConfig:
    base = dict(steps=6, batch_size=4, warmup_steps=2, checkpoint_every=2, eval_every=3, log_every=2, lr=1e-3)
    return TrainConfig(**{**base, **overrides})


# --------------------------------------------------------------------------------------------------
# schedule


def test_lr_warms_up_linearly_then_holds_or_decays_to_min_lr():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine")
    warm = [get_lr(s, cfg) for s in range(10)]
    assert warm == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    decay = [get_lr(s, cfg) for s in range(10, 100)]
    assert decay[0] == pytest.approx(1e-3) and all(a >= b for a, b in zip(decay, decay[1:]))
    assert get_lr(100, cfg) == pytest.approx(1e-4)
    constant = dataclasses.replace(cfg, schedule="constant")
    assert {get_lr(s, constant) for s in range(10, 100)} == {1e-3}
    assert get_lr(0, dataclasses.replace(cfg, warmup_steps=0)) == pytest.approx(1e-3)


# --------------------------------------------------------------------------------------------------
# checkpoint files


def test_student_checkpoint_loads_weights_only_and_reproduces_outputs(tmp_path):
    torch.manual_seed(1)
    model = build_student("picosam2").eval()
    path = save_student(tmp_path / "student.pt", model, {"student": "picosam2", "input_size": 32})
    raw = torch.load(path, weights_only=True)  # no code runs: plain dict of tensors and strings
    assert set(raw) == {"format", "meta", "tensors"} and isinstance(raw["meta"], str)
    loaded, meta = load_student(path)
    assert meta["kind"] == "student" and meta["input_size"] == 32 and not loaded.training
    x = normalize(torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_rejects_foreign_files_with_a_message(tmp_path):
    pickled = tmp_path / "module.pt"
    torch.save(build_student("picosam2"), pickled)  # a pickled module would run code on load
    with pytest.raises(
        PipelineError,
        match=r"was refused: loading it would run code from the file \(it asks for "
        r"picosam_pipeline\.train\.students\.PicoSAM2",
    ):
        load_checkpoint(pickled)
    plain = tmp_path / "state_dict.pt"
    torch.save(build_student("picosam2").state_dict(), plain)
    with pytest.raises(PipelineError, match="not a picosam-checkpoint"):
        load_student(plain)
    with pytest.raises(PipelineError, match="does not exist"):
        load_student(tmp_path / "missing.pt")


def test_optimizer_state_survives_flattening():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.rand(4, 3)).sum().backward()
    opt.step()
    tensors, rest = flatten_optimizer(opt.state_dict())
    json.dumps(rest)  # the non-tensor part goes into the checkpoint's JSON
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-2)
    fresh.load_state_dict(unflatten_optimizer(tensors, json.loads(json.dumps(rest))))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for k in a["state"][i])


# --------------------------------------------------------------------------------------------------
# the loop


def test_interrupted_run_resumes_to_bit_identical_weights(tmp_path):
    cfg = small_config(student="picosam2")
    straight = train(cfg, CPU, SyntheticShards().data(), tmp_path / "straight")
    assert straight.resumed_from is None and len(straight.state.train_log) == 6

    # 10 samples in batches of 4 = 3 batches per epoch; the kill comes during step 6, after the checkpoint
    # at step 4, so the rerun restarts epoch 1 and skips the batch it had already used.
    with pytest.raises(Interrupted):
        train(cfg, CPU, SyntheticShards(stop_after=5).data(), tmp_path / "killed")
    _, meta = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert meta["step"] == 4 and not (tmp_path / "killed" / "student.pt").exists()
    resumed = train(cfg, CPU, SyntheticShards().data(), tmp_path / "killed")
    assert resumed.resumed_from == 4 and (resumed.state.epoch, resumed.state.consumed) == (1, 3)

    for name in ("student.pt", "student_best.pt"):  # last and best: the best copy (step 3) came back from checkpoint 4
        a, meta_a = load_checkpoint(tmp_path / "straight" / name)
        b, meta_b = load_checkpoint(tmp_path / "killed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BN running stats included
        assert meta_a["step"] == meta_b["step"] and meta_a["val_iou"] == meta_b["val_iou"]
    assert resumed.state.train_log == straight.state.train_log
    assert resumed.state.val_log == straight.state.val_log  # step 0 (untrained), 3, 6
    assert [row[0] for row in straight.state.val_log] == [0, 3, 6]
    assert resumed.state.best_step == straight.state.best_step


def test_best_checkpoint_is_the_earliest_best_val_iou_after_step_0(tmp_path, monkeypatch):
    """Scripted val IoUs: step 0 (untrained) would win but is not a trained student; 0.6 at steps 2 and 4: step 2."""
    from picosam_pipeline.train import trainer as trainer_module

    scores = iter([0.9, 0.3, 0.6, 0.5, 0.6, 0.2])  # steps 0, 1, ..., 5
    weights = {}

    def scripted(model, batches, runtime, dist):
        weights[len(weights)] = {k: v.clone() for k, v in model.state_dict().items()}
        return next(scores)

    monkeypatch.setattr(trainer_module, "validate", scripted)
    result = train(small_config(student="picosam2", steps=5, eval_every=1), CPU, SyntheticShards().data(), tmp_path)
    assert result.state.best_step == 2 and result.state.best_iou == 0.6
    best, meta = load_checkpoint(tmp_path / "student_best.pt", kind="student")
    last, last_meta = load_checkpoint(tmp_path / "student.pt", kind="student")
    assert (meta["step"], meta["val_iou"], meta["which"]) == (2, 0.6, "best") and meta["best_step"] == 2
    assert (last_meta["step"], last_meta["val_iou"], last_meta["which"]) == (5, 0.2, "last")
    assert all(torch.equal(best[k], weights[2][k]) for k in best)  # the weights evaluated at step 2
    assert all(torch.equal(last[k], weights[5][k]) for k in last)
    assert not all(torch.equal(best[k], last[k]) for k in best)


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path, capsys):
    cfg = small_config(student="picosam2", steps=2)
    train(cfg, CPU, SyntheticShards().data(), tmp_path)
    again = train(dataclasses.replace(cfg, eval_every=1), CPU, SyntheticShards().data(), tmp_path)
    assert again.resumed_from == 2  # eval_every does not change the weights
    other = train(dataclasses.replace(cfg, lr=5e-4), CPU, SyntheticShards().data(), tmp_path)
    assert other.resumed_from is None and "differs in train.lr" in capsys.readouterr().err
    longer = train(dataclasses.replace(cfg, lr=5e-4, steps=3), CPU, SyntheticShards().data(), tmp_path)
    assert longer.resumed_from == 2 and len(longer.state.train_log) == 3  # constant schedule: extendable


def test_training_raises_val_iou_and_logs_every_step(tmp_path):
    cfg = small_config(
        student="picosam3",
        steps=40,
        eval_every=20,
        checkpoint_every=40,
        log_every=10,
        lr=3e-3,
        warmup_steps=5,
        temperature=1.0,
    )
    result = train(cfg, CPU, SyntheticShards(n=16).data(), tmp_path)
    assert [row[0] for row in result.state.train_log] == list(range(1, 41))
    assert len(result.state.train_log[0]) == len(LOG_COLUMNS)
    assert result.val_iou_after > result.val_iou_before + 0.2, result.state.val_log
    assert result.samples_per_s > 0 and result.params == sum(p.numel() for p in build_student("picosam3").parameters())
    first, last = result.state.train_log[0][2], result.final_loss(5)["loss"]
    assert last < first


def test_empty_training_data_is_a_pipeline_error(tmp_path):
    data = dataclasses.replace(SyntheticShards().data(), train_epoch=lambda epoch: iter(()), source="data/shards/train")
    with pytest.raises(PipelineError, match="data/shards/train: epoch 0 gave no training batch"):
        train(small_config(student="picosam2"), CPU, data, tmp_path)


class CountedEpochs:
    """``train_epoch`` stand-in with ``expected_batches``, as ShardLoader has: records when each epoch's ``iter``
    was called (after how many batches had been handed out in all) and whether its iterator was closed."""

    def __init__(self, batches_per_epoch: int) -> None:
        self.batches_per_epoch, self.handed_out = batches_per_epoch, 0
        self.started: dict[int, int] = {}
        self.closed: set[int] = set()

    def __call__(self, epoch: int) -> CountedEpochs.Epoch:
        return CountedEpochs.Epoch(self, epoch)

    class Epoch:
        def __init__(self, owner: CountedEpochs, epoch: int) -> None:
            self.owner, self.epoch, self.expected_batches = owner, epoch, owner.batches_per_epoch

        def __iter__(self):
            self.owner.started[self.epoch] = self.owner.handed_out
            return self._batches()

        def _batches(self):
            try:
                for i in range(self.owner.batches_per_epoch):
                    self.owner.handed_out += 1
                    yield {"epoch": self.epoch, "i": i}
            finally:
                self.owner.closed.add(self.epoch)


@pytest.mark.parametrize("per_epoch", [3, 100])
def test_next_epoch_loader_starts_before_the_current_one_ends(per_epoch):
    epochs = CountedEpochs(per_epoch)
    data = TrainData(train_epoch=epochs, val=list, input_size=32, fingerprint="x", source="x")
    stream = batch_stream(data, epoch=0, consumed=1)
    got = [next(stream) for _ in range(2 * per_epoch)]
    # the same batches as epoch after epoch, in order; the resumed epoch 0 skips the one batch it consumed
    assert [(e, seen, b["epoch"], b["i"]) for e, seen, b in got] == [
        (e, i + 1, e, i) for e in range(3) for i in range(per_epoch) if (e, i) != (0, 0)
    ][: 2 * per_epoch]
    start_at = max(1, per_epoch - EPOCH_LOOKAHEAD)  # batches of an epoch handed out when the next one starts
    assert epochs.started[0] == 0 and epochs.started[1] == start_at and epochs.started[2] == per_epoch + start_at
    stream.close()
    assert epochs.closed == {0, 1, 2}  # the started-ahead epoch 2 is shut down with the stream

    late = CountedEpochs(per_epoch)  # lookahead None: each epoch starts when the one before has ended
    stream = batch_stream(dataclasses.replace(data, train_epoch=late), epoch=0, consumed=0, lookahead=None)
    assert [b for _, _, b in (next(stream) for _ in range(2 * per_epoch + 1))] == [
        {"epoch": e, "i": i} for e in range(3) for i in range(per_epoch)
    ][: 2 * per_epoch + 1]
    assert late.started == {0: 0, 1: per_epoch, 2: 2 * per_epoch}


def test_a_compiled_student_runs_full_batches_compiled_and_short_ones_eagerly(tmp_path, monkeypatch):
    # SyntheticShards(n=10, batch 4) ends every epoch with a batch of 2. torch.compile of the whole batch range
    # recompiled for it (dynamic shapes); here only batches of train.batch_size reach the compiled student. The
    # eager backend traces with dynamo (the graphs and recompiles counted) without generating kernels.
    import functools

    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    cfg = small_config(student="picosam2", steps=9, compile=True, checkpoint_every=9, eval_every=9)
    result = train(cfg, CPU, SyntheticShards().data(), tmp_path)  # 3 epochs: 4, 4, 2 samples each
    assert counters["frames"]["total"] == 1, dict(counters["frames"])  # one graph, no recompile
    eager = train(dataclasses.replace(cfg, compile=False), CPU, SyntheticShards().data(), tmp_path / "eager")
    assert counters["frames"]["total"] == 1
    for name, weight in result.model.state_dict().items():  # the same training, compiled or not
        torch.testing.assert_close(weight, eager.model.state_dict()[name], rtol=1e-4, atol=1e-5)
    assert 0 <= result.loader_wait_share < 1


# --------------------------------------------------------------------------------------------------
# DDP


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str, compiled: bool) -> None:
    import functools
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    if compiled:  # dynamo traces the DDP wrapper; the eager backend skips generating kernels
        torch.compile = functools.partial(torch.compile, backend="eager")
    # 5 samples per rank in batches of 2: steps 1-2 full batches (compiled when compiled), step 3 a short one (eager)
    cfg = small_config(student="picosam2", steps=3, batch_size=2, checkpoint_every=3, eval_every=3, compile=compiled)
    result = train(cfg, CPU, SyntheticShards(n=10, batch_size=2, rank=rank, world_size=world_size).data(), out_dir)
    assert result.is_main == (rank == 0) and result.world_size == world_size
    torch.save(result.model.state_dict(), Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow  # two fresh interpreters import torch: ~10 s on an idle machine, 30 s on a busy one
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ddp_two_gloo_processes_keep_replicas_in_sync(tmp_path, compiled):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path), compiled), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    params = dict(build_student("picosam2").named_parameters())
    assert all(torch.equal(r0[k], r1[k]) for k in params)  # gradients were averaged: identical replicas
    _, meta = load_checkpoint(tmp_path / "checkpoint.pt")
    tensors, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert meta["identity"]["world_size"] == 2 and tensors["data.position"].shape == (2, 2)
    assert (tmp_path / "student.pt").is_file()


# --------------------------------------------------------------------------------------------------
# the stage, on real shards


@pytest.fixture(scope="module")
def packed(sample_inputs, sample_shards, tmp_path_factory) -> Config:
    """The built-in sample packed with a GT-mask teacher (8 samples per shard: the session's shards, read-only), and
    a 4-step train section writing into this module's folder."""
    root = tmp_path_factory.mktemp("train_stage")
    section = small_config(
        student="picosam2", steps=4, eval_every=4, shards=str(sample_shards), out_dir=str(root / "train")
    )
    return dataclasses.replace(elsewhere(sample_inputs, root), train=section)


def test_stage_writes_student_metrics_and_plots(packed):
    summary = train_stage.run(packed, CPU)
    metrics_dir = Path(packed.runtime.metrics_dir)
    headline = json.loads((metrics_dir / "train.json").read_text())
    assert set(headline) == {"val_iou_before", "val_iou_after", "untrained"}
    metrics = json.loads((Path(packed.train.out_dir) / "report.json").read_text())  # the details
    metrics.update(last_run(metrics_dir, "train"))  # the run's own facts: rate, resumed step
    assert metrics["steps"] == summary["steps"] == 4 and metrics["resumed_from_step"] is None
    assert metrics["params"] == 1_262_818 and metrics["samples_per_s"] > 0 and metrics["skipped_shards"] == 0
    assert set(metrics["loss"]) == {"loss", "gt", "teacher", "area", "lambda"}
    assert 0 <= metrics["val_iou_before"] <= 1 and 0 <= metrics["val_iou_after"] <= 1
    assert {k: metrics[k] for k in headline} == headline

    # dvclive: one TSV per logged quantity (step, value; no timestamps), one row per train.log_every (2) steps: the
    # window's mean loss and terms, the lr at its last step; and the live summary
    live = metrics_dir / "train"
    tensors, _ = load_checkpoint(Path(packed.train.resume_dir()) / "checkpoint.pt")
    steps = tensors["log.train"].numpy()  # the trainer's per-step log: step, lr, loss, terms
    for name in LOG_COLUMNS[1:]:
        with open(live / "plots" / "metrics" / "train" / f"{name}.tsv") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        assert [r["step"] for r in rows] == ["2", "4"] and list(rows[0]) == ["step", name]
        column = steps[:, LOG_COLUMNS.index(name)]
        expected = [column[1], column[3]] if name == "lr" else [column[:2].mean(), column[2:4].mean()]
        assert [float(r[name]) for r in rows] == pytest.approx(expected, rel=1e-12)
    with open(live / "plots" / "metrics" / "val" / "iou.tsv") as f:
        val = list(csv.DictReader(f, delimiter="\t"))
    assert [r["step"] for r in val] == ["0", "4"] and float(val[0]["iou"]) == metrics["val_iou_before"]
    with open(live / "plots" / "metrics" / "train" / "loss.tsv") as f:
        last_loss = float(list(csv.DictReader(f, delimiter="\t"))[-1]["loss"])
    assert json.loads((live / "metrics.json").read_text()) == {"step": 4, "loss": last_loss}
    assert not (live / "dvc.yaml").exists() and not (live / "report.html").exists()

    model, meta = load_student(Path(packed.train.out_dir) / "student.pt")
    assert meta["input_size"] == 96 and meta["val_iou_after"] == metrics["val_iou_after"]
    assert meta["config"]["steps"] == 4 and (Path(packed.train.out_dir) / "config.resolved.json").is_file()


def test_stage_names_missing_shards(packed, tmp_path):
    cfg = dataclasses.replace(packed, train=dataclasses.replace(packed.train, shards=str(tmp_path / "nowhere")))
    with pytest.raises(PipelineError, match="train.shards"):
        train_stage.run(cfg, CPU)


@pytest.mark.slow
def test_killed_cli_run_resumes_to_the_uninterrupted_result(packed, tmp_path):
    section = dataclasses.replace(packed.train, steps=6, eval_every=100, out_dir=str(tmp_path / "killed"))
    cfg = dataclasses.replace(
        packed, train=section, runtime=dataclasses.replace(packed.runtime, metrics_dir=str(tmp_path / "metrics"))
    )
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict()))
    command = [sys.executable, "-m", "picosam_pipeline.cli", "run-stage", "train", "--params", str(params)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as the in-process reference run

    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "killed.state" / "checkpoint.pt"  # the stage keeps it beside its output
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (tmp_path / "killed" / "student.pt").exists()

    subprocess.run(command, env=env, check=True, capture_output=True)
    metrics = {
        **json.loads((tmp_path / "killed" / "report.json").read_text()),
        **last_run(tmp_path / "metrics", "train"),
    }
    assert metrics["resumed_from_step"] in (2, 4) and metrics["steps"] == 6

    reference = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, out_dir=str(tmp_path / "straight")),
        runtime=dataclasses.replace(cfg.runtime, metrics_dir=str(tmp_path / "straight_metrics")),
    )
    train_stage.run(reference, CPU)
    a, _ = load_checkpoint(tmp_path / "killed" / "student.pt")
    b, _ = load_checkpoint(tmp_path / "straight" / "student.pt")
    assert all(torch.equal(a[k], b[k]) for k in b)
    # the dvclive log of the resumed run (replayed from the checkpoint's state) is the uninterrupted run's,
    # byte for byte
    resumed, straight = tmp_path / "metrics" / "train", tmp_path / "straight_metrics" / "train"
    files = sorted(p.relative_to(straight) for p in straight.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file())
    assert all((resumed / f).read_bytes() == (straight / f).read_bytes() for f in files)


@pytest.mark.slow  # 74 train steps with two loader worker processes
def test_loader_workers_over_epochs_started_ahead_resume_to_the_uninterrupted_result(packed, tmp_path):
    # Two loader worker processes, epochs of ~a dozen batches, so every epoch's loader is started ahead
    # (trainer.EPOCH_LOOKAHEAD): a run stopped at step 14 and extended to 30 (constant schedule) ends with the
    # weights of a run of 30 steps straight.
    def run(name: str, steps: int) -> dict[str, torch.Tensor]:
        section = dataclasses.replace(
            packed.train,
            steps=steps,
            eval_every=100,
            checkpoint_every=100,
            num_workers=2,
            schedule="constant",
            shuffle_buffer=16,
            out_dir=str(tmp_path / name),
        )
        cfg = dataclasses.replace(
            packed,
            train=section,
            runtime=dataclasses.replace(packed.runtime, metrics_dir=str(tmp_path / f"{name}_metrics")),
        )
        train_stage.run(cfg, CPU)
        facts = last_run(cfg.runtime.metrics_dir, "train")
        assert facts["loader_workers"] == 2 and 0 <= facts["loader_wait_share"] < 1 and facts["compiled"] is False
        return load_checkpoint(tmp_path / name / "student.pt")[0]

    batches = -(-read_shard_index(Path(packed.train.shards) / "train").samples // packed.train.batch_size)
    assert 2 * batches < 30 < 4 * batches  # the runs cross epoch boundaries
    run("extended", 14)
    extended = run("extended", 30)
    assert last_run(tmp_path / "extended_metrics", "train")["resumed_from_step"] == 14
    straight = run("straight", 30)
    assert all(torch.equal(extended[k], straight[k]) for k in straight)


def test_a_checkpoint_that_needs_unpickling_gets_our_message_not_torchs_advice(tmp_path):
    """torch's refusal advises loading with weights_only=False or allow-listing the global: code from the file."""
    marker, path = tmp_path / "ran.txt", tmp_path / "student.pt"
    torch.save({"format": "picosam-checkpoint/1", "meta": "{}", "tensors": {}, "x": CodeOnLoad(marker)}, path)
    with pytest.raises(PipelineError) as err:
        load_checkpoint(path, kind="student")
    text = str(err.value)
    assert f"checkpoint {str(path)!r} was refused: loading it would run code from the file" in text
    assert "it asks for " in text and "malicious_pickle.write_marker" in text and "nothing from it was run" in text
    assert "checkpoint written by the train stage" in text
    assert not re.search(r"weights_only|allowlist|add_safe_globals|safe_globals|trust", text), text
    assert not marker.exists()
