"""The training log, written the DVC way: dvclive step metrics and plots, and a live summary for ``dvc exp show``.

:class:`LiveLog` receives the trainer's :class:`~picosam_pipeline.train.trainer.TrainState` whenever rows were added
(``train(..., on_log=...)``) and hands the new ones to ``dvclive.Live``:

* ``<dir>/plots/metrics/train/{loss,gt,teacher,area,lambda,lr}.tsv``: one row ``step, value`` per window of
  ``every`` optimizer steps (``train.log_every``): the window's mean of the batch losses and terms, the learning
  rate at its last step, logged at that step; no timestamps, so a rerun or a resumed run writes the same bytes as an
  uninterrupted one. One row per window rather than per step keeps dvclive's cost (a file append per quantity and
  row) at ~0.15 ms per step with ``log_every: 10``, measured: under 1 % of even a 41 ms H200 step;
* ``<dir>/plots/metrics/val/iou.tsv``: the crop-space val mIoU per evaluation, step 0 = the untrained student;
* ``<dir>/metrics.json``: dvclive's summary, rewritten at every log: the step reached and the last window's loss.
  ``dvc.yaml`` lists it as a metrics file of the train stage, so ``dvc exp show`` (and DVC's editor integrations)
  show a run's progress while it trains; when the run ends it holds the final values.

The log itself lives in the trainer's state (saved in every checkpoint): a resumed run starts dvclive afresh
(``resume=False`` clears its folder) and replays the whole log, so the files never mix two runs. dvclive is kept out
of the way of the pipeline: no ``dvc.yaml`` of its own (``dvcyaml=None``: ours declares the files), no experiment of
its own (``save_dvc_exp=False``: ``dvc exp run`` tracks the stage), no report, no system monitor.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from picosam_pipeline.train.trainer import TrainState

# dvclive metric names of the trainer's log columns (trainer.LOG_COLUMNS after "step"); "train/" prefixes group them.
TRAIN_PREFIX, VAL_METRIC = "train", "val/iou"


class LiveLog:
    """Streams a :class:`TrainState`'s log to dvclive in ``folder`` (see the module docstring)."""

    def __init__(self, folder: str | Path, columns: tuple[str, ...], every: int = 1) -> None:
        import logging

        from dvclive import Live

        logging.getLogger("dvclive").setLevel(logging.WARNING)  # its "Logging to experiment" lines are not ours
        self.columns = columns  # ("step", "lr", "loss", terms...): the order of a train_log row
        self.every = max(1, int(every))
        self.live = Live(
            dir=str(folder), resume=False, report=None, save_dvc_exp=False, dvcyaml=None, monitor_system=False
        )
        self._train_rows = self._val_rows = 0
        self._loss: float | None = None

    def __call__(self, state: TrainState, final: bool = False) -> None:
        """Log the windows completed since the last call (and, when ``final``, the last partial one), the new val
        IoUs, then rewrite the summary. ``state.train_log`` holds one row per step from step 1 on, so windows fall
        on the same steps whatever the calls (a resumed run replays its log into the same rows)."""
        rows = state.train_log
        end = len(rows) if final else len(rows) // self.every * self.every
        for start in range(self._train_rows, end, self.every):
            window = np.asarray(rows[start : start + self.every], dtype=np.float64)
            self.live.step = int(window[-1, 0])
            for i, name in enumerate(self.columns[1:], start=1):
                value = window[-1, i] if name == "lr" else window[:, i].mean()  # lr at the step, losses: the mean
                self.live.log_metric(f"{TRAIN_PREFIX}/{name}", float(value))
            self._loss = float(window[:, self.columns.index("loss")].mean())
        self._train_rows = max(self._train_rows, end)
        for step, iou in state.val_log[self._val_rows :]:
            self.live.step = int(step)
            self.live.log_metric(VAL_METRIC, float(iou))
        self._val_rows = len(state.val_log)
        # The summary people watch while a run trains: the step and the loss (not every term, lr and the val IoU,
        # which would add a column each to `dvc exp show`; the plots hold them, metrics/train.json the IoUs).
        self.live.summary = {"loss": self._loss}
        self.live.step = state.step
        self.live.make_summary()

    def end(self, state: TrainState) -> None:
        """Log what is left of the run (its last partial window) and close dvclive (final summary)."""
        self(state, final=True)
        self.live.end()
