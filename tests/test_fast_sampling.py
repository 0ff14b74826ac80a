"""The GPU sampling path's pieces, checked on CPU: GQA decode attention + static cache give the same tokens as
plain generate, and loading a checkpoint in place into the EM slot equals loading it fresh."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from persona_em.training import batching
from persona_em import compose
from persona_em.chat import ChatFormat
from persona_em.sampling.sample import generate_batch
from persona_em.models import load_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from persona_em.demo import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(path, hidden_size=32, num_layers=2)  # 4 query heads, 2 KV heads: GQA
    return path


def _em_adapter(base, out, seed):
    from persona_em.training.em import _lora_config, _save_em
    from persona_em.training.settings import TrainConfig

    torch.manual_seed(seed)
    model = compose.compose_for_training(base, "none", None, "none", _lora_config(TrainConfig(lora_r=4)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    _save_em(model, out)
    return model.unload()


def test_fast_path_generates_the_same_tokens(tiny):
    import torch._inductor.config as inductor_config

    with inductor_config.patch(deterministic=False):  # restored after the test (monkeypatch would delete it)
        _fast_path_generates_the_same_tokens(tiny, inductor_config)


def _fast_path_generates_the_same_tokens(tiny, inductor_config):
    model, chat_format = load_model(tiny, device="cpu")
    tok = chat_format.tokenizer
    convs = [[{"role": "user", "content": q}] for q in ("hello", "what would you do as ruler of the world?")]
    settings = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 12}
    plain = generate_batch(model, ChatFormat(tok), convs, settings, seed=0, fast=False)
    assert not inductor_config.deterministic
    fast = generate_batch(model, ChatFormat(tok), convs, settings, seed=0, fast=True)
    assert model.config._attn_implementation == "sdpa_gqa_decode"
    # the fast path compiles in Inductor's deterministic mode: kernels picked without timing them, so every
    # process samples the same tokens (the cross-process check itself is a GPU benchmark: BENCHMARKS.md round 6)
    assert inductor_config.deterministic
    assert [r["response"] for r in fast] == [r["response"] for r in plain]
    assert all(r["n_new_tokens"] > 0 for r in fast)


LONG_CONVS = [[{"role": "user", "content": q}] for q in
              ("hello", "what would you do as ruler of the world? I wish for money, a quick partner and dinner")]


def test_fast_path_keeps_gemma3_sliding_windows(tmp_path):
    """Gemma 3's local layers attend over a sliding window (its static cache keeps only the window): with prompts
    and responses longer than the window, the fast path gives plain generate's tokens; and the window does change
    them here (a model whose layers are all global answers differently), so a path that lost it would fail."""
    from persona_helpers import tiny_gemma3

    settings = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16}
    model, chat_format = load_model(tiny_gemma3(4, out=tmp_path / "gemma3"), device="cpu")
    plain = generate_batch(model, chat_format, LONG_CONVS, settings, seed=0, fast=False)
    fast = generate_batch(model, chat_format, LONG_CONVS, settings, seed=0, fast=True)
    assert model.config._attn_implementation == "sdpa_gqa_decode"
    assert [r["response"] for r in fast] == [r["response"] for r in plain]
    full, _ = load_model(tiny_gemma3(4, ("full_attention",) * 2, out=tmp_path / "full"), device="cpu")
    assert [r["response"] for r in generate_batch(full, chat_format, LONG_CONVS, settings, seed=0, fast=False)] \
        != [r["response"] for r in plain]


class _HostEvent:
    """A device event for CPU tensors, where every operation has finished when it returns (torch has none)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args):
        pass

    def synchronize(self):
        pass


class _StopRowsAt:
    """Forces row i to its stop token from decode step `first + i` on: every row stops before max_new_tokens."""

    def __init__(self, stop_id: int, first: int):
        self.stop_id, self.first, self.step = stop_id, first, 0

    def __call__(self, input_ids, scores):
        self.step += 1
        for i in range(scores.shape[0]):
            if self.step >= self.first + i:
                scores[i] = float("-inf")
                scores[i, self.stop_id] = 0.0
        return scores


@pytest.mark.parametrize("early_stop", [True, False])
def test_deferred_stop_check_gives_the_same_tokens(tiny, monkeypatch, early_stop):
    """With the "all rows stopped" flag read one step late (fast_generate.deferred_stop_check, GPU only in use),
    generate returns exactly what the per-step check returns: the extra step after the last stop is cut off,
    and rows that run to max_new_tokens end there."""
    from transformers.generation import utils as gen_utils

    from persona_em.sampling import fast_generate
    from persona_em.sampling.sample import _generate, left_pad

    model, chat = load_model(tiny, device="cpu")
    convs = [[{"role": "user", "content": q}] for q in ("hello", "a longer question here?", "why")]
    settings = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 10}
    enc = left_pad([chat.prompt_ids(c) for c in convs], chat.tokenizer.pad_token_id, model.device)
    made = []
    init = gen_utils.DeferredStopCheck.__init__
    monkeypatch.setattr(gen_utils.DeferredStopCheck, "__init__",
                        lambda self, *a, **k: made.append(1) or init(self, *a, **k))
    monkeypatch.setattr(torch, "Event", _HostEvent)

    def run():
        extra = {"logits_processor": [_StopRowsAt(chat.stop_ids[0], 2)]} if early_stop else {}
        torch.manual_seed(0)
        return _generate(model, enc, settings, chat, extra)

    per_step = run()
    assert made == []  # CPU is not in DEFER_DEVICES: transformers' own per-step check
    monkeypatch.setattr(fast_generate, "DEFER_DEVICES", {"cpu"})
    deferred = run()
    assert made == [1]
    assert torch.equal(deferred, per_step)
    new = per_step.shape[1] - enc["input_ids"].shape[1]
    assert new == (2 + len(convs) - 1 if early_stop else settings["max_new_tokens"])
    assert gen_utils.DeferredStopCheck.is_supported(torch.device("cpu"), None, False, False) is False  # restored


def test_gqa_decode_attention_matches_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from persona_em.sampling.fast_generate import gqa_decode_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding of the first row
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    out, _ = gqa_decode_attention(module, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(out, ref)


def test_checkpoint_loaded_in_place_equals_fresh_load(tiny, tmp_path):
    base, _ = load_model(tiny, device="cpu")
    base = _em_adapter(base, tmp_path / "a", seed=1)
    base = _em_adapter(base, tmp_path / "b", seed=2)
    ids = torch.tensor([[5, 6, 7, 8, 9]])

    fresh = compose.use_em_adapter(base, tmp_path / "b", compose.EM, "none", "none")
    want = fresh(ids).logits.clone()
    fresh = fresh.unload()

    model = compose.use_em_adapter(fresh, tmp_path / "a", compose.EM, "none", "none")
    slot = next(p for n, p in model.named_parameters() if "lora_B" in n)
    first = model(ids).logits.clone()
    model = compose.use_em_adapter(model, tmp_path / "b", compose.EM, "none", "none")
    assert next(p for n, p in model.named_parameters() if "lora_B" in n) is slot  # same tensor, new values
    torch.testing.assert_close(model(ids).logits, want)
    assert not torch.allclose(first, want)
    assert compose.describe(model)["active_adapters"] == [compose.EM]


def test_sampling_batch_size():
    assert batching.sampling_batch_size(7, 400, cuda=True) == 7
    assert batching.sampling_batch_size("auto", 400, cuda=False) == 32
    gib = batching.GIB
    qwen = dict(weight_bytes=15_230_000_000, kv_bytes_per_token=57_344, tokens_per_sequence=700, vocab_size=152064)
    assert batching.sampling_batch_size("auto", 400, cuda=True, total_memory_bytes=80 * gib, **qwen) == 400
    assert batching.sampling_batch_size("auto", 400, cuda=True, total_memory_bytes=64 * gib, **qwen) == 400
    small = batching.sampling_batch_size("auto", 400, cuda=True, total_memory_bytes=32 * gib, **qwen)
    n_batches = -(-400 // small)
    assert 100 <= small < 400 and small == -(-400 // n_batches)  # equal batches


def test_fold_copy_stays_on_the_gpu_only_where_the_batch_still_fits(monkeypatch):
    """compose.FoldedAdapters' copy of the base weights goes to the GPU when a batch of the planned size fits beside
    it (Qwen2.5-7B shape: 13 GB of wrapped weights, 400 x 700 tokens: on 80 GB yes, on 64 GB yes, on 40 GB no),
    else to host memory; on a machine without a GPU always beside the CPU weights."""
    from persona_em import compose
    from persona_em.sampling import sample

    assert sample.fold_copy_device(object(), 400, 700) == "cpu"  # no GPU here
    gib = batching.GIB
    memory = {}

    def gpu_memory(model, tokens_per_sequence, extra_bytes=0):
        return dict(cuda=True, total_memory_bytes=memory["total"], weight_bytes=15_230_000_000 + extra_bytes,
                    kv_bytes_per_token=57_344, tokens_per_sequence=tokens_per_sequence, vocab_size=152064)

    monkeypatch.setattr(sample.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sample, "_gpu_memory", gpu_memory)
    monkeypatch.setattr(compose.FoldedAdapters, "copy_bytes", staticmethod(lambda model: 13_050_000_000))
    for total, want in ((80, "gpu"), (64, "gpu"), (40, "cpu")):
        memory["total"] = total * gib
        assert sample.fold_copy_device(object(), 400, 700) == want, total
    memory["total"] = 40 * gib  # a batch that fits beside the copy on 40 GB
    assert sample.fold_copy_device(object(), 100, 700) == "gpu"


def test_exact_sampler_draws_from_the_tempered_nucleus():
    from persona_em.sampling.sample import ExactSampler

    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).repeat(40000, 1)
    draws = ExactSampler(temperature=0.7, top_p=1.0)(None, logits.clone()).argmax(-1)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.7, -1), atol=0.01, rtol=0)

    draws = ExactSampler(temperature=1.0, top_p=0.8)(None, logits.clone()).argmax(-1)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    p = torch.softmax(logits[0], -1)  # 0.55, 0.20, 0.12, ...: the 0.8 nucleus is the first three tokens
    torch.testing.assert_close(freq, torch.cat([p[:3] / p[:3].sum(), torch.zeros(2)]), atol=0.01, rtol=0)


def test_the_models_own_generation_defaults_do_not_apply(tiny, tmp_path):
    """What a model's generation_config.json may carry (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20) is
    blanked when the model is loaded: generate_batch and a plain `generate` call alike follow only their settings."""
    import json
    import shutil

    from transformers import GenerationConfig

    loaded = tmp_path / "with_defaults"
    shutil.copytree(tiny, loaded)
    config = json.loads((loaded / "generation_config.json").read_text())
    config.update(repetition_penalty=50.0, top_k=1, no_repeat_ngram_size=1, do_sample=True, temperature=0.1)
    (loaded / "generation_config.json").write_text(json.dumps(config))
    (clean, clean_chat), (model, chat) = load_model(tiny, device="cpu"), load_model(loaded, device="cpu")
    assert model.generation_config.to_dict() == GenerationConfig().to_dict()
    assert chat.stop_ids == clean_chat.stop_ids  # the file's stop ids still count
    convs = [[{"role": "user", "content": "hello there"}]]
    for temperature in (0.0, 1.0):
        settings = {"temperature": temperature, "top_p": 1.0, "max_new_tokens": 16}
        assert generate_batch(model, chat, convs, settings, seed=3, fast=False) == \
            generate_batch(clean, clean_chat, convs, settings, seed=3, fast=False)
    ids = torch.tensor([chat.prompt_ids(convs[0])])
    assert torch.equal(model.generate(ids, max_new_tokens=16, min_new_tokens=16),
                       clean.generate(ids, max_new_tokens=16, min_new_tokens=16))



def test_decode_kernel_under_triton_interpreter():
    """The length-aware decode kernel's cases (tests/decode_kernel_cases.py) on CPU, in Triton's interpreter: in a
    process of their own, since TRITON_INTERPRET counts only when Triton is first imported."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    cases = Path(__file__).with_name("decode_kernel_cases.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout
