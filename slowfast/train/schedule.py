"""The learning-rate schedule: linear warm-up, then half-period cosine (PySlowFast's `cosine` policy).

As in the reference (`lr_policy.py`, `SOLVER.COSINE_AFTER_WARMUP: False`, the Kinetics configs' setting),
the cosine runs over the whole run from epoch 0, not from the end of warm-up: warm-up is a straight line
from `warmup_start_lr` at epoch 0 to the cosine's own value at `warmup_epochs`, and the cosine alone
takes over from there. The LR is continuous and reaches `end_lr` at `total_epochs`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

# The reference's WARMUP_START_LR / BASE_LR (0.01 / 0.1; also its WARMUP_FACTOR): warm-up starts at a
# tenth of the base LR, which keeps the ratio when the base LR is scaled with the batch.
WARMUP_START_FACTOR = 0.1


def cosine_lr(epoch: float, *, base_lr: float, total_epochs: float, end_lr: float = 0.0) -> float:
    """Half-period cosine from base_lr at epoch 0 to end_lr at total_epochs."""
    return end_lr + (base_lr - end_lr) * (math.cos(math.pi * epoch / total_epochs) + 1.0) * 0.5


def lr_at(
    epoch: float,
    *,
    base_lr: float,
    warmup_epochs: float,
    total_epochs: float,
    warmup_start_lr: float | None = None,
    end_lr: float = 0.0,
) -> float:
    """The LR at a fractional epoch (epoch + step / steps_per_epoch).

    warmup_start_lr: None = base_lr * WARMUP_START_FACTOR (the reference's 0.01 for base 0.1).
    Epochs past total_epochs keep end_lr rather than climbing the cosine back up.
    """
    if total_epochs <= 0 or not 0 <= warmup_epochs <= total_epochs:
        raise ValueError(
            f"need 0 <= warmup_epochs <= total_epochs and total_epochs > 0, "
            f"got warmup_epochs={warmup_epochs}, total_epochs={total_epochs}"
        )
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    epoch = min(epoch, total_epochs)
    if epoch < warmup_epochs:
        start = base_lr * WARMUP_START_FACTOR if warmup_start_lr is None else warmup_start_lr
        end = cosine_lr(warmup_epochs, base_lr=base_lr, total_epochs=total_epochs, end_lr=end_lr)
        return start + (end - start) * epoch / warmup_epochs
    return cosine_lr(epoch, base_lr=base_lr, total_epochs=total_epochs, end_lr=end_lr)


@dataclass
class LRSchedule:
    """`lr_at` bound to one run's numbers; sets the LR of every param group before each step.

    Its state_dict goes into checkpoints: a resumed run continues the schedule it started with, and
    last_epoch / last_lr say where it stopped.
    """

    base_lr: float
    warmup_epochs: float
    total_epochs: float
    warmup_start_lr: float | None = None
    end_lr: float = 0.0
    last_epoch: float = 0.0
    last_lr: float | None = None

    def lr(self, epoch: float) -> float:
        return lr_at(
            epoch,
            base_lr=self.base_lr,
            warmup_epochs=self.warmup_epochs,
            total_epochs=self.total_epochs,
            warmup_start_lr=self.warmup_start_lr,
            end_lr=self.end_lr,
        )

    def step(self, optimizer: torch.optim.Optimizer, epoch: int, step: int, steps_per_epoch: int) -> float:
        """Set the LR for step `step` (0-based) of epoch `epoch` (0-based), times each group's `lr_mult`;
        return it (the backbone's)."""
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.last_epoch = epoch + step / steps_per_epoch
        self.last_lr = self.lr(self.last_epoch)
        for group in optimizer.param_groups:
            group["lr"] = self.last_lr * group.get("lr_mult", 1.0)  # a fine-tuned head's multiplier
        return self.last_lr

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - set(asdict(self))
        if unknown:
            raise ValueError(f"LRSchedule state has unknown keys {sorted(unknown)}; expected {sorted(asdict(self))}")
        for key, value in state.items():
            setattr(self, key, value)
