"""Lightning callbacks of ``weakstil pretrain``: the loss history (kept in checkpoints) and progress.

Rates are wall-clock: tiles per second between the ends of consecutive steps (reading, augmenting
and training together), summed over DDP ranks; each tile gives 2 views (SimCLR) or 2 + n_local (DINO).
"""

from __future__ import annotations

import sys
import time
from collections import deque

from lightning.pytorch.callbacks import Callback

PLAIN_EVERY_S = 30.0  # a plain progress line at most this often when stderr is not a terminal


class LossHistory(Callback):
    """(step, loss, tiles/s) per step. Its state goes into the checkpoints, so a resumed run's
    curve continues where the checkpoint left it."""

    def __init__(self):
        self.rows: list[tuple[int, float, float]] = []
        self._last: float | None = None

    def on_train_start(self, trainer, pl_module):
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        now = time.perf_counter()
        seconds = max(now - (self._last or now), 1e-9)
        self._last = now
        tiles = len(batch) * trainer.world_size
        self.rows.append((int(trainer.global_step), float(loss.detach().float().cpu()), tiles / seconds))

    def state_dict(self) -> dict:
        return {"rows": [list(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = [tuple(r) for r in state_dict.get("rows", [])]

    def recent_rate(self, n: int = 20) -> float | None:
        """Median tiles/s over the last ``n`` steps (the first step, with start-up costs, left out)."""
        import statistics

        rates = [r[2] for r in self.rows[1:][-n:]]
        return statistics.median(rates) if rates else None


class SSLProgress(Callback):
    """Progress on rank 0: a rich bar with loss and tiles/s on a terminal, plain lines otherwise."""

    def __init__(self, max_steps: int | None, *, enabled: bool = True, stream=None):
        self.max_steps = max_steps or None
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._bar = self._task = None
        self._rates: deque = deque(maxlen=20)
        self._last = self._last_line = 0.0

    def on_train_start(self, trainer, pl_module):
        if not (self.enabled and trainer.is_global_zero):
            return
        self._last = self._last_line = time.perf_counter()
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}  {task.fields[rate]} tiles/s"),
                                 TimeElapsedColumn(), console=Console(file=self.stream))
            self._bar.start()
            self._task = self._bar.add_task("pretrain", total=self.max_steps, completed=trainer.global_step,
                                            loss="–", rate="–")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not (self.enabled and trainer.is_global_zero):
            return
        now = time.perf_counter()
        self._rates.append(len(batch) * trainer.world_size / max(now - self._last, 1e-9))
        self._last = now
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        loss_text, rate = f"{float(loss.detach().float()):.4f}", sorted(self._rates)[len(self._rates) // 2]
        step = trainer.global_step
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss_text, rate=f"{rate:,.1f}")
        elif now - self._last_line >= PLAIN_EVERY_S or step == 1 or step == self.max_steps:
            self._last_line = now
            total = f"/{self.max_steps}" if self.max_steps else ""
            print(f"pretrain step {step}{total}  loss {loss_text}  {rate:,.1f} tiles/s", file=self.stream,
                  flush=True)

    def on_train_end(self, trainer, pl_module):
        self._stop()

    def on_exception(self, trainer, pl_module, exception):
        self._stop()

    def _stop(self):
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
