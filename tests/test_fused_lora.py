"""The fused LoRA forward computes PEFT's function and gradients (stacked persona + EM adapters included)."""
import copy

import torch

from persona_em import compose
from persona_em.fused_lora import use_fused_lora
from persona_em.train_config import TrainConfig
from persona_em.train_em import _lora_config


def _stacked_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    from persona_em.demo import build_tiny_model

    build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=2)
    base, _ = compose.load_base_model(tmp_path / "m", device="cpu")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"]),
                           adapter_name="persona")
    model.add_adapter(compose.EM, _lora_config(TrainConfig()))
    model.base_model.set_adapter(["persona", compose.EM])
    with torch.no_grad():  # B = 0 at initialisation would hide a wrong B path
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    for name, p in model.named_parameters():
        p.requires_grad = f".{compose.EM}." in name
    return model


def test_fused_lora_matches_peft_forward_and_gradients(tmp_path):
    peft_model = _stacked_model(tmp_path)
    fused = copy.deepcopy(peft_model)
    assert use_fused_lora(fused) == 2 * 7  # every LoRA Linear: 2 layers x the EM adapter's 7 projections
    ids = torch.randint(0, 100, (2, 12))
    outs = []
    for m in (peft_model, fused):
        m.zero_grad()
        logits = m(input_ids=ids).logits
        logits.float().pow(2).mean().backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (got, got_grads) = outs
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == got_grads.keys() and ref_grads
    for n, g in ref_grads.items():
        torch.testing.assert_close(got_grads[n], g, rtol=1e-4, atol=1e-7)


def test_fused_lora_defers_to_peft_when_adapters_are_disabled(tmp_path):
    plain = _stacked_model(tmp_path)
    fused = copy.deepcopy(plain)
    use_fused_lora(fused)
    ids = torch.randint(0, 100, (1, 8))
    with plain.disable_adapter(), fused.disable_adapter():
        off_plain, off_fused = plain(input_ids=ids).logits, fused(input_ids=ids).logits
    torch.testing.assert_close(off_fused, off_plain)
    assert not torch.allclose(fused(input_ids=ids).logits, off_fused)  # and on again afterwards
