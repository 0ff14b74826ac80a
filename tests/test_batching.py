"""The batch plan chooser (memory arithmetic) and the packed micro-batching's equality with the seed setting."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from persona_em.training import batching
from persona_em.training.batching import GIB, BatchPlan, ModelDims, choose_plan, split_packed
from persona_em.errors import UserError
from persona_em.training.settings import TrainConfig, resolve_train_config
from persona_em.models import load_model
from persona_helpers import tiny_causal_lm, tiny_gemma3

torch.set_num_threads(1)

QWEN7B = ModelDims(hidden_size=3584, intermediate_size=18944, num_layers=28, vocab_size=152064, n_params=7_660_000_000)
LLAMA8B = ModelDims(hidden_size=4096, intermediate_size=14336, num_layers=32, vocab_size=128256, n_params=8_030_000_000)


def plan(**kw):
    args = dict(effective_batch_size=16, per_device_batch_size="auto", gradient_checkpointing="auto",
                micro_batch_tokens="auto", cuda=True, dims=QWEN7B, longest_example_tokens=1200)
    args.update(kw)
    return choose_plan(**args)


def test_cpu_auto_keeps_the_earlier_settings():
    p = plan(cuda=False, total_memory_bytes=None, dims=None)
    assert (p.per_device_batch_size, p.gradient_accumulation_steps, p.gradient_checkpointing, p.packed) == (2, 8, False, False)
    assert plan(cuda=False, effective_batch_size=3).per_device_batch_size == 1  # odd effective batch


def test_explicit_micro_batch_is_kept_on_any_device():
    for cuda in (True, False):
        p = plan(per_device_batch_size=2, gradient_checkpointing=True, cuda=cuda, total_memory_bytes=80 * GIB)
        assert (p.per_device_batch_size, p.gradient_accumulation_steps, p.gradient_checkpointing, p.packed) == (2, 8, True, False)


@pytest.mark.parametrize("dims", [QWEN7B, LLAMA8B])
@pytest.mark.parametrize("gib", [64, 80, 141])
def test_large_gpus_get_a_packed_plan_without_checkpointing(dims, gib):
    p = plan(dims=dims, total_memory_bytes=gib * GIB)
    assert p.packed and not p.gradient_checkpointing
    assert 4096 <= p.micro_batch_tokens <= batching.MAX_MICRO_BATCH_TOKENS
    assert (p.per_device_batch_size, p.gradient_accumulation_steps) == (16, 1)
    if gib == 64:  # the estimated peak stays inside an A100-64GB's 60 GB
        assert dims.weight_bytes + p.micro_batch_tokens * dims.activation_bytes_per_token < 60e9


def test_memory_override(monkeypatch):
    monkeypatch.setenv(batching.MEMORY_ENV, "40")
    assert plan(total_memory_bytes=80 * GIB).micro_batch_tokens == plan(total_memory_bytes=40 * GIB).micro_batch_tokens


def test_smaller_gpu_gets_fewer_tokens_then_checkpointing():
    p40 = plan(total_memory_bytes=40 * GIB)
    assert p40.packed and not p40.gradient_checkpointing
    assert 1200 <= p40.micro_batch_tokens < plan(total_memory_bytes=64 * GIB).micro_batch_tokens
    p24 = plan(total_memory_bytes=22 * GIB, longest_example_tokens=2048)  # 15 GB of weights leave too little
    assert p24.gradient_checkpointing and p24.micro_batch_tokens >= 2048
    with pytest.raises(MemoryError):
        plan(total_memory_bytes=18 * GIB)


def test_overrides():
    assert plan(total_memory_bytes=80 * GIB, gradient_checkpointing=True).gradient_checkpointing
    p = plan(total_memory_bytes=80 * GIB, micro_batch_tokens=1000)
    assert p.micro_batch_tokens == 1200 and not p.gradient_checkpointing  # never below the longest example
    assert plan(total_memory_bytes=40 * GIB, micro_batch_tokens=20000).gradient_checkpointing


def test_config_accepts_auto_and_rejects_nonsense():
    assert resolve_train_config({}, where="t").per_device_batch_size == "auto"
    assert resolve_train_config({"per_device_batch_size": 4}, where="t").per_device_batch_size == 4
    for bad in ({"per_device_batch_size": 3}, {"per_device_batch_size": "big"}, {"micro_batch_tokens": 0},
                {"gradient_checkpointing": "sometimes"}):
        with pytest.raises(UserError):
            resolve_train_config(bad, where="t")


def test_split_packed_keeps_order_and_budget():
    assert split_packed([3, 3, 3, 3], 6) == [(0, 2), (2, 4)]
    assert split_packed([10, 2, 2], 6) == [(0, 1), (1, 3)]  # an over-long sequence gets its own run
    assert split_packed([1] * 5, 100) == [(0, 5)]
    assert split_packed([], 10) == []


def _train(tmp_path, name, plan: BatchPlan, steps: int = 2):
    from persona_em import compose
    from persona_em.demo import build_tiny_model, write_demo_dataset
    from persona_em.chat import ChatFormat
    from persona_em.training.em import _lora_config, _trainer_class, build_dataset, sft_args

    model_dir, data = tmp_path / "model", tmp_path / "train.jsonl"
    if not model_dir.exists():
        build_tiny_model(model_dir, hidden_size=32, num_layers=2)
        write_demo_dataset("insecure", data, n_rows=16 * steps, seed=0)
    # SGD: the update is linear in the gradient, so equal gradients give equal weights. (Adam's first step is
    # about lr * sign(g) per element, so float-rounding noise in a near-zero gradient could flip an element.)
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=0, max_length=128, resume_every_steps=1000, optimizer="sgd")
    base, chat_format = load_model(model_dir, device="cpu")
    tok = chat_format.tokenizer
    dataset = build_dataset(ChatFormat(tok), data, cfg)
    torch.manual_seed(0)
    model = compose.compose_for_training(base, "none", None, "none", _lora_config(cfg))
    EMTrainer, _ = _trainer_class()
    EMTrainer.batch_plan = plan
    trainer = EMTrainer(model=model, args=sft_args(cfg, plan, tmp_path / name, seed=0), train_dataset=dataset,
                        processing_class=tok)
    trainer.args.disable_tqdm = True
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "loss" in h]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, weights, tokens


def test_packed_micro_batches_give_the_seed_settings_step(tmp_path):
    seed_plan = BatchPlan(2, 8, False, False, None, "seed")
    packed = BatchPlan(16, 1, False, True, 60, "packed, several micro-batches per step")
    seed_losses, seed_w, seed_tokens = _train(tmp_path, "seed", seed_plan)
    packed_losses, packed_w, packed_tokens = _train(tmp_path, "packed", packed)
    assert packed_tokens == seed_tokens  # the training log counts the same tokens
    assert len(seed_losses) == len(packed_losses) == 2
    assert packed_losses == pytest.approx(seed_losses, rel=1e-4)
    assert seed_losses[1] != pytest.approx(seed_losses[0], rel=1e-3)  # the step moved the weights
    for n, w in seed_w.items():
        torch.testing.assert_close(packed_w[n], w, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("lengths", [[11, 7], [4, 3, 12]])
def test_packed_rows_give_each_sequence_its_own_logits(arch, lengths):
    """A packed row (sequences back to back, positions restarting) gives each sequence the logits it gets alone, for
    each architecture; for Gemma 3 also where a layer attends over a sliding window shorter than the sequences (its
    local layers): before, the packed attention ignored the window and attended to every earlier token."""
    from persona_em.training import packed_attention

    model = tiny_causal_lm(arch)
    torch.manual_seed(1)
    seqs = [torch.randint(0, 64, (1, n)) for n in lengths]
    with torch.no_grad():
        alone = [model(s).logits for s in seqs]
        if arch == "gemma3":  # the window changes the logits here
            full = tiny_gemma3(sliding_window=4, layer_types=("full_attention", "full_attention"))
            assert not torch.allclose(alone[-1], full(seqs[-1]).logits, atol=1e-4)
        packed_attention.use_packed_attention(model)
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        with packed_attention.packed_sequences(bounds):
            out = model(torch.cat(seqs, dim=1),
                        position_ids=torch.cat([torch.arange(n) for n in lengths])[None]).logits
    for got, want in zip(torch.split(out, lengths, dim=1), alone):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
