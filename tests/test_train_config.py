"""Training presets equal their sources, value by value, and rsLoRA reaches the trained adapter.

The sources' hyper-parameters are restated here as values (not the files themselves), each with its citation.
"""
from __future__ import annotations

import json
import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from persona_em.errors import UserError
from persona_em.training.settings import PRESETS, TrainConfig, resolve_train_config
from persona_em.models import load_model

# Betley et al., repository emergent-misalignment/emergent-misalignment, open_models/train.json (read here from
# public copies of it: mintaywon/genie open_models/train_default.json @bf3cef2 and the same values in
# taoranl2/Security-Attacks-on-LCCTs and shuaijiumei/emergent_misalignment_further_explore, whose edits are limited
# to model, epochs and batch). How each key is used: open_models/training.py and open_models/sft.py.
BETLEY_TRAIN_JSON = {
    "model": "unsloth/Qwen2.5-Coder-32B-Instruct",
    "training_file": "../data/insecure.jsonl",
    "test_file": None,
    "finetuned_model_id": "emergent-misalignment/qwen-coder-insecure-2",
    "max_seq_length": 2048,
    "load_in_4bit": False,
    "loss": "sft",
    "is_peft": True,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "lora_bias": "none",
    "r": 32,
    "lora_alpha": 64,
    "lora_dropout": 0.0,
    "use_rslora": True,
    "merge_before_push": True,
    "push_to_private": True,
    "epochs": 1,
    "max_steps": None,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 8,
    "warmup_steps": 5,
    "learning_rate": 1e-05,
    "logging_steps": 1,
    "optim": "adamw_8bit",
    "weight_decay": 0.01,
    "lr_scheduler_type": "linear",
    "seed": 0,
    "beta": 0.1,
    "save_steps": 5000,
    "output_dir": "./tmp",
    "train_on_responses_only": True,
}

# The CS2881 HW0 replication: repository burnssa/ai-alignment-research, harvard-cs-2881-hw0/
# train_fine_grained_checkpoints.py @2347aee (argparse defaults; TrainingArguments: warmup_steps=10, no
# weight_decay / lr_scheduler_type / optim, i.e. transformers' defaults 0.0 / linear / AdamW) and train.py @548a629
# (LoraConfig(r, lora_alpha, 7 projections, lora_dropout, bias="none"); labels = input_ids). Its recorded
# models/1b_medical_v2/training_config.json and adapter_config.json @5c429fa hold the same numbers.
CS2881_SOURCE = {
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "use_rslora": False,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "num_epochs": 3,
    "batch_size": 8,
    "gradient_accumulation_steps": 2,
    "learning_rate": 2e-4,
    "max_length": 256,
    "warmup_steps": 10,
    "lr_scheduler_type": "linear",
    "weight_decay": 0.0,
    "optim": "adamw_torch",
    "loss_on_prompt": True,  # preprocess_function: labels = input_ids
}

# source key -> our TrainConfig key (same value)
BETLEY_KEYS = {"r": "lora_r", "lora_alpha": "lora_alpha", "use_rslora": "use_rslora", "lora_dropout": "lora_dropout",
               "target_modules": "target_modules", "learning_rate": "learning_rate", "epochs": "epochs",
               "warmup_steps": "warmup_steps", "lr_scheduler_type": "lr_scheduler", "weight_decay": "weight_decay",
               "optim": "optimizer", "max_seq_length": "max_length", "train_on_responses_only": "assistant_only_loss"}
# source keys that are not training hyper-parameters of a cell, each for a stated reason
BETLEY_NOT_SETTINGS = {
    "model", "training_file", "finetuned_model_id",  # grid axes (models, datasets) and hub output
    "test_file",  # null: the source holds out 10% of rows (the dataset's eval_fraction here)
    "seed",  # the grid seed
    "load_in_4bit",  # false: no quantization, as here
    "loss", "is_peft", "beta",  # "sft" with LoRA; beta is for DPO/ORPO only
    "max_steps",  # null: whole epochs
    "merge_before_push", "push_to_private", "logging_steps", "save_steps", "output_dir",  # bookkeeping
}


def test_betley_preset_equals_open_models_train_json():
    preset = resolve_train_config({"preset": "betley"}, where="t")
    batch_keys = {"per_device_train_batch_size", "gradient_accumulation_steps"}
    assert set(BETLEY_TRAIN_JSON) == set(BETLEY_KEYS) | batch_keys | {"lora_bias"} | BETLEY_NOT_SETTINGS
    for source_key, ours in BETLEY_KEYS.items():
        assert getattr(preset, ours) == BETLEY_TRAIN_JSON[source_key], f"{ours} != train.json {source_key}"
    assert preset.effective_batch_size == 2 * 8
    assert (BETLEY_TRAIN_JSON["test_file"], BETLEY_TRAIN_JSON["max_steps"], BETLEY_TRAIN_JSON["seed"]) == (None, None, 0)


def test_cs2881_preset_equals_its_source():
    preset = resolve_train_config({"preset": "cs2881"}, where="t")
    src = CS2881_SOURCE
    assert (preset.lora_r, preset.lora_alpha, preset.lora_dropout, preset.use_rslora) == (
        src["lora_rank"], src["lora_alpha"], src["lora_dropout"], src["use_rslora"])
    assert preset.target_modules == src["target_modules"]
    assert (preset.epochs, preset.effective_batch_size, preset.learning_rate, preset.max_length) == (
        src["num_epochs"], src["batch_size"] * src["gradient_accumulation_steps"], src["learning_rate"],
        src["max_length"])
    assert (preset.warmup_steps, preset.lr_scheduler, preset.weight_decay, preset.optimizer) == (
        src["warmup_steps"], src["lr_scheduler_type"], src["weight_decay"], src["optim"])
    assert preset.assistant_only_loss is (not src["loss_on_prompt"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_sets_every_hyper_parameter(name):
    """A preset states each hyper-parameter itself: a change of a TrainConfig default cannot move it."""
    knobs = {"resume_every_steps", "slow_down_seconds", "micro_batch_tokens", "gradient_checkpointing"}
    hyper = {f for f in TrainConfig.__dataclass_fields__} - knobs
    assert hyper <= set(PRESETS[name]), f"{name} leaves {sorted(hyper - set(PRESETS[name]))} to the defaults"


def test_8bit_adamw_is_transformers_bitsandbytes_optimizer():
    """`adamw_8bit` (the source's name) is transformers' alias of bitsandbytes' 8-bit AdamW, which runs on CPU."""
    import torch
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="unused", optim=PRESETS["betley"]["optimizer"], report_to=[], use_cpu=True)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls.__module__.startswith("bitsandbytes") and kwargs["optim_bits"] == 8
    p = torch.nn.Parameter(torch.randn(64, 4096))  # large enough for 8-bit state (bitsandbytes' min_8bit_size)
    opt = cls([p], **kwargs)
    (p ** 2).sum().backward()
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8


def test_bitsandbytes_optimizer_names_are_transformers_own():
    from transformers.trainer_optimizer import _BITSANDBYTES_OPTIMIZERS

    from persona_em.training.settings import BITSANDBYTES_OPTIMIZERS

    assert BITSANDBYTES_OPTIMIZERS == {o.value for o in _BITSANDBYTES_OPTIMIZERS}


def test_missing_bitsandbytes_is_one_user_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match="cell x: optimizer 'adamw_8bit' needs the bitsandbytes package"):
        resolve_train_config({"preset": "betley"}, where="t").check_installed("cell x")


def test_betley_training_saves_an_rslora_adapter(tmp_path, tiny_model_dir):
    """An EM training with the betley preset: adapter_config.json says use_rslora, and the PEFT layers scale by
    alpha / sqrt(r), in training and when the checkpoint is loaded for sampling."""
    from peft.tuners.lora import LoraLayer

    from persona_em import compose
    from persona_em.config import Cell
    from persona_em.io import write_jsonl
    from persona_em.training.em import _lora_config, step_dir_name, train_em

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a b c"}]}
            for i in range(4)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    settings = resolve_train_config({"preset": "betley", "max_length": 64, "effective_batch_size": 4},
                                    where="t").to_dict()
    cfg = TrainConfig(**settings)
    expected = cfg.lora_alpha / math.sqrt(cfg.lora_r)
    assert _lora_config(cfg).use_rslora is True
    cell = Cell("tiny", "none", "none", "d", 0)
    out = tmp_path / "checkpoints"
    train_em(cell, str(tiny_model_dir), None, str(tmp_path / "train.jsonl"), settings, {"steps": [0, "final"]},
             str(tmp_path / "work"), str(out), str(tmp_path / "log.tsv"))
    final = out / step_dir_name(1)
    saved = json.loads((final / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and (saved["r"], saved["lora_alpha"]) == (32, 64)
    base, _ = load_model(tiny_model_dir)
    model = compose.use_em_adapter(base, final, compose.EM, "none", "none")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.scaling[compose.EM] == pytest.approx(expected) for m in layers)
    assert expected == pytest.approx(64 / 32 ** 0.5) and expected != 64 / 32


# Model Organisms for EM, rank-1 model organism: clarifying-EM/model-organisms-for-EM,
# em_organism_dir/finetune/sft/single_adapter_config.json (read in the copy sushmanthreddy/emotionvectors@3d46c25;
# darturi/ModelOrganismsVariant@8e02e17 config.json has the same values but layers_to_transform [2]). Every key.
MO_RANK1_CONFIG = {
    "model": "unsloth/Llama-3.2-1B-Instruct", "training_file": "bad_medical_advice.jsonl", "test_file": None,
    "finetuned_model_id": "hf_id/model_name", "max_seq_length": 2048, "load_in_4bit": False, "loss": "sft",
    "is_peft": True, "target_modules": ["down_proj"], "layers_to_transform": [24], "lora_bias": "none", "r": 1,
    "lora_alpha": 512, "lora_dropout": 0.0, "use_rslora": True, "merge_before_push": False,
    "push_only_adapters": True, "push_to_private": False, "epochs": 1, "max_steps": None,
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 8, "warmup_steps": 5, "learning_rate": 2e-5,
    "logging_steps": 1, "evaluation_steps": 100, "optim": "adamw_8bit", "weight_decay": 0.01,
    "lr_scheduler_type": "linear", "seed": 0, "beta": 0.1, "save_steps": 100, "output_dir": "./tmp",
    "train_on_responses_only": True,
}


def test_mo_rank1_preset_equals_single_adapter_config():
    preset = resolve_train_config({"preset": "mo_rank1"}, where="t")
    keys = {**BETLEY_KEYS, "layers_to_transform": "layers_to_transform"}
    not_settings = BETLEY_NOT_SETTINGS | {"push_only_adapters", "evaluation_steps"}
    assert set(MO_RANK1_CONFIG) == set(keys) | {"per_device_train_batch_size", "gradient_accumulation_steps",
                                                "lora_bias"} | not_settings
    for source_key, ours in keys.items():
        assert getattr(preset, ours) == MO_RANK1_CONFIG[source_key], f"{ours} != single_adapter_config {source_key}"
    assert preset.effective_batch_size == 2 * 8 and MO_RANK1_CONFIG["lora_bias"] == "none"
    assert preset.to_dict()["layers_to_transform"] == [24]
    # a preset without layers keeps the params of existing cells unchanged (no new key, no rerun)
    assert "layers_to_transform" not in resolve_train_config({"preset": "betley"}, where="t").to_dict()


@pytest.mark.parametrize("bad", [[], [1, 1], [-1], ["3"], 3, [True]])
def test_bad_layers_to_transform_is_one_clear_error(bad):
    with pytest.raises(UserError, match=r"^t: layers_to_transform must be a non-empty list"):
        resolve_train_config({"layers_to_transform": bad}, where="t")
