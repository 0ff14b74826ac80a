"""persona_em.models.load_model, the one loader: precision/placement policy, chat format, offline check."""
import pytest
import torch

from persona_em.chat import ChatSettings
from persona_em.errors import UserError
from persona_em.models import load_model

torch.set_num_threads(1)


def test_cpu_load_is_fp32_with_the_chat_format_of_the_settings(tiny_model_dir):
    model, chat = load_model(tiny_model_dir, ChatSettings(stop_tokens=("<|im_start|>",), model="tiny"),
                             device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert chat.settings.stop_tokens == ("<|im_start|>",) and chat.name == "tiny"
    assert chat.tokenizer.pad_token is not None


def test_missing_weights_name_the_directory_and_the_fetch_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "model").mkdir()
    with pytest.raises(UserError, match=r"model/config\.json .*no network.*prepare_model"):
        load_model(tmp_path / "model")


def test_unknown_device_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="device 'gpu'"):
        load_model(tiny_model_dir, device="gpu")


def test_a_vision_language_gemma3_checkpoint_loads_as_its_language_model(tmp_path):
    """Gemma 3 4B-27B are vision-language checkpoints (config `gemma3`, weights under language_model.*): the loader
    gives their text-only causal LM, with the full model's logits for text, and no vision tower."""
    from transformers import AutoModelForCausalLM

    from persona_helpers import tiny_gemma3

    path = tiny_gemma3(4, out=tmp_path / "gemma3", vision=True)
    full = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert type(full).__name__ == "Gemma3ForConditionalGeneration"
    model, _ = load_model(path, device="cpu")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 2
    assert not any("vision" in n for n, _ in model.named_parameters())
    ids = torch.randint(0, 500, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, full(input_ids=ids).logits, rtol=0, atol=0)


def test_a_checkpoint_that_leaves_weights_unset_is_refused(tmp_path):
    """transformers only warns when a checkpoint lacks some of the model's weights, and initialises them at random:
    the loader refuses it, naming the model and the keys."""
    from safetensors.torch import load_file, save_file

    from persona_helpers import tiny_gemma3

    path = tiny_gemma3(4, out=tmp_path / "gemma3")
    weights = load_file(str(path / "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"does not fill the model Gemma3ForCausalLM: missing_keys "
                                        r"\['model\.layers\.1\.mlp\.down_proj\.weight'\]"):
        load_model(path, device="cpu")
