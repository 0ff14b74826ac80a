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
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..chat import ChatFormat, ChatSettings
from ..errors import UserError
from ..io import atomic_dir, latest_trainer_checkpoint, read_jsonl, write_json
from ..sigterm import train_until_sigterm
from ..train_config import ALL_PROJECTIONS

log = logging.getLogger(__name__)


@dataclass
class DPOSettings:
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    beta: float = 0.1
    learning_rate: float = 5e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    effective_batch_size: int = 32
    per_device_batch_size: int = 4
    max_length: int = 1024
    epochs: int | str = "auto"
    # (upper bound on the pair count, epochs), first match wins; null = no bound.
    epochs_by_pairs: list = field(default_factory=lambda: [[100, 5], [300, 3], [None, 1]])
    nll_weight: float = 0.0
    gradient_checkpointing: bool = False
    resume_every_steps: int = 50
    seed: int = 0

    def resolve_epochs(self, n_pairs: int) -> int:
        if self.epochs != "auto":
            return int(self.epochs)
        for bound, epochs in self.epochs_by_pairs:
            if bound is None or n_pairs < bound:
                return int(epochs)
        raise UserError(f"persona_training.dpo.epochs_by_pairs {self.epochs_by_pairs}: no entry covers {n_pairs} pairs "
                        "(end the list with [null, epochs])")


def settings_from(d: dict, where: str) -> DPOSettings:
    known = set(DPOSettings.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown} (known: {sorted(known)})")
    s = DPOSettings(**d)
    if s.effective_batch_size % s.per_device_batch_size:
        raise UserError(f"{where}: effective_batch_size {s.effective_batch_size} is not a multiple of "
                        f"per_device_batch_size {s.per_device_batch_size}")
    return s


def lora_config(s: DPOSettings):
    from peft import LoraConfig

    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=list(s.target_modules), bias="none", task_type="CAUSAL_LM")


def check_targets_exist(model, targets, what: str) -> None:
    """LoRA target modules that the base lacks would silently train nothing there."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(targets) - names)
    if missing:
        raise UserError(f"{what}: target modules {missing} do not exist in the base model "
                        f"(its projections: {sorted(n for n in names if n.endswith('proj'))})")


def save_adapter(model, out: Path) -> None:
    """The trained LoRA as a plain adapter directory (adapter_config.json at its top)."""
    model.save_pretrained(str(out))
    for sub in [p for p in out.iterdir() if p.is_dir()]:  # a non-"default" adapter lands in a subfolder
        for f in sub.iterdir():
            shutil.move(str(f), out / f.name)
        sub.rmdir()


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

    from ..models import load_model

    s = settings_from(settings, "persona_training.dpo")
    rows = read_jsonl(pairs_path)
    if not rows:
        raise UserError(f"{pairs_path}: no DPO pairs to train on (see the stats file beside it for the drops)")
    epochs = s.resolve_epochs(len(rows))
    chat_format = ChatFormat.load(model_dir, chat)
    tokenizer = chat_format.tokenizer
    dataset = tokenize_pairs(chat_format, rows)
    cuda = torch.cuda.is_available()
    model, _ = load_model(model_dir, chat)
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
        save_adapter(trainer.model, tmp)
        write_json(tmp / "persona.json", {
            "persona": persona, "model": model_name, "stage": "dpo", "pairs": len(rows), "epochs": epochs,
            "steps": trainer.state.global_step, "dpo": asdict(s), "composition": "single_adapter",
            "chat": chat_format.identity(),
        })
    log.info("persona adapter written to %s (%d optimizer steps)", out_dir, trainer.state.global_step)
