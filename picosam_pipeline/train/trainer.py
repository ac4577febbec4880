"""The distillation training loop: one flat loop in the style of nanoGPT's ``train.py``.

Per optimizer step, on ``runtime.device`` under ``runtime.autocast()`` (bf16 on CUDA, fp32 on CPU)::

    image (B, 3, S, S) float32 RGB in [0, 1] --normalize--> student --> logits (B, 1, S, S), float32 for the loss
    target, confidence = TeacherTarget(teacher_logits (B, K, S, S), confidence (B, K))   (train/targets.py)
    loss = DistillationLoss(logits, gt_mask (B, 1, S, S) {0, 1}, target (B, 1, S, S), confidence (B,))
    AdamW step at get_lr(step), gradient norm clipped to grad_clip

Validation IoU is the papers' crop-space mIoU (``iou.crop_ious``: logit > 0 against the GT crop, empty
union = 1, mean over every val sample). It is measured on the untrained student first (step 0), every
``eval_every`` steps and at the end, so "before" and "after" come from the same run.

Best and last. Every evaluation after step 0 that beats the best val IoU so far (strictly: the earliest of equal
ones) keeps a copy of the weights; the run ends by writing the last step's weights as ``student.pt`` and the best
ones as ``student_best.pt`` (PicoSAM3 ships a "best" checkpoint; val IoU can fall late in a run on real images).
The best copy and its step are part of the resumable state, so a resumed run writes the same two files.

Untrained students. A run too short to train (``steps <= warmup_steps``: it ends inside the learning-rate warm-up,
or fewer than ``recipes.MIN_TRAIN_STEPS``) is warned about on stderr before the first step; a run whose best val IoU
is not :data:`MIN_IOU_GAIN` above the untrained student's at the end. Both are one paragraph on stderr, naming the
numbers and the fix, and go with the result (:attr:`TrainResult.warnings`) and into the student checkpoints' meta
(``untrained``, ``training_warnings``), which quantize, export and package read. The run is not refused: smoke runs
on tiny data must complete.

Resuming. Every ``checkpoint_every`` steps ``state_dir/checkpoint.pt`` stores the weights, the AdamW moments,
the RNG states, the loss log and each rank's data position ``(epoch, batches consumed)``. The data stream
is a fresh, deterministic loader per epoch (its seed derived from ``(seed, epoch)``), so a rerun rebuilds the
epoch it was in and skips the batches already used. A killed run that is started again therefore ends with
weights bit-identical to an uninterrupted run (same device and world size). A checkpoint written for other
data or other settings (see :data:`RESUME_IGNORES`) is not resumed: training starts from step 0.

Multi-GPU. Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1 in the environment) each process joins
the process group (NCCL on CUDA, gloo on CPU), uses ``cuda:LOCAL_RANK``, wraps the student in
``DistributedDataParallel`` and reads its own shards (the loader splits shards by rank). Losses and val IoU
are averaged over ranks; rank 0 alone writes files and shows the progress bar. BatchNorm statistics are
per rank (no SyncBatchNorm), as a single-GPU run of the same per-rank batch would compute them::

    torchrun --nproc_per_node 4 -m picosam_pipeline.cli run-stage train
"""

from __future__ import annotations

import math
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from tqdm import tqdm

from picosam_pipeline.config import TrainConfig
from picosam_pipeline.device import Runtime
from picosam_pipeline.environment import check_local_device, distributed_ranks
from picosam_pipeline.errors import PipelineError
from picosam_pipeline.recipes import MIN_TRAIN_STEPS, SAMPLE_RUN
from picosam_pipeline.train.checkpoints import (
    flatten_optimizer,
    load_checkpoint,
    save_checkpoint,
    save_student,
    unflatten_optimizer,
)
from picosam_pipeline.train.iou import crop_ious
from picosam_pipeline.train.losses import DistillationLoss
from picosam_pipeline.train.students import NORMALIZATION, build_student, normalize
from picosam_pipeline.train.targets import resolve_target

CHECKPOINT_FILE, STUDENT_FILE, BEST_FILE = "checkpoint.pt", "student.pt", "student_best.pt"
TERMS = ("gt", "teacher", "area", "lambda")  # DistillationLoss's logged terms
LOG_COLUMNS = ("step", "lr", "loss", *TERMS)  # one row per optimizer step
VAL_COLUMNS = ("step", "val_iou")  # one row per evaluation; step 0 = the untrained student
# Settings that do not change the trained weights: a checkpoint written under other values still resumes.
RESUME_IGNORES = ("checkpoint_every", "eval_every", "log_every", "out_dir", "state_dir", "shards")
# A best val IoU less than this above the untrained student's (step 0) is noise: the student learned nothing.
MIN_IOU_GAIN = 0.005
BAR_REFRESH_S = 2.0  # the progress bar shows the step at least this often, whatever log_every is


# --------------------------------------------------------------------------------------------------
# schedule, data stream, distributed setup


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant or cosine to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 1.0)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 at the end of warm-up, 0 at the last step
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def epoch_seed(seed: int, epoch: int) -> int:
    """Loader seed of one epoch: distinct per (seed, epoch) pair, and the same on every rerun."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


@dataclass(frozen=True)
class TrainData:
    """Where batches come from (batches as ``loader.make_loader`` yields them).

    ``train_epoch(epoch)`` must give the same batches in the same order every time it is called with the same
    epoch (on the same rank): that is what makes resuming exact. ``val()`` gives one pass over the val split.
    ``fingerprint`` identifies the training data (e.g. the sha256 of ``shards.json``); ``source`` names it in messages.
    ``teachers`` names the channels of the batches' ``teacher_logits`` (``ShardLoader.teachers``).
    ``crop``: the crop convention of the samples (``shards.json``'s ``crop``), recorded in the student checkpoints.
    """

    train_epoch: Callable[[int], Iterable[dict[str, Any]]]
    val: Callable[[], Iterable[dict[str, Any]]]
    input_size: int
    fingerprint: str
    source: str
    teachers: tuple[str, ...] = ("teacher",)
    crop: dict[str, Any] | None = None


EPOCH_LOOKAHEAD = 64  # batches before an epoch's expected end at which the next epoch's loader starts


def batch_stream(
    data: TrainData, epoch: int, consumed: int, lookahead: int | None = EPOCH_LOOKAHEAD
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Endless ``(epoch, batches consumed in that epoch, batch)``, starting after ``consumed`` batches of ``epoch``.

    A loader that says how many batches it expects (``expected_batches``, as ``loader.ShardLoader`` does, whose
    ``iter`` starts its worker processes at once) has the next epoch's loader started ``lookahead`` batches
    before its expected end (None: when it ends): the new workers' start-up (fork, first shards read and
    checked, the shuffle buffer filled, the first batches decoded) overlaps this epoch's last steps instead of
    stalling the step at every epoch boundary. The batches are the same: each epoch's loader depends only on
    its epoch.
    """

    def start(epoch: int) -> tuple[Iterable[dict[str, Any]], Iterator[dict[str, Any]]]:
        loader = data.train_epoch(epoch)
        return loader, iter(loader)  # a ShardLoader's workers start here

    upcoming: tuple[Iterable[dict[str, Any]], Iterator[dict[str, Any]]] | None = None  # (loader, its batches)
    try:
        while True:
            (loader, batches), upcoming = upcoming or start(epoch), None
            expected = getattr(loader, "expected_batches", None)
            start_next_at = None if expected is None or lookahead is None else max(1, expected - lookahead)
            seen = 0
            for seen, batch in enumerate(batches, start=1):
                if seen == start_next_at:
                    upcoming = start(epoch + 1)
                if seen > consumed:  # a resumed epoch re-reads and drops the batches the checkpoint already used
                    yield epoch, seen, batch
            if seen == 0:
                raise PipelineError(
                    f"{data.source}: epoch {epoch} gave no training batch; the shards are empty or "
                    "every shard was skipped as corrupt (see train.on_corrupt_shard); repack with "
                    "`run-stage pack`"
                )
            epoch, consumed = epoch + 1, 0
    finally:
        if upcoming is not None and hasattr(upcoming[1], "close"):
            upcoming[1].close()  # its worker processes end now


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(runtime: Runtime) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL + ``cuda:LOCAL_RANK`` on CUDA, else gloo).

    Raises:
        EnvironmentVariableError: ``WORLD_SIZE``, ``RANK`` or ``LOCAL_RANK`` unusable (``environment.py``).
    """
    rank, world_size, local_rank = distributed_ranks()
    if world_size == 1:
        return Dist(0, 1, runtime.device)
    device = runtime.device
    if device.type == "cuda":
        check_local_device(local_rank, torch.cuda.device_count())
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, device)


def _all_sum(t: Tensor, dist: Dist) -> Tensor:
    """Sum over ranks (gloo has no AVG); a no-op in a single process."""
    if dist.world_size > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def _say(dist: Dist, message: str) -> None:
    if dist.is_main:
        tqdm.write(f"[train] {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# untrained students


def short_run_warning(cfg: TrainConfig) -> str | None:
    """Why a run of ``cfg.steps`` steps cannot train the student (it ends inside its warm-up, or is shorter than
    ``recipes.MIN_TRAIN_STEPS``), with the fix; None for a run long enough."""
    steps, warmup = cfg.steps, cfg.warmup_steps
    sample_steps, sample_warmup = SAMPLE_RUN["train.steps"], SAMPLE_RUN["train.warmup_steps"]
    fix = f"Set train.steps={max(MIN_TRAIN_STEPS, 2 * warmup)} or more"
    if warmup > sample_warmup:  # the papers' warm-up: a small dataset wants the sample run
        fix += f", or recipe.size=sample for a dataset this small ({sample_steps} steps, {sample_warmup} of warm-up)"
    if isinstance(steps, int) and steps <= warmup:
        return (
            f"train.steps={steps} ends inside the learning-rate warm-up (train.warmup_steps={warmup}): the learning "
            f"rate never reaches train.lr={cfg.lr} and the student barely moves from its random weights. {fix}."
        )
    if isinstance(steps, int) and steps < MIN_TRAIN_STEPS:
        return (
            f"train.steps={steps} is under the {MIN_TRAIN_STEPS} steps in which a student measurably learns (the "
            f"sample's: val IoU 0.39 -> 0.54). {fix}."
        )
    return None


def no_gain_warning(val_log: list[list[float]], best_step: int) -> str | None:
    """Why the student of ``val_log`` (rows of :data:`VAL_COLUMNS`, step 0 the untrained student's) counts as
    untrained: its best val IoU is not :data:`MIN_IOU_GAIN` above step 0's. None when it learned."""
    before, last = val_log[0][1], val_log[-1][1]
    best = max((iou for step, iou in val_log if step > 0), default=before)
    if best - before >= MIN_IOU_GAIN:
        return None
    return (
        f"val IoU did not improve: {before:.4f} untrained (step 0), {best:.4f} at best (step {best_step}), "
        f"{last:.4f} at the end, a gain under {MIN_IOU_GAIN}. Train longer (train.steps), or check the loss in "
        "metrics/train/ and the teacher's logits (metrics/teacher-logits*.json)."
    )


def untrained_paragraph(warnings: list[str], *, before_training: bool) -> str:
    """The one paragraph said on stderr about an untrained student: ``warnings`` and what happens next."""
    if before_training:
        head = "WARNING: this run will not train the student."
        tail = "It runs anyway (a smoke test); metrics/train.json will say untrained: true."
    else:
        head = "WARNING: the student is UNTRAINED."
        tail = (
            "metrics/train.json says untrained: true, and quantize, export and package of this student say so again "
            "(untrained_student: true in their metrics)."
        )
    text = textwrap.fill(" ".join([head, *warnings, tail]), width=110)
    return f"\n{text}\n"


def _warn(dist: Dist, warnings: list[str], *, before_training: bool) -> None:
    if warnings and dist.is_main:
        tqdm.write(untrained_paragraph(warnings, before_training=before_training), file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# the optimizer step


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``model``; fused (one kernel over all parameters) on CUDA, where the tiny student's step is
    launch-bound, torch's default (foreach) elsewhere."""
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True if device.type == "cuda" else None
    )


class TrainStep:
    """One optimizer step on a batch already on the device: the train loop's and ``bench/train_gpu.py``'s.

    ``net`` is the student as trained (the model, or its DDP wrapper); ``model`` the plain module (gradient
    clipping). With ``compile_batch`` set, ``torch.compile(net)`` runs the batches of exactly that many samples
    and ``net`` the rest, eagerly, on the same parameters: each loader worker ends an epoch with a short batch,
    and the first one made dynamo recompile the student for dynamic batch sizes, a slow compile
    (measured: the compiled stage at 7 % of the bare step on an H200, 16 % on this project's 2-core CPU;
    91 % on that CPU with short batches run eagerly).

    ``__call__(image (B, 3, S, S) float32 in [0, 1], gt (B, 1, S, S) {0, 1}, teacher_logits (B, K, S, S),
    confidences (B, K), lr)`` returns ``[loss, *TERMS]`` as a float32 (1 + len(TERMS),) tensor on the device,
    without a host sync.
    """

    def __init__(
        self,
        net: nn.Module,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: DistillationLoss,
        target: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
        runtime: Runtime,
        grad_clip: float,
        compile_batch: int | None = None,
    ) -> None:
        self.net, self.model, self.optimizer, self.loss_fn, self.target = net, model, optimizer, loss_fn, target
        self.runtime, self.grad_clip, self.compile_batch = runtime, grad_clip, compile_batch
        self.compiled = torch.compile(net) if compile_batch else None

    def __call__(self, image: Tensor, gt: Tensor, teachers: Tensor, confidences: Tensor, lr: float) -> Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        teacher, confidence = self.target(teachers, confidences)  # (B, 1, S, S), (B,)
        net = self.compiled if self.compiled is not None and image.shape[0] == self.compile_batch else self.net
        with self.runtime.autocast():
            logits = net(normalize(image))
        loss, terms = self.loss_fn(logits.float(), gt, teacher, confidence)  # the loss in fp32, whatever autocast did
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return torch.stack([loss.detach(), *(terms[k] for k in TERMS)]).float()


# --------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def validate(model: nn.Module, batches: Iterable[dict[str, Any]], runtime: Runtime, dist: Dist) -> float:
    """Crop-space mIoU of ``model`` on ``batches`` (all ranks together): mean IoU of logit > 0 vs ``gt_mask``."""
    was_training = model.training
    model.eval()  # BatchNorm uses its running statistics and does not update them
    total = torch.zeros(2, dtype=torch.float64)  # (sum of IoUs, samples)
    for batch in batches:
        with runtime.autocast():
            logits = model(normalize(batch["image"].to(dist.device, non_blocking=True)))
        ious = crop_ious(logits.float(), batch["gt_mask"])  # (B,) float64 in [0, 1]
        total += torch.tensor([ious.sum(), len(ious)], dtype=torch.float64)
    model.train(was_training)
    total = _all_sum(total.to(dist.device), dist).cpu()
    if total[1] == 0:
        raise PipelineError("the val split gave no samples to evaluate; pack a val split (pack.splits: [train, val])")
    return float(total[0] / total[1])


# --------------------------------------------------------------------------------------------------
# train state and checkpoints


@dataclass
class TrainState:
    """What a checkpoint restores besides weights and optimizer: position in the run and its logs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # this rank's data position: epoch, and batches of it consumed
    consumed: int = 0
    train_log: list[list[float]] = field(default_factory=list)  # rows of LOG_COLUMNS
    val_log: list[list[float]] = field(default_factory=list)  # rows of VAL_COLUMNS
    best_step: int = 0  # the step of the best val IoU after step 0 (0: no evaluation yet)
    best_weights: dict[str, Tensor] | None = None  # its state dict, on the CPU

    @property
    def best_iou(self) -> float:
        return next((iou for step, iou in self.val_log if step == self.best_step), -1.0) if self.best_step else -1.0

    def note_evaluation(self, model: nn.Module) -> None:
        """After appending an evaluation to ``val_log``: keep the weights when it beats the best (step 0 excluded)."""
        step, iou = self.val_log[-1]
        if step > 0 and iou > self.best_iou:
            self.best_step = int(step)
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def run_identity(cfg: TrainConfig, seed: int, world_size: int, fingerprint: str) -> dict[str, Any]:
    """Everything that decides the trained weights; a checkpoint resumes only if this matches."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUME_IGNORES}
    if cfg.schedule == "constant":
        settings.pop("steps")  # with a constant schedule a run can be extended by raising train.steps
    return {"train": settings, "seed": seed, "world_size": world_size, "data": fingerprint}


def save_train_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    identity: dict[str, Any],
    dist: Dist,
) -> None:
    """Write ``path`` from rank 0 with every rank's data position (a collective: call it on all ranks)."""
    position = torch.tensor([state.epoch, state.consumed], dtype=torch.int64, device=dist.device)
    positions = [torch.zeros_like(position) for _ in range(dist.world_size)]
    if dist.world_size > 1:
        torch_dist.all_gather(positions, position)
    else:
        positions = [position]
    if not dist.is_main:
        return
    optimizer_tensors, optimizer_rest = flatten_optimizer(optimizer.state_dict())
    tensors = {
        **{f"model.{k}": v for k, v in model.state_dict().items()},
        **optimizer_tensors,
        "rng.torch": torch.get_rng_state(),
        "data.position": torch.stack(positions),  # (world_size, 2): epoch, batches consumed
        "log.train": torch.tensor(state.train_log, dtype=torch.float64).reshape(-1, len(LOG_COLUMNS)),
        "log.val": torch.tensor(state.val_log, dtype=torch.float64).reshape(-1, len(VAL_COLUMNS)),
        **{f"best.{k}": v for k, v in (state.best_weights or {}).items()},
    }
    if dist.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(dist.device)
    meta = {
        "kind": "train_state",
        "step": state.step,
        "best_step": state.best_step,
        "identity": identity,
        "optimizer": optimizer_rest,
        "log_columns": list(LOG_COLUMNS),
        "val_columns": list(VAL_COLUMNS),
    }
    save_checkpoint(path, tensors, meta)


def load_train_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, identity: dict[str, Any], steps: int, dist: Dist
) -> TrainState | None:
    """Restore weights, optimizer and RNG from ``path`` if it exists and belongs to this run; else ``None``."""
    if not path.is_file():
        return None
    tensors, meta = load_checkpoint(path, kind="train_state")
    if meta["identity"] != identity or meta["step"] > steps:
        old = meta["identity"]
        changed = [
            f"train.{k}"
            for k in sorted(set(identity["train"]) | set(old["train"]))
            if identity["train"].get(k) != old["train"].get(k)
        ]
        changed += [k for k in ("seed", "world_size", "data") if identity[k] != old.get(k)]
        if meta["step"] > steps:
            changed.append(f"train.steps ({steps} < the checkpoint's {meta['step']})")
        _say(dist, f"{path} is from another run (differs in {', '.join(changed)}); starting from step 0")
        return None
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and dist.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], dist.device)
    epoch, consumed = tensors["data.position"][dist.rank].tolist()
    best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
    return TrainState(
        step=meta["step"],
        epoch=epoch,
        consumed=consumed,
        train_log=tensors["log.train"].tolist(),
        val_log=tensors["log.val"].tolist(),
        best_step=meta.get("best_step", 0) if best else 0,
        best_weights=best or None,
    )


# --------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    """What a finished run reports (``is_main``: this process is rank 0, the one that wrote the files)."""

    model: nn.Module  # the trained student (not the DDP wrapper), on the training device
    state: TrainState
    params: int
    resumed_from: int | None  # the step the run resumed at; None = started from scratch
    samples_per_s: float | None  # training throughput of this invocation after its first step, all ranks; None
    # when it ran fewer than two steps
    loader_wait_share: float | None  # of that training time, the share this rank's host spent waiting for batches
    world_size: int
    is_main: bool
    student_path: Path
    best_path: Path
    warnings: list[str] = field(default_factory=list)  # why the student counts as untrained (empty: it trained)

    @property
    def untrained(self) -> bool:
        """The run was too short to train the student, or its val IoU did not improve (:attr:`warnings`)."""
        return bool(self.warnings)

    @property
    def val_iou_before(self) -> float:
        return self.state.val_log[0][1]

    @property
    def val_iou_after(self) -> float:
        return self.state.val_log[-1][1]

    def final_loss(self, window: int) -> dict[str, float]:
        """Mean loss and terms over the last ``window`` steps (one step's loss is noisy)."""
        rows = np.asarray(self.state.train_log[-window:], dtype=np.float64)
        return {name: float(rows[:, i].mean()) for i, name in enumerate(LOG_COLUMNS) if name not in ("step", "lr")}


def train(
    cfg: TrainConfig,
    runtime: Runtime,
    data: TrainData,
    out_dir: str | Path,
    state_dir: str | Path | None = None,
    on_log: Callable[[TrainState], None] | None = None,
) -> TrainResult:
    """Train ``cfg.student`` for ``cfg.steps`` steps, resuming from ``state_dir/checkpoint.pt`` when it fits.

    Writes (rank 0) ``state_dir/checkpoint.pt`` every ``checkpoint_every`` steps and at the end, the final
    weights as ``out_dir/student.pt`` and the best-val-IoU weights as ``out_dir/student_best.pt`` (``student``
    checkpoints, see ``checkpoints.py``). ``state_dir``
    defaults to ``out_dir``; the train stage keeps it apart, so that its DVC output holds only the result.
    ``on_log(state)`` is called on rank 0 whenever rows were added to ``state.train_log`` / ``state.val_log`` (at
    the start, with a resumed run's whole log, then every ``log_every`` steps and after each evaluation): the
    train stage streams them to dvclive.
    """
    if not isinstance(cfg.steps, int):
        raise ValueError(f"train.steps must be resolved to a number of steps before training, got {cfg.steps!r}")
    dist = init_distributed(runtime)
    try:
        return _train(
            cfg, runtime, data, Path(out_dir), Path(state_dir or out_dir), dist, on_log if dist.is_main else None
        )
    finally:
        if dist.world_size > 1:
            torch_dist.destroy_process_group()


@dataclass
class _Run:
    """One invocation's training objects: the student (``model``; ``net`` is its DDP wrapper under torchrun), the
    optimizer, the compiled-or-eager step, the state (resumed or new) and where it is checkpointed."""

    model: nn.Module
    optimizer: torch.optim.AdamW
    train_step: TrainStep
    state: TrainState
    identity: dict[str, Any]
    checkpoint: Path
    resumed_from: int | None


def _train(
    cfg: TrainConfig, runtime: Runtime, data: TrainData, out_dir: Path, state_dir: Path, dist: Dist, on_log
) -> TrainResult:
    """:func:`train` in an initialised process group (``dist``): set up or resume, run the steps left, save the
    last and best weights (rank 0); ``on_log`` is None on the ranks that write nothing."""
    on_log = on_log or (lambda state: None)
    short = short_run_warning(cfg)
    _warn(dist, [short] if short else [], before_training=True)
    run = _start(cfg, runtime, data, state_dir, dist)
    on_log(run.state)
    student_path, best_path = out_dir / STUDENT_FILE, out_dir / BEST_FILE
    if dist.is_main and run.state.step < cfg.steps:
        for path in (student_path, best_path):  # they exist only once the run they belong to has finished
            path.unlink(missing_ok=True)
    samples, train_time, loader_wait = _steps(cfg, runtime, data, run, dist, on_log)
    state, model = run.state, run.model
    if state.best_weights is None:  # resumed at its end from a checkpoint written before best copies were kept
        state.best_step = state.step
        state.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    warnings = [w for w in (short, no_gain_warning(state.val_log, state.best_step)) if w]
    _warn(dist, warnings, before_training=False)
    if dist.is_main:
        _save_students(cfg, runtime, data, run, student_path, best_path, warnings)
    return TrainResult(
        model=model,
        state=state,
        params=sum(p.numel() for p in model.parameters()),
        resumed_from=run.resumed_from,
        samples_per_s=samples * dist.world_size / train_time if train_time > 0 and samples else None,
        loader_wait_share=loader_wait / train_time if train_time > 0 and samples else None,
        world_size=dist.world_size,
        is_main=dist.is_main,
        student_path=student_path,
        best_path=best_path,
        warnings=warnings,
    )


def _start(cfg: TrainConfig, runtime: Runtime, data: TrainData, state_dir: Path, dist: Dist) -> _Run:
    """Build the student, optimizer, loss and step; resume from ``state_dir/checkpoint.pt`` when it belongs to this
    run (same config, seed, world size and shards), else score the untrained student as the log's first row."""
    torch.manual_seed(runtime.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_student(cfg.student).to(dist.device)
    optimizer = build_optimizer(model, cfg, dist.device)
    loss_fn = DistillationLoss(**cfg.loss_kwargs())
    target = resolve_target(cfg.target, cfg.target_weights, data.teachers)  # PipelineError before any work
    identity = run_identity(cfg, runtime.seed, dist.world_size, data.fingerprint)
    checkpoint = state_dir / CHECKPOINT_FILE

    state = load_train_state(checkpoint, model, optimizer, identity, cfg.steps, dist)
    resumed_from = None if state is None else state.step
    if state is None:
        state = TrainState()
        state.val_log.append([0, validate(model, data.val(), runtime, dist)])  # the untrained student
        _say(dist, f"untrained {cfg.student}: val IoU {state.val_log[0][1]:.4f}")
    else:
        _say(dist, f"resuming {checkpoint} at step {state.step} (epoch {state.epoch}, {state.consumed} batches in)")
    net = model
    if dist.world_size > 1:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    # Compiled: the student's forward and backward as fused kernels (the bare step 1.28x on an H200), for full
    # batches. Evaluation and checkpoints keep using `model` (the same parameters, uncompiled).
    train_step = TrainStep(
        net,
        model,
        optimizer,
        loss_fn,
        target,
        runtime,
        cfg.grad_clip,
        compile_batch=cfg.batch_size if cfg.compiles(dist.device.type) else None,
    )
    return _Run(model, optimizer, train_step, state, identity, checkpoint, resumed_from)


def _steps(
    cfg: TrainConfig, runtime: Runtime, data: TrainData, run: _Run, dist: Dist, on_log: Callable[[TrainState], None]
) -> tuple[int, float, float]:
    """Run the steps from ``run.state.step`` to ``cfg.steps``: log every ``log_every`` (one host sync), evaluate
    every ``eval_every`` and checkpoint every ``checkpoint_every`` steps and at the end.

    Returns ``(samples, train_time, loader_wait)`` counted from the end of this invocation's first step (compiling
    and the loader's start-up happen there once), evaluation and checkpoint time left out.
    """
    state, model = run.state, run.model
    batches = batch_stream(data, state.epoch, state.consumed)
    pending: list[tuple[int, float, Tensor]] = []  # (step, lr, [loss, *TERMS]) on the device, synced every log_every
    samples, train_time, loader_wait, mark = 0, 0.0, 0.0, time.perf_counter()
    bar = tqdm(
        total=cfg.steps,
        initial=state.step,
        desc=f"train {cfg.student}",
        unit="step",
        disable=not dist.is_main,
        mininterval=BAR_REFRESH_S / 2,
        miniters=1,  # every update may redraw (tqdm's adaptive miniters can hold the bar still for 10 s)
    )
    model.train()
    first_step = state.step
    while state.step < cfg.steps:
        waited = time.perf_counter()
        state.epoch, state.consumed, batch = next(batches)
        loader_wait += time.perf_counter() - waited  # the host blocked on the loader: the device may idle
        lr = get_lr(state.step, cfg)
        image, gt, teachers, confidences = (
            batch[k].to(dist.device, non_blocking=True) for k in ("image", "gt_mask", "teacher_logits", "confidence")
        )
        row = run.train_step(image, gt, teachers, confidences, lr)  # [loss, *TERMS] on the device
        state.step += 1
        samples += image.shape[0]
        if state.step == first_step + 1:
            _all_sum(row[:1].clone(), dist).item()  # one host sync: the rate counts from here
            samples, train_time, loader_wait, mark = 0, 0.0, 0.0, time.perf_counter()
        pending.append((state.step, lr, row))
        bar.update(1)  # the step count needs no host sync: the bar moves between log rows too

        last = state.step == cfg.steps
        do_eval = last or state.step % cfg.eval_every == 0
        do_checkpoint = last or state.step % cfg.checkpoint_every == 0
        if do_eval or do_checkpoint or state.step % cfg.log_every == 0:
            _log_rows(state, pending, dist)
            now = time.perf_counter()
            train_time, mark = train_time + now - mark, now
            loss = state.train_log[-1][2]
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples * dist.world_size / train_time:.1f}")
            on_log(state)
        if do_eval:
            state.val_log.append([state.step, validate(model, data.val(), runtime, dist)])
            state.note_evaluation(model)
            _say(dist, f"step {state.step}: val IoU {state.val_log[-1][1]:.4f}")
            on_log(state)
        if do_checkpoint:
            save_train_state(run.checkpoint, model, run.optimizer, state, run.identity, dist)
        if do_eval or do_checkpoint:
            mark = time.perf_counter()  # evaluation and checkpoint time do not count as training time
    bar.close()
    batches.close()  # ends the current epoch's loader (and its worker processes) now, not at garbage collection
    return samples, train_time, loader_wait


def _log_rows(state: TrainState, pending: list[tuple[int, float, Tensor]], dist: Dist) -> None:
    """Move the pending ``(step, lr, [loss, *TERMS])`` rows (averaged over the ranks) into ``state.train_log``;
    a non-finite loss stops the run with the fix."""
    values = (_all_sum(torch.stack([v for _, _, v in pending]), dist) / dist.world_size).tolist()  # host sync
    if not all(math.isfinite(x) for row in values for x in row):
        raise PipelineError(
            f"training diverged: non-finite loss by step {state.step}; lower train.lr, set "
            "train.grad_clip (e.g. 1.0) or raise train.warmup_steps"
        )
    state.train_log += [[step, lr_, *row] for (step, lr_, _), row in zip(pending, values)]
    pending.clear()


def _save_students(
    cfg: TrainConfig,
    runtime: Runtime,
    data: TrainData,
    run: _Run,
    student_path: Path,
    best_path: Path,
    warnings: list[str],
) -> None:
    """Write the last weights to ``student_path`` and the best-val-IoU weights to ``best_path`` (rank 0), with the
    run's meta (config, data fingerprint, crop convention, val IoU before / after, best step, and whether the student
    is untrained, with the ``training_warnings`` that say why)."""
    state = run.state
    meta = {
        "student": cfg.student,
        "input_size": data.input_size,
        "normalization": asdict(NORMALIZATION),
        "seed": runtime.seed,
        "config": asdict(cfg),
        "data": data.fingerprint,
        "crop": data.crop,
        "val_iou_before": state.val_log[0][1],
        "val_iou_after": state.val_log[-1][1],
        "best_step": state.best_step,
        "best_val_iou": state.best_iou,
        "last_step": state.step,
        "untrained": bool(warnings),
        "training_warnings": list(warnings),
    }
    save_student(
        student_path, run.model, {**meta, "step": state.step, "val_iou": state.val_log[-1][1], "which": "last"}
    )
    best = build_student(cfg.student)
    best.load_state_dict(state.best_weights)
    save_student(best_path, best, {**meta, "step": state.best_step, "val_iou": state.best_iou, "which": "best"})
