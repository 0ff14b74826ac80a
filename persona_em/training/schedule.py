"""Checkpoint schedules: which optimizer steps of an EM training run are saved and evaluated.

Forms (config key `checkpoints`):
  {every: N}                       every N steps, plus step 0 and the final step
  {steps: [0, 100, 200, final]}    an explicit list; 0 is the model before EM training, `final` the last step
  {first_epoch_points: K}          K evenly spaced points in epoch 1, then each epoch end (the CS2881 schedule)
"""
from __future__ import annotations

import math

from persona_em.errors import UserError


def steps_per_epoch(n_examples: int, effective_batch_size: int) -> int:
    """Optimizer steps in one epoch: the last partial batch still makes a step (HF Trainer's behaviour)."""
    return math.ceil(n_examples / effective_batch_size)


def expand_schedule(spec: dict, steps_per_epoch: int, epochs: int, where: str = "checkpoints") -> list[int]:
    """Sorted unique optimizer steps to save. Raises UserError for a step beyond the run's last step."""
    last = steps_per_epoch * epochs
    if last < 1:
        raise UserError(f"{where}: the training run has no optimizer step (empty dataset?)")
    if "every" in spec:
        every = int(spec["every"])
        if every < 1:
            raise UserError(f"{where}.every: must be >= 1, got {every}")
        steps = set(range(0, last + 1, every)) | {0, last}
    elif "steps" in spec:
        steps = set()
        for s in spec["steps"]:
            if s == "final":
                steps.add(last)
                continue
            s = int(s)
            if s < 0 or s > last:
                raise UserError(
                    f"{where}.steps: step {s} is beyond the run's last step {last} "
                    f"({steps_per_epoch} steps/epoch x {epochs} epochs)"
                )
            steps.add(s)
    elif "first_epoch_points" in spec:
        k = int(spec["first_epoch_points"])
        if k < 1 or k > steps_per_epoch:
            raise UserError(f"{where}.first_epoch_points: must be in [1, {steps_per_epoch}], got {k}")
        steps = {round(steps_per_epoch * i / k) for i in range(1, k + 1)}
        steps |= {steps_per_epoch * e for e in range(1, epochs + 1)}
        if spec.get("include_step0", True):
            steps.add(0)
    else:
        raise UserError(f"{where}: expected one of 'every', 'steps', 'first_epoch_points'")
    return sorted(steps)
