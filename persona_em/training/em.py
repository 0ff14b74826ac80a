"""EM LoRA fine-tuning of one cell: TRL SFTTrainer + PEFT, checkpoints at the schedule, resumable.

Layout:
  <work_dir>/trainer/checkpoint-N   full resume state (EM adapter, optimizer, scheduler, RNG); NOT a Snakemake
                                    output, so it survives a failed/killed job and the rerun resumes from it.
  <work_dir>/adapters/step-N        EM adapters at the scheduled steps, exported as they are reached.
  <work_dir>/trace/step-N.safetensors  EM adapter tensors every `checkpoints.trace_every` steps (training/trace.py)
  <work_dir>/train_log.jsonl        one line per logged optimizer step (journal; a resumed run appends).
  <out_dir>/step-NNNNNN/            the scheduled adapters (declared output, written at the end, atomically)
  <out_dir>/trace/                  the trace snapshots, when trace_every is set
  <out_dir>/checkpoints.json        cell keys, schedule, composition actually trained
  <log_out> (TSV)                   per-step training log with the cell keys
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from persona_em.training import batching, packed_attention
from persona_em import compose
from persona_em.chat import ChatFormat, ChatSettings
from persona_em.config import Cell
from persona_em.data.datasets import load_chat_jsonl
from persona_em.errors import UserError
from persona_em.io import Journal, atomic_dir, latest_trainer_checkpoint, write_json, write_table
from persona_em.models import load_model
from persona_em.training.schedule import expand_schedule, steps_per_epoch
from persona_em.training.sigterm import train_until_sigterm
from persona_em.training import trace
from persona_em.training.settings import TrainConfig, check_layers, lora_config, save_adapter

log = logging.getLogger(__name__)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def build_dataset(chat: ChatFormat, train_path, cfg: TrainConfig):
    """input_ids + labels per conversation (chat.encode: the loss covers each assistant turn's content and its
    end-of-turn token when `assistant_only_loss`, else every token)."""
    from datasets import Dataset

    rows = [chat.encode(msgs, cfg.assistant_only_loss, cfg.max_length) for msgs in load_chat_jsonl(train_path)]
    # Rows whose assistant tokens were all cut by max_length carry no loss: drop them here so the step count
    # (and with it the checkpoint schedule) is known before training starts.
    kept = [r for r in rows if any(l != -100 for l in r["labels"])]
    if len(kept) < len(rows):
        log.warning("dropped %d of %d rows with no trainable token within max_length %d",
                    len(rows) - len(kept), len(rows), cfg.max_length)
    return Dataset.from_list(kept)


_lora_config = lora_config  # the name tests/test_train_config.py imports


def _save_em(model, out: Path) -> None:
    """Save only the EM adapter, atomically, as a plain adapter directory (adapter_config.json at its top)."""
    with atomic_dir(out) as tmp:
        save_adapter(model, compose.EM, tmp)


def _export_step(checkpoint: Path, adapters_dir: Path, step: int) -> None:
    """Copy a scheduled step's EM adapter out of its trainer checkpoint (which the rotation deletes later)."""
    with atomic_dir(adapters_dir / step_dir_name(step)) as tmp:
        shutil.copytree(checkpoint / compose.EM, tmp, dirs_exist_ok=True)


def _trainer_class():
    from transformers import TrainerCallback
    from trl import SFTTrainer

    class EMTrainer(SFTTrainer):
        """SFTTrainer that saves/restores only the EM adapter and never lets a resume change the composition.

        (transformers' own PEFT resume calls `model.set_adapter(first_active)`, which would switch a stacked
        persona OFF: exactly the bug this project exists to rule out.)
        """

        composition: str = "none"
        persona: str = "none"
        batch_plan: batching.BatchPlan | None = None
        fused_pointwise: bool = True  # packed path: compiled RMSNorm and SiLU * up (fused_ops.py; BENCHMARKS.md)

        def training_step(self, model, inputs, num_items_in_batch=None):
            # Packed plan: the dataloader batch is the whole effective batch in one padding-free row; run it as
            # micro-batches cut at sequence boundaries. Each one's loss is divided by the step's total token count
            # (`num_items_in_batch`), so the summed gradient is the per-token mean over the effective batch.
            plan = self.batch_plan
            if plan is None or not plan.packed:
                return super().training_step(model, inputs, num_items_in_batch)
            if not getattr(self, "_packed_ready", False):
                self._prepare_packed(model)
            total = None
            for chunk, bounds in batching.packed_micro_batches(inputs, plan.micro_batch_tokens):
                with packed_attention.packed_sequences(bounds):
                    loss = super().training_step(model, chunk, num_items_in_batch)
                total = loss if total is None else total + loss
            return total

        def _prepare_packed(self, model):
            from peft.tuners.tuners_utils import BaseTunerLayer

            packed_attention.use_packed_attention(self.model)
            if self.fused_pointwise:
                from persona_em.training.fused_ops import use_fused_pointwise

                use_fused_pointwise(self.model)
            if self.args.bf16:
                # Under bf16 autocast PEFT's cast of each LoRA input to the fp32 adapter dtype is pure waste: the
                # LoRA matmul casts it back to bf16 (same values), but the fp32 copy is kept for backward
                # (~4 MB/token on a 7B model) and costs a copy kernel per projection.
                for module in self.model.modules():
                    if isinstance(module, BaseTunerLayer):
                        module.cast_input_dtype_enabled = False
            self._packed_ready = True

        def _save(self, output_dir=None, state_dict=None):
            _save_em(self.model, Path(output_dir) / compose.EM)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            weights = Path(resume_from_checkpoint) / compose.EM / "adapter_model.safetensors"
            state = load_file(str(weights), device=str(next(self.model.parameters()).device))
            set_peft_model_state_dict(self.model, state, adapter_name=compose.EM)
            compose.check_loaded(self.model, compose.EM, state, f"checkpoint {weights}")
            compose.reactivate(self.model, self.composition, self.persona)

    class ScheduleCallback(TrainerCallback):
        def __init__(self, schedule, adapters_dir: Path, journal: Journal, cell: Cell, slow_down: float,
                     trace_every: int | None = None, trace_dir: Path | None = None):
            self.schedule, self.adapters_dir, self.journal = set(schedule), adapters_dir, journal
            self.cell, self.slow_down = cell, slow_down
            self.trace_every, self.trace_dir = trace_every, trace_dir
            # TRL's `num_tokens` is a running total that starts at 0 in every process (it is not part of a
            # checkpoint), so after a resume the first step's tokens are counted from 0 too.
            self.last_tokens = 0.0

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in self.schedule:
                control.should_save = True
            if self.trace_every and state.global_step % self.trace_every == 0:
                trace.save_snapshot(kw["model"], compose.EM, self.trace_dir / f"{step_dir_name(state.global_step)}"
                                                                              ".safetensors")
            if self.slow_down:
                time.sleep(self.slow_down)

        def on_save(self, args, state, control, model=None, **kw):
            if state.global_step in self.schedule:
                _export_step(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.adapters_dir,
                             state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            tokens = logs.get("num_tokens")
            row = {**self.cell.keys(), "key": str(state.global_step), "step": state.global_step,
                   "epoch": round(state.epoch or 0.0, 6), "loss": logs["loss"],
                   "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                   "tokens": None if tokens is None else tokens - self.last_tokens}
            if tokens is not None:
                self.last_tokens = tokens
            self.journal.append(row)

    return EMTrainer, ScheduleCallback


def choose_batch_plan(cfg: TrainConfig, model, dataset) -> batching.BatchPlan:
    """Micro-batching for this run: from the config, and for `auto` values from the GPU's memory."""
    cuda = torch.cuda.is_available()
    return batching.choose_plan(
        effective_batch_size=cfg.effective_batch_size,
        per_device_batch_size=cfg.per_device_batch_size,
        gradient_checkpointing=cfg.gradient_checkpointing,
        micro_batch_tokens=cfg.micro_batch_tokens,
        cuda=cuda,
        total_memory_bytes=torch.cuda.get_device_properties(0).total_memory if cuda else None,
        dims=batching.ModelDims.of(model) if cuda else None,
        longest_example_tokens=max((len(r) for r in dataset["input_ids"]), default=0),
    )


def sft_args(cfg: TrainConfig, plan: batching.BatchPlan, output_dir, seed: int):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=plan.per_device_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        padding_free=plan.packed,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        optim=cfg.optimizer,
        # build_dataset already truncated every row to max_length; TRL refuses a max_length it cannot enforce
        # padding-free, so it gets none then.
        max_length=None if plan.packed else cfg.max_length,
        gradient_checkpointing=plan.gradient_checkpointing,
        bf16=torch.cuda.is_available(),
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.resume_every_steps,
        save_total_limit=2,
        save_only_model=False,
        report_to=[],
        disable_tqdm=False,
    )


def train_em(
    cell: Cell,
    model_dir: str,
    persona_dir: str | None,
    train_path: str,
    settings: dict,
    checkpoint_spec: dict,
    work_dir: str,
    out_dir: str,
    log_out: str,
    chat: ChatSettings | None = None,
) -> None:
    # Packed micro-batches vary in size from step to step; with fixed-size segments the caching allocator
    # fragments (measured: 71 GB reserved for 51 GB in use on an H100, and slow steps). Must precede CUDA use.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cfg = TrainConfig(**settings)
    cfg.check_installed(where=f"training settings of cell {cell.path}")
    work = Path(work_dir)
    trainer_dir, adapters_dir = work / "trainer", work / "adapters"
    model, chat_format = load_model(model_dir, chat)
    check_layers(cfg.layers_to_transform, model.config.num_hidden_layers, f"training settings of cell {cell.path}")
    tokenizer = chat_format.tokenizer
    dataset = build_dataset(chat_format, train_path, cfg)
    per_epoch = steps_per_epoch(len(dataset), cfg.effective_batch_size)
    schedule = expand_schedule(checkpoint_spec, per_epoch, cfg.epochs, where=f"checkpoints of cell {cell.path}")
    last_step = per_epoch * cfg.epochs
    log.info("cell %s: %d training rows, %d steps/epoch x %d epochs, checkpoints at %s",
             cell.path, len(dataset), per_epoch, cfg.epochs, schedule)

    # The seed fixes the EM adapter's initialisation (compose seeds right before creating it) and the data order
    # (sft_args: seed, data_seed).
    model = compose.compose_for_training(model, cell.persona, persona_dir, cell.composition, lora_config(cfg),
                                         seed=cell.seed)
    state = compose.describe(model)
    n_params, bytes_per = trace.adapter_params(model, compose.EM)
    trace.check_trace_size(checkpoint_spec, n_params, bytes_per, last_step, f"checkpoints of cell {cell.path}")
    log.info("training with active adapters %s, merged persona %s", state["active_adapters"], state["merged_persona"])

    if not (adapters_dir / step_dir_name(0)).exists():
        _save_em(model, adapters_dir / step_dir_name(0))  # step 0: fresh EM adapter (B = 0) = the composed persona

    plan = choose_batch_plan(cfg, model, dataset)
    log.info("batch plan: %s", plan)
    args = sft_args(cfg, plan, trainer_dir, cell.seed)
    journal = Journal(work / "train_log.jsonl", key_field="key")
    EMTrainer, ScheduleCallback = _trainer_class()
    EMTrainer.composition, EMTrainer.persona, EMTrainer.batch_plan = cell.composition, cell.persona, plan
    callback = ScheduleCallback(schedule, adapters_dir, journal, cell, cfg.slow_down_seconds,
                                trace.trace_every(checkpoint_spec), work / "trace")
    trainer = EMTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                        callbacks=[callback])
    resume = latest_trainer_checkpoint(trainer_dir, log)
    if resume is not None:
        log.info("resumed from step %s (%s)", resume.name.split("-")[1], resume)
        step = int(resume.name.split("-")[1])
        if step in schedule and not (adapters_dir / step_dir_name(step)).exists():
            # killed after the trainer saved this scheduled step but before on_save exported it
            log.info("exported scheduled step %d from its checkpoint (the earlier run was killed first)", step)
            _export_step(resume, adapters_dir, step)
    else:
        log.info("no checkpoint in %s: training from step 0", trainer_dir)
    train_until_sigterm(trainer, resume, log)
    if trainer.state.global_step != last_step:
        raise RuntimeError(f"trained {trainer.state.global_step} steps, expected {last_step}")
    compose.check_composition(trainer.model, cell.composition, cell.persona, training=True)
    journal.close()

    missing = [s for s in schedule if not (adapters_dir / step_dir_name(s)).exists()]
    if missing:
        raise RuntimeError(f"scheduled checkpoints {missing} were not saved")
    traced = []
    if trace.trace_every(checkpoint_spec):
        traced = [work / "trace" / f"{step_dir_name(s)}.safetensors"
                  for s in trace.trace_steps(last_step, trace.trace_every(checkpoint_spec))]
        missing = [p.name for p in traced if not p.exists()]
        if missing:
            raise RuntimeError(f"trace snapshots {missing[:3]} were not saved")
    _write_outputs(cell, schedule, adapters_dir, journal, state, cfg, out_dir, log_out, last_step,
                   chat_format.identity(), traced)


def _write_outputs(cell, schedule, adapters_dir, journal, state, cfg, out_dir, log_out, last_step, chat, traced=()):
    import pandas as pd

    rows = sorted(journal.load().values(), key=lambda r: r["step"])
    frame = pd.DataFrame([{k: v for k, v in r.items() if k != "key"} for r in rows])
    with atomic_dir(out_dir) as tmp:
        for s in schedule:
            shutil.copytree(adapters_dir / step_dir_name(s), tmp / step_dir_name(s))
        for f in traced:
            (tmp / trace.TRACE_DIR).mkdir(exist_ok=True)
            shutil.copy2(f, tmp / trace.TRACE_DIR / f.name)
        write_json(tmp / "checkpoints.json", {
            **cell.keys(), "steps": schedule, "last_step": last_step,
            "active_adapters_in_training": state["active_adapters"], "merged_persona": state["merged_persona"],
            "training": cfg.to_dict(), "chat": chat,
        })
    write_table(log_out, frame)


def read_checkpoints(out_dir: str | Path) -> tuple[dict, list[tuple[int, Path]]]:
    """The manifest of a trained cell and its (step, adapter dir) pairs, in step order."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "checkpoints.json"
    if not manifest_path.exists():
        raise UserError(f"{out_dir}: not a finished training output (checkpoints.json missing)")
    manifest = json.loads(manifest_path.read_text())
    return manifest, [(s, out_dir / step_dir_name(s)) for s in manifest["steps"]]
