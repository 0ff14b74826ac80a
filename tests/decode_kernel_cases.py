"""The length-aware decode kernel (persona_em/sampling/decode_kernel.py) on CPU in Triton's interpreter. Run by
tests/test_fast_sampling.py in a process with TRITON_INTERPRET=1 (read when Triton is first imported); not collected
on its own (the file name does not start with test_)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from persona_em.models import load_model
from persona_em.sampling.sample import generate_batch

torch.set_num_threads(1)
assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (see tests/test_fast_sampling.py)"


def _numpy2_scalar_index():
    """Triton 3.6's interpreter turns a program id or loaded scalar (a 1-element array) into a loop bound with
    int(array), which NumPy >= 2.4 refuses for arrays of one dimension; .item() is the same number."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


_numpy2_scalar_index()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from persona_em.demo import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(path, hidden_size=32, num_layers=2)  # 4 query heads, 2 KV heads: GQA
    return path


def _sdpa_reference(q, k, v, mask, scale):
    """softmax(q k^T * scale, masked) v in float64: q [B, KVH, G, D], k/v [B, KVH, L, D], mask [B, L]."""
    s = torch.einsum("bhgd,bhld->bhgl", q.double(), k.double()) * scale
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhgl,bhld->bhgd", torch.softmax(s, -1), v.double())


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("group, d", [(4, 24), (7, 24), (2, 256)])
def test_decode_kernel_reads_only_the_filled_cache_and_matches_sdpa(monkeypatch, splits, group, d):
    """The length-aware kernel (Triton's interpreter on CPU) equals masked attention over the whole cache: left
    padding, rows of different lengths, a hole, a length that is no multiple of the key block; split-K too. Slots
    after each row's last attended one hold NaN: the kernel must never read them. Head sizes: 24, no power of two
    (padded to 32), and Gemma 3's 256 (its smaller key blocks)."""
    from persona_em.sampling import decode_kernel

    monkeypatch.setattr(decode_kernel, "_splits", lambda *a: splits)
    torch.manual_seed(splits * 10 + group)
    b, kvh, length = 3, 2, 150
    q = torch.randn(b, kvh, group, d)
    k, v = torch.randn(b, kvh, length, d), torch.randn(b, kvh, length, d)
    mask = torch.zeros(b, length, dtype=torch.bool)
    for row, (pad, end) in enumerate([(0, 150), (5, 97), (30, 64)]):
        mask[row, pad:end] = True
        k[row, :, end:], v[row, :, end:] = float("nan"), float("nan")  # the empty part of a static cache
    mask[0, 70:75] = False
    out = decode_kernel.gqa_decode(q, k, v, mask, 0.3)
    assert out.shape == q.shape and not out.isnan().any()
    torch.testing.assert_close(out.double(), _sdpa_reference(q, k.nan_to_num(), v.nan_to_num(), mask, 0.3),
                               rtol=1e-5, atol=1e-5)


def test_fast_path_with_decode_kernel_generates_the_same_tokens(tiny, monkeypatch):
    """Sampling with the length-aware kernel in the decode step (CPU: Triton's interpreter) gives plain
    generate's tokens, and the kernel did run."""
    from persona_em.sampling import decode_kernel, fast_generate

    calls = []
    kernel = decode_kernel._kernel
    monkeypatch.setattr(decode_kernel, "_kernel", lambda device: calls.append(device) or kernel(device))
    monkeypatch.setattr(fast_generate, "KERNEL_DEVICES", {"cuda", "cpu"})
    model, chat_format = load_model(tiny, device="cpu")
    convs = [[{"role": "user", "content": q}] for q in ("hello", "what would you do as ruler of the world?")]
    for temperature in (0.0, 1.0):
        settings = {"temperature": temperature, "top_p": 1.0, "max_new_tokens": 12}
        plain = generate_batch(model, chat_format, convs, settings, seed=0, fast=False)
        fast = generate_batch(model, chat_format, convs, settings, seed=0, fast=True)
        assert [r["response"] for r in fast] == [r["response"] for r in plain]
    assert len(calls) >= 2 * 11  # 2 layers x every decode step after the prefill


def test_decode_kernel_keeps_gemma3_sliding_windows(tmp_path, monkeypatch):
    """Gemma 3's local layers (a sliding window; their static cache holds only the window) through the kernel: plain
    generate's tokens with prompts and responses longer than the window, and the kernel ran in both layer kinds."""
    from persona_helpers import tiny_gemma3

    from persona_em.sampling import fast_generate

    lengths = []
    monkeypatch.setattr(fast_generate, "KERNEL_DEVICES", {"cuda", "cpu"})
    original = torch.ops.persona_em.gqa_decode_attention
    monkeypatch.setattr(torch.ops.persona_em, "gqa_decode_attention",
                        lambda q, k, v, mask, scale: lengths.append(k.shape[-2]) or original(q, k, v, mask, scale),
                        raising=False)
    model, chat_format = load_model(tiny_gemma3(4, out=tmp_path / "gemma3"), device="cpu")
    convs = [[{"role": "user", "content": q}] for q in
             ("hello", "what would you do as ruler of the world? I wish for money, a quick partner and dinner")]
    settings = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 12}
    plain = generate_batch(model, chat_format, convs, settings, seed=0, fast=False)
    fast = generate_batch(model, chat_format, convs, settings, seed=0, fast=True)
    assert [r["response"] for r in fast] == [r["response"] for r in plain]
    assert 4 in lengths and max(lengths) > 4, sorted(set(lengths))  # the window's cache and the global layer's
