"""train_dpo: the persona LoRA, by TRL DPOTrainer on the DPO pairs.

Pairs are tokenized by persona_em.chat (prompt_ids = the generation prompt, chosen/rejected_ids = each answer's
content + its end-of-turn token), as every other stage renders prompts; TRL's own tokenization of conversational
pairs (the full rendering minus the prompt's) would also train the newline after the end-of-turn token and render
without the model's chat settings. The policy is the base model with a fresh LoRA (TRL's `peft_config` path); the reference is the same model with
adapters disabled, so no second copy of the base sits in memory. An optional NLL term on the chosen answers is TRL's
"sft" loss added with weight `nll_weight`. Epochs follow the pair count (`epochs: auto` -> `epochs_by_pairs`).

Layout (like train_em):
  <work_dir>/trainer/checkpoint-N   full resume state; NOT a Snakemake output, so it survives a failed job
  <out_dir>/adapter_model.safetensors + adapter_config.json   the persona adapter (written atomically at the end)
  <out_dir>/persona.json            what was trained: constitution, base model, pairs, settings, composition
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from persona_em.chat import ChatFormat, ChatSettings
from persona_em.errors import UserError
from persona_em.io import atomic_dir, latest_trainer_checkpoint, read_jsonl, write_json
from persona_em.training.sigterm import train_until_sigterm
from persona_em.training.settings import DPOSettings, check_targets_exist, lora_config, resolve_settings, save_adapter

log = logging.getLogger(__name__)


def settings_from(d: dict, where: str) -> DPOSettings:
    return resolve_settings(DPOSettings, d, where=where)


def _checkpointing(config_cls, enabled: bool) -> dict:
    """transformers >= 5.2x names it activation_checkpointing (gradient_checkpointing deprecated); older 5.x
    (e.g. the GPU image's 5.17) only knows gradient_checkpointing."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def _trainer_class():
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on rows already tokenized (prompt_ids, chosen_ids, rejected_ids); TRL's own step, which would
        tokenize again, only drops rows whose prompt alone fills max_length (as TRL does)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if args.max_length is not None and args.truncation_mode == "keep_start":
                dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)
            return dataset

    return PreTokenizedDPOTrainer


def tokenize_pairs(chat: ChatFormat, rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([chat.preference_ids(r["prompt"], _answer(r, "chosen"), _answer(r, "rejected"))
                              for r in rows])


def _answer(row: dict, key: str) -> str:
    turns = row[key]
    if len(turns) != 1 or turns[0].get("role") != "assistant":
        raise UserError(f"DPO pair {row.get('prompt_id')!r}: {key} must be one assistant message")
    return turns[0]["content"]


def train_dpo(persona: str, model_name: str, model_dir: str, pairs_path: str, settings: dict, work_dir: str,
              out_dir: str, chat: ChatSettings | None = None) -> None:
    from trl import DPOConfig

    from persona_em.models import load_model

    s = settings_from(settings, "persona_training.dpo")
    rows = read_jsonl(pairs_path)
    if not rows:
        raise UserError(f"{pairs_path}: no DPO pairs to train on (see the stats file beside it for the drops)")
    epochs = s.resolve_epochs(len(rows))
    model, chat_format = load_model(model_dir, chat)
    tokenizer = chat_format.tokenizer
    dataset = tokenize_pairs(chat_format, rows)
    cuda = torch.cuda.is_available()
    check_targets_exist(model, s.target_modules, "persona_training.dpo.target_modules")
    loss_type, loss_weights = ["sigmoid"], None
    if s.nll_weight:
        loss_type, loss_weights = ["sigmoid", "sft"], [1.0, s.nll_weight]
    trainer_dir = Path(work_dir) / "trainer"
    args = DPOConfig(
        output_dir=str(trainer_dir), num_train_epochs=epochs, per_device_train_batch_size=s.per_device_batch_size,
        gradient_accumulation_steps=s.effective_batch_size // s.per_device_batch_size,
        learning_rate=s.learning_rate, lr_scheduler_type=s.lr_scheduler, warmup_steps=s.warmup_ratio,  # a float < 1 is a ratio of all steps (transformers 5)
        beta=s.beta, max_length=s.max_length, loss_type=loss_type, loss_weights=loss_weights,
        **_checkpointing(DPOConfig, s.gradient_checkpointing), bf16=cuda, seed=s.seed, data_seed=s.seed,
        dataloader_num_workers=0, logging_steps=1, save_strategy="steps", save_steps=s.resume_every_steps,
        save_total_limit=2, report_to=[], disable_tqdm=False,
    )
    torch.manual_seed(s.seed)
    trainer = _trainer_class()(model=model, ref_model=None, args=args, train_dataset=dataset,
                               processing_class=tokenizer, peft_config=lora_config(s))
    if trainer.ref_model is not None:  # the reference must be this model with adapters off, not a second copy
        raise RuntimeError("DPOTrainer built a separate reference model")
    resume = latest_trainer_checkpoint(trainer_dir, log)
    log.info("%s on %s: %d pairs, %d epochs; %s", persona, model_name, len(rows), epochs,
             f"resumed from {resume}" if resume else "no checkpoint: training from step 0")
    train_until_sigterm(trainer, resume, log)
    with atomic_dir(out_dir) as tmp:
        save_adapter(trainer.model, "default", tmp)  # TRL's peft_config path names the LoRA "default"
        write_json(tmp / "persona.json", {
            "persona": persona, "model": model_name, "stage": "dpo", "pairs": len(rows), "epochs": epochs,
            "steps": trainer.state.global_step, "dpo": asdict(s), "composition": "single_adapter",
            "chat": chat_format.identity(),
        })
    log.info("persona adapter written to %s (%d optimizer steps)", out_dir, trainer.state.global_step)
