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
