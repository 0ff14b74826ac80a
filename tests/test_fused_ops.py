"""The fused element-wise ops of the packed training path (fused_ops.py) compute what transformers' modules do:
the same loss and LoRA gradients on the tiny demo model (fp32, CPU; compiled by inductor's CPU backend)."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from persona_em.models import load_model
from persona_em.training.fused_ops import undo_fused_pointwise, use_fused_pointwise
from persona_helpers import tiny_causal_lm

torch.set_num_threads(1)


def test_fused_pointwise_equals_the_modules(tiny_model_dir):
    base, _ = load_model(tiny_model_dir, device="cpu")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (1, 37), generator=g)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads()
    layers = base.config.num_hidden_layers
    assert use_fused_pointwise(model) == 2 * layers + 1 + layers  # 2 norms per layer + final norm, one MLP each
    loss, grads = loss_and_grads()
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    for n, gr in ref_grads.items():
        assert torch.allclose(grads[n], gr, rtol=1e-4, atol=1e-6), n
    # a second size runs the same (dynamic-shape) compilation
    ids = torch.randint(0, 500, (1, 53), generator=g)
    undo_fused_pointwise(model)
    ref_loss, _ = loss_and_grads()
    use_fused_pointwise(model)
    loss, _ = loss_and_grads()
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    undo_fused_pointwise(model)
    assert not any(getattr(m, "_fused", False) for m in model.modules())


@pytest.mark.parametrize("arch, fused", [("llama", 2 * 2 + 1 + 2), ("qwen3", 2 * 4 + 1 + 2), ("gemma3", 0)])
def test_fused_forms_match_each_architecture(monkeypatch, arch, fused):
    """Which modules switch, and that each switched one computes its module's function: Llama (2 norms per layer,
    the final norm, SiLU MLPs), Qwen3 (also its per-head q/k norms), Gemma 3 (norms scaled by 1 + w, GELU MLPs:
    nothing switches). The formula is checked uncompiled; compilation is checked above."""
    from persona_em.training import fused_ops

    monkeypatch.setattr(fused_ops, "_compiled", lambda fn: fn)
    model = tiny_causal_lm(arch)
    ids = torch.randint(0, 64, (1, 23))
    with torch.no_grad():
        want = model(ids).logits
        assert use_fused_pointwise(model) == fused
        got = model(ids).logits
    undo_fused_pointwise(model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
