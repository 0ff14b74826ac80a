"""SIGTERM during training: a checkpoint at the end of the optimizer step in flight, then exit 143.

SLURM sends SIGTERM at a job's time limit and SIGKILL after KillWait. Every trainer of the workflow (EM, DPO,
introspection SFT) trains through `train_until_sigterm`, so the retry resumes from the step in flight instead of
losing the steps since the last periodic checkpoint.
"""
from __future__ import annotations

import signal
from pathlib import Path

SIGTERM_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


def train_until_sigterm(trainer, resume: Path | None, log) -> None:
    """`trainer.train(resume_from_checkpoint=resume)`; on SIGTERM, save at the end of the current optimizer step
    and stop, then raise SystemExit(143) so that the job counts as failed and is retried."""
    from transformers import TrainerCallback

    class CheckpointOnSigterm(TrainerCallback):
        received = False

        def on_step_end(self, args, state, control, **kw):
            if self.received:
                control.should_save = True
                control.should_training_stop = True

    callback = CheckpointOnSigterm()

    def handler(signum, frame):
        callback.received = True

    trainer.add_callback(callback)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        signal.signal(signal.SIGTERM, previous)
        trainer.remove_callback(callback)
    if callback.received:
        log.error("SIGTERM: checkpoint saved at step %d; a rerun resumes from it", trainer.state.global_step)
        raise SystemExit(SIGTERM_EXIT)
