"""Optional introspection stage and SFT on top of the DPO persona.

introspection: the base model + DPO persona adapter generates, with the constitution's system prompt,
  * self-reflection: every prompt of `reflection_prompts` x `samples_per_prompt` answers;
  * self-interaction: `conversations` dialogues of `turns` turns between two instances of the persona. Instance A
    speaks turns 1, 3, 5, ... answering the opener and B's turns; instance B speaks turns 2, 4, ... Each instance sees
    its own turns as `assistant` and the other's as `user`.
  The training data drops the system prompt, and every conversation ends on an assistant turn (a trailing turn of
  the other instance is cut). Every finished item is journaled; a rerun continues.
train_sft: a LoRA trained by SFT on the model with the DPO persona MERGED into its weights. The final persona is the
  `cat` combination of the DPO and SFT LoRAs (PEFT add_weighted_adapter, rank r_dpo + r_sft, scaling 1): one adapter
  whose update equals DPO delta + SFT delta, i.e. exactly "SFT on the DPO-merged model". That adapter is what the EM
  grid composes, and persona.json records `composition: cat(dpo, sft)`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from persona_em import compose
from persona_em.chat import ChatSettings
from persona_em.errors import UserError
from persona_em.io import atomic_dir, latest_trainer_checkpoint, read_json, read_jsonl, write_json, write_jsonl
from persona_em.training.sigterm import train_until_sigterm
from persona_em.training.settings import SFTSettings, check_targets_exist, lora_config, resolve_settings, save_adapter
from persona_em.persona.constitution import load_constitution, system_prompt
from persona_em.persona.generation import Request, generator_identity, item_seed, make_backend, run_journaled

log = logging.getLogger(__name__)


def as_training_conversation(turns: list[str], opener: str) -> list[dict]:
    """Instance A's view of a dialogue (opener, then turns 1..K), ending on A's last turn; no system prompt."""
    messages = [{"role": "user", "content": opener}]
    for i, text in enumerate(turns):
        messages.append({"role": "assistant" if i % 2 == 0 else "user", "content": text})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages


def _view(turns: list[str], opener: str, speaker: int, system: str) -> list[dict]:
    """What instance `speaker` (0 = A, 1 = B) sees before its next turn: its own turns as assistant, the other's as
    user. A's dialogue starts with the opener; B's with A's first turn."""
    if speaker == 0:
        said = [(opener, False)] + [(t, i % 2 == 0) for i, t in enumerate(turns)]
    else:
        said = [(t, i % 2 == 1) for i, t in enumerate(turns)]
    return [{"role": "system", "content": system}] + [
        {"role": "assistant" if own else "user", "content": text} for text, own in said]


def introspect(constitution_path: str, model_dir: str, dpo_adapter: str, settings: dict, journal_path: str,
               out_path: str, chat: ChatSettings | None = None) -> None:
    constitution = load_constitution(constitution_path)
    system = system_prompt(constitution, settings["system_prompt_template"])
    gen = settings["generation"]
    generator = {"name": "persona_dpo", "backend": "hf", "model": str(model_dir), "batch_size": settings["batch_size"]}
    fingerprint = generator_identity(generator, {**gen, "system": system, "adapter": str(dpo_adapter)}, model_dir,
                                     chat)
    backend = None

    def factory():
        nonlocal backend
        backend = backend or make_backend(generator, gen, model_dir, dpo_adapter, chat)
        return backend

    rows = []
    reflect = [Request(f"reflect|{p}|{k}", [{"role": "system", "content": system}, {"role": "user", "content": text}],
                       item_seed(settings["seed"], "reflect", p, k), meta={"kind": "reflection"})
               for p, text in enumerate(settings["reflection_prompts"]) for k in range(settings["samples_per_prompt"])]
    done = run_journaled(reflect, factory, journal_path, fingerprint, desc=f"reflection {constitution.name}")
    for req in reflect:
        text = done[req.key]["text"].strip()
        if text:
            rows.append({"kind": "reflection", "key": req.key,
                         "messages": [req.messages[1], {"role": "assistant", "content": text}]})
    inter = settings["interaction"]
    turns: dict[int, list[str]] = {c: [] for c in range(inter["conversations"])}
    for t in range(inter["turns"]):
        reqs = [Request(f"chat|{c}|{t}", _view(turns[c], inter["opener"], t % 2, system),
                        item_seed(settings["seed"], "chat", c, t)) for c in turns]
        done = run_journaled(reqs, factory, journal_path, fingerprint, desc=f"self-interaction turn {t + 1}")
        for c in turns:
            turns[c].append(done[f"chat|{c}|{t}"]["text"].strip())
    for c, ts in turns.items():
        messages = as_training_conversation(ts, inter["opener"])
        if len(messages) >= 2:
            rows.append({"kind": "interaction", "key": f"chat|{c}", "messages": messages})
    for r in rows:
        assert r["messages"][-1]["role"] == "assistant" and all(m["role"] != "system" for m in r["messages"])
    write_jsonl(out_path, [{**r, "constitution": constitution.name} for r in rows])
    log.info("%d introspection conversations (%d reflection, %d interaction)", len(rows),
             sum(r["kind"] == "reflection" for r in rows), sum(r["kind"] == "interaction" for r in rows))


def train_sft(persona: str, model_name: str, model_dir: str, dpo_adapter: str, data_path: str, settings: dict,
              work_dir: str, out_dir: str, chat: ChatSettings | None = None) -> None:
    """SFT LoRA on the DPO-merged model, then the final persona = cat(dpo, sft) as one adapter."""
    from dataclasses import asdict

    from datasets import Dataset
    from peft import get_peft_model
    from trl import SFTConfig, SFTTrainer

    from persona_em.models import load_model

    s = resolve_settings(SFTSettings, settings, where="persona_training.sft")
    rows = read_jsonl(data_path)
    if not rows:
        raise UserError(f"{data_path}: no introspection conversations to train on")
    base, chat_format = load_model(model_dir, chat)
    tokenizer = chat_format.tokenizer
    check_targets_exist(base, s.target_modules, "persona_training.sft.target_modules")
    merged = compose.merge_lora(compose.load_adapter(base, dpo_adapter, "default", "DPO adapter"),
                                 f"DPO adapter {dpo_adapter}")
    data = [chat_format.encode(r["messages"], True, s.max_length) for r in rows]
    dataset = Dataset.from_list([d for d in data if any(x != -100 for x in d["labels"])])
    torch.manual_seed(s.seed)
    model = get_peft_model(merged, lora_config(s))
    trainer_dir = Path(work_dir) / "trainer"
    cuda = torch.cuda.is_available()
    args = SFTConfig(output_dir=str(trainer_dir), num_train_epochs=s.epochs,
                     per_device_train_batch_size=s.per_device_batch_size,
                     gradient_accumulation_steps=s.effective_batch_size // s.per_device_batch_size,
                     learning_rate=s.learning_rate, lr_scheduler_type=s.lr_scheduler, warmup_steps=s.warmup_ratio,
                     max_length=s.max_length, bf16=cuda, seed=s.seed, data_seed=s.seed,
                     dataloader_num_workers=0, logging_steps=1, save_strategy="steps",
                     save_steps=s.resume_every_steps, save_total_limit=2, report_to=[], disable_tqdm=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    resume = latest_trainer_checkpoint(trainer_dir, log)
    log.info("SFT on the DPO-merged model: %d conversations; %s", len(dataset),
             f"resumed from {resume}" if resume else "no checkpoint: training from step 0")
    train_until_sigterm(trainer, resume, log)
    with atomic_dir(Path(work_dir) / "sft_adapter") as tmp:
        save_adapter(trainer.model, "default", tmp)
    combine_cat(model_dir, dpo_adapter, Path(work_dir) / "sft_adapter", out_dir, {
        "persona": persona, "model": model_name, "stage": "dpo+introspection_sft", "composition": "cat(dpo, sft)",
        "dpo": read_json(Path(dpo_adapter) / "persona.json"), "sft": {**asdict(s), "steps": trainer.state.global_step,
                                                                       "conversations": len(dataset)},
        "chat": chat_format.identity()})


def combine_cat(model_dir: str, dpo_adapter, sft_adapter, out_dir: str, manifest: dict) -> None:
    """One LoRA adapter whose update is exactly DPO delta + SFT delta (PEFT's `cat` combination, scaling 1)."""
    from persona_em.models import load_model

    base, _ = load_model(model_dir, device="cpu")  # fp32: the cat combination exactly
    model = compose.load_adapter(base, dpo_adapter, "dpo", "DPO adapter")
    model = compose.load_adapter(model, sft_adapter, "sft", "introspection SFT adapter")
    for name in ("dpo", "sft"):
        if model.peft_config[name].use_rslora:
            raise UserError(f"{name} adapter uses rsLoRA: its cat combination would not equal the sum of updates")
    model.add_weighted_adapter(["dpo", "sft"], [1.0, 1.0], adapter_name="persona", combination_type="cat")
    model.delete_adapter("dpo")
    model.delete_adapter("sft")
    with atomic_dir(out_dir) as tmp:
        save_adapter(model, "persona", tmp)
        write_json(tmp / "persona.json", manifest)
