"""The fused element-wise ops of the packed training path (fused_ops.py) compute what transformers' modules do:
the same loss and LoRA gradients on the tiny demo model (fp32, CPU; compiled by inductor's CPU backend)."""
import torch
from peft import LoraConfig, get_peft_model

from persona_em.models import load_model
from persona_em.training.fused_ops import undo_fused_pointwise, use_fused_pointwise

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
    assert use_fused_pointwise(model, lora=False) == 2 * layers + 1 + layers  # 2 norms per layer + final norm, MLPs
    loss, grads = loss_and_grads()
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    for n, gr in ref_grads.items():
        assert torch.allclose(grads[n], gr, rtol=1e-4, atol=1e-6), n
    # a second size runs the same (dynamic-shape) compilation
    ids = torch.randint(0, 500, (1, 53), generator=g)
    undo_fused_pointwise(model)
    ref_loss, _ = loss_and_grads()
    use_fused_pointwise(model, lora=False)
    loss, _ = loss_and_grads()
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    undo_fused_pointwise(model)
    assert not any(getattr(m, "_fused", False) for m in model.modules())


def test_fused_lora_equals_peft_for_stacked_adapters_with_rslora_and_dropout(tiny_model_dir):
    """Two active adapters (a frozen persona under an rsLoRA EM adapter with dropout, as a stacked cell trains):
    the addmm form gives PEFT's loss and gradients; a layer with the adapters disabled is the base layer."""
    base, _ = load_model(tiny_model_dir, device="cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets), adapter_name="persona")
    model.add_adapter("em", LoraConfig(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.1, target_modules=targets))
    model.base_model.set_adapter(["persona", "em"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
            p.requires_grad_(".em." in n)
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 500, (1, 41), generator=g)

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(7)  # the same dropout masks: both forms draw them in the same order
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = loss_and_grads()
    assert any(".persona." in n for n, _ in model.named_parameters())
    assert use_fused_pointwise(model, pointwise=False) == base.config.num_hidden_layers * len(targets)
    loss, grads = loss_and_grads()
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    assert ref_grads.keys() == grads.keys() and len(grads) == 2 * base.config.num_hidden_layers * len(targets)
    for n, gr in ref_grads.items():
        assert torch.allclose(grads[n], gr, rtol=1e-4, atol=1e-6), n
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, layer.in_features)
    with model.disable_adapter():
        assert torch.equal(layer(x), layer.base_layer(x))
    model.eval()
    assert not torch.allclose(layer(x), layer.base_layer(x))
    undo_fused_pointwise(model)
    assert not any(getattr(m, "_fused", False) for m in model.modules())
