"""The one training-settings family (persona_em/training/settings.py): EM, DPO and SFT settings resolve the same way, build
their LoRA with one function and save adapters with one helper."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from conftest import demo_config
from persona_em.errors import UserError
from persona_em.persona.settings import check_persona_config
from persona_em.training.settings import (DPOSettings, SFTSettings, TrainConfig, lora_config, resolve_settings,
                                     save_adapter)

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "config/schemas/config.schema.yaml"


def test_sft_schema_defaults_are_the_sft_settings_defaults():
    """The rule passes the schema-filled `persona_training.sft` dict (a Snakemake param, so it stays); the schema's
    defaults must be SFTSettings' own, or the two would drift."""
    props = yaml.safe_load(SCHEMA.read_text())["properties"]["persona_training"]["properties"]["sft"]["properties"]
    ours = asdict(SFTSettings())
    assert {key: spec["default"] for key, spec in props.items()} == {key: ours[key] for key in props}


def test_sft_and_dpo_values_are_the_ones_trained_before():
    sft = SFTSettings()
    assert (sft.lora_r, sft.lora_alpha, sft.lora_dropout, sft.use_rslora, sft.learning_rate, sft.lr_scheduler,
            sft.warmup_ratio, sft.epochs, sft.effective_batch_size, sft.per_device_batch_size, sft.max_length,
            sft.resume_every_steps, sft.seed, sft.gradient_checkpointing) == (
        64, 128, 0.0, False, 5e-5, "cosine", 0.1, 1, 32, 4, 2048, 50, 0, False)
    dpo = DPOSettings()
    assert (dpo.lora_dropout, dpo.use_rslora, dpo.epochs, dpo.nll_weight, dpo.gradient_checkpointing) == (
        0.05, False, "auto", 0.0, False)


@pytest.mark.parametrize("cls", [TrainConfig, DPOSettings, SFTSettings])
def test_every_kind_resolves_preset_config_override_and_refuses_unknown_keys(cls):
    s = resolve_settings(cls, {"learning_rate": 1e-3}, {"learning_rate": 2e-3, "lora_r": 8}, where="cfg x.y")
    assert (s.learning_rate, s.lora_r) == (2e-3, 8)
    with pytest.raises(UserError, match=r"^cfg x\.y: unknown training key 'lora_rank'"):
        resolve_settings(cls, {"lora_rank": 8}, where="cfg x.y")
    with pytest.raises(UserError, match=r"^cfg x\.y: unknown training preset 'nope'"):
        resolve_settings(cls, {"preset": "nope"}, where="cfg x.y")
    with pytest.raises(UserError, match=r"^cfg x\.y: effective_batch_size 32 is not a multiple of "
                                        r"per_device_batch_size 5"):
        resolve_settings(cls, {"effective_batch_size": 32, "per_device_batch_size": 5}, where="cfg x.y")


def test_persona_trainers_refuse_auto_micro_batches():
    """`auto` micro-batching is the EM trainer's; DPO/SFT hand the number to TRL as it is."""
    with pytest.raises(UserError, match="persona_training.sft: per_device_batch_size must be a positive integer"):
        resolve_settings(SFTSettings, {"per_device_batch_size": "auto"}, where="persona_training.sft")


def test_sft_settings_are_checked_at_parse_time(tmp_path):
    """An SFT batch that does not divide used to train silently with 32 // 5 = 6 accumulation steps (30, not 32)."""
    cfg = demo_config(tmp_path)
    cfg["persona_training"]["sft"] = {"effective_batch_size": 32, "per_device_batch_size": 5}
    validate(cfg, str(SCHEMA))
    with pytest.raises(UserError, match="config persona_training.sft: effective_batch_size 32 is not a multiple"):
        check_persona_config(cfg)


def test_one_lora_builder_for_every_kind():
    em = lora_config(resolve_settings(TrainConfig, {"preset": "betley"}, where="t"))
    dpo, sft = lora_config(DPOSettings()), lora_config(SFTSettings(lora_r=4, target_modules=["q_proj"]))
    assert (em.r, em.lora_alpha, em.use_rslora, em.lora_dropout) == (32, 64, True, 0.0)
    assert (dpo.r, dpo.lora_alpha, dpo.use_rslora, dpo.lora_dropout, dpo.bias) == (64, 128, False, 0.05, "none")
    assert (sft.r, sft.lora_alpha, sft.lora_dropout, set(sft.target_modules)) == (4, 128, 0.0, {"q_proj"})


@pytest.mark.parametrize("name", ["default", "em"])
def test_save_adapter_writes_a_plain_adapter_directory(tmp_path, name):
    """PEFT writes a non-"default" adapter into a subfolder named after it; save_adapter flattens it, and writes only
    the named adapter of a model holding several."""
    from peft import PeftModel, get_peft_model
    from persona_helpers import tiny_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model(tmp_path)))
    model = get_peft_model(base, lora_config(SFTSettings(lora_r=2, target_modules=["q_proj"])), adapter_name=name)
    model.add_adapter("other", lora_config(SFTSettings(lora_r=3, target_modules=["v_proj"])))
    save_adapter(model, name, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")),
                                       str(tmp_path / "out"))
    assert loaded.peft_config["default"].r == 2
