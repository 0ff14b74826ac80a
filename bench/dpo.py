"""DPO throughput: plain TRL DPOTrainer + LoRA (reference = adapters disabled), naive per-device 1 vs larger
micro-batches without checkpointing, at the same effective batch."""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import torch

from bench.common import free_memory, measured, words
from bench.train import _step_timer


def _run(model, tok, dataset, setting: dict, steps: int, workdir: Path) -> tuple[dict, object]:
    from trl import DPOConfig, DPOTrainer

    from peft import get_peft_model

    from persona_em.training.settings import TrainConfig
    from persona_em.training.em import _lora_config

    torch.manual_seed(0)
    # plain PEFT model with the "default" adapter name, which DPOTrainer expects
    peft = get_peft_model(model, _lora_config(TrainConfig()))
    setting = dict(setting)
    no_cast = setting.pop("no_lora_input_cast", False)
    if no_cast and torch.cuda.is_available():  # as train_em does under bf16 autocast (see packed_attention/train_em)
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in peft.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    args = DPOConfig(output_dir=str(workdir), max_steps=steps, learning_rate=1e-5, bf16=torch.cuda.is_available(),
                     logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                     dataloader_num_workers=0, **setting)
    timer = _step_timer()
    result = {"setting": {**setting, "no_lora_input_cast": no_cast}}
    trainer = None
    try:
        trainer = DPOTrainer(model=peft, ref_model=None, args=args, train_dataset=dataset, processing_class=tok,
                             callbacks=[timer])
        with measured(result):
            trainer.train()
    except torch.OutOfMemoryError as e:
        result["error"] = f"out of memory: {str(e)[:160]}"
    except Exception as e:  # noqa: BLE001
        result["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        base = peft.unload()
        if setting.get("gradient_checkpointing"):
            base.gradient_checkpointing_disable()
        del trainer, peft
        free_memory()
    if "error" in result:
        return result, base
    secs = [b - a for a, b in zip(timer.ends[:-1], timer.ends[1:])]
    timed = secs[1:] or secs
    per_step = setting["per_device_train_batch_size"] * setting["gradient_accumulation_steps"]
    result.update(step_seconds=[round(s, 3) for s in secs], seconds_per_step=round(sum(timed) / len(timed), 3),
                  pairs_per_s=round(per_step * len(timed) / sum(timed), 2))
    return result, base


def run(model, tok, cfg: dict, log) -> dict:
    from datasets import Dataset

    rng = random.Random(0)
    rows = [{"prompt": words(rng, cfg["prompt_tokens"]), "chosen": words(rng, cfg["response_tokens"]),
             "rejected": words(rng, cfg["response_tokens"])} for _ in range(cfg["n_pairs"])]
    dataset = Dataset.from_list(rows)
    work = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    out = {"prompt_tokens": cfg["prompt_tokens"], "response_tokens": cfg["response_tokens"]}
    variants = [("naive", cfg["naive"])] + [(f"ours {i}", s) for i, s in enumerate(cfg["ours"])]
    for name, setting in variants:
        res, model = _run(model, tok, dataset, setting, cfg["steps"], work / name.replace(" ", "_"))
        out[name] = res
        log(f"dpo {name}: {json.dumps(res)}")
    naive = out["naive"].get("pairs_per_s")
    best = max((out[n].get("pairs_per_s", 0) for n, _ in variants[1:]), default=0)
    if naive:
        out["speedup"] = round(best / naive, 2)
    return out, model
