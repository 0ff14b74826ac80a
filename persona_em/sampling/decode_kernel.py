"""A length-aware decode attention kernel for the static KV cache (Triton; imported only where Triton is installed).

With a static cache, every decode step's attention gets K/V of the cache's full length (prompt + max_new_tokens)
and a mask; SDPA's kernels read every slot, filled or not: on average half of what they read is empty cache. This
kernel reads only the slots before each row's last attended position (from the mask, on the device: no host sync,
so the compiled decode step stays one CUDA graph), with the query heads of one KV group as the rows of one
product, so K/V are read once per KV head. It computes exactly SDPA's function: softmax(q k^T * scale + mask) v
with the boolean mask (True = attend), online softmax in fp32 over blocks of keys.

The compiled decode step calls it by name (a custom op), so a persisted compile cache (compile_cache.py) never holds
a stale copy of it; Triton compiles the kernel itself once per process (~1 s).

Grid: (batch, KV heads, splits). With a large batch (sampling: 400 rows x 4-8 KV heads) one split per row and
head fills the GPU; with a small one the keys are split into chunks whose partial results are merged (split-K,
"flash-decoding").
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# block of keys per step, warps, pipeline stages (bench/decode_attention.py times the alternatives on the GPU), for
# heads of size <= 128 (Qwen2.5, Qwen3, Llama-3.x)
CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def _block_n(head_size: int) -> int:
    """Keys per block: CONFIG's for heads of size <= 128, fewer for larger heads (Gemma 3: 256), so that the pipelined
    K and V tiles (num_stages x BLOCK_N x head size, bf16) take the same shared memory as for 128: 96 KiB, within an
    A100's 163 KiB per block (with 64 keys a 256-wide head would need 192 KiB)."""
    return max(16, CONFIG["BLOCK_N"] * 128 // max(head_size, 128))


def _decode_kernel(Q, K, V, Mask, End, O, Lse,
                   sqb, sqh, sqg, skb, skh, skn, svb, svh, svn, smb, sob, soh, sos, sog, slb, slh, sls,
                   scale, G, HD, CHUNK,
                   GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    end = tl.load(End + b)  # the row's keys are [0, end): nothing at or after `end` is attended
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, end)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    dm = d[None, :] < HD  # D: the head size rounded up to a power of two >= 16
    q = tl.load(Q + b * sqb + h * sqh + g[:, None] * sqg + d[None, :], mask=(g[:, None] < G) & dm, other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        inside = n < hi
        keep = (tl.load(Mask + b * smb + n, mask=inside, other=0) != 0) & inside
        k = tl.load(K + b * skb + h * skh + n[:, None] * skn + d[None, :], mask=inside[:, None] & dm, other=0.0)
        sc = tl.dot(q, tl.trans(k)) * scale
        sc = tl.where(keep[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key attended yet: keep zeros, no NaN
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + n[:, None] * svn + d[None, :], mask=inside[:, None] & dm, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(O + b * sob + h * soh + s * sos + g[:, None] * sog + d[None, :], out, mask=dm)
    tl.store(Lse + b * slb + h * slh + s * sls + g, lse)


_JIT = triton.jit(_decode_kernel)
_INTERPRETED = None


def _kernel(device: torch.device):
    """The compiled kernel on a GPU; on a CPU, Triton's interpreter (tests)."""
    global _INTERPRETED
    if device.type == "cuda":
        return _JIT
    if _INTERPRETED is None:
        from triton.runtime.interpreter import InterpretedFunction

        _INTERPRETED = InterpretedFunction(_decode_kernel)
    return _INTERPRETED


def _splits(batch: int, kv_heads: int, length: int, block: int, device: torch.device) -> int:
    """Split the keys only when batch x KV heads alone gives fewer than ~4 programs per multiprocessor."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(math.ceil(length / block), math.ceil(4 * sms / (batch * kv_heads))))


@torch.library.custom_op("persona_em::gqa_decode_attention", mutates_args=())
def gqa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, KVH, G, D] (G query heads per KV head), k/v [B, KVH, L, D], mask [B, L] bool (True = attend)
    -> [B, KVH, G, D] = softmax(q k^T * scale, masked) v, reading only keys before each row's last True."""
    b, kvh, g, d = q.shape
    length = k.shape[2]
    dp = max(16, triton.next_power_of_2(d))
    block = _block_n(dp)
    positions = torch.arange(1, length + 1, device=mask.device, dtype=torch.int32)
    end = torch.where(mask, positions, 0).amax(-1).to(torch.int32)  # 1 + the last attended position, per row
    splits = _splits(b, kvh, length, block, q.device)
    chunk = math.ceil(math.ceil(length / splits) / block) * block
    gp = max(16, triton.next_power_of_2(g))  # rows of the product: tl.dot needs >= 16
    o = torch.empty(b, kvh, splits, gp, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, kvh, splits, gp, device=q.device, dtype=torch.float32)
    m8 = mask.view(torch.uint8)
    opts = {} if q.device.type != "cuda" else {"num_warps": CONFIG["num_warps"], "num_stages": CONFIG["num_stages"]}
    _kernel(q.device)[(b, kvh, splits)](
        q, k, v, m8, end, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), m8.stride(0),
        o.stride(0), o.stride(1), o.stride(2), o.stride(3), lse.stride(0), lse.stride(1), lse.stride(2),
        scale, g, d, chunk, GP=gp, D=dp, BLOCK_N=block, **opts)
    if splits == 1:
        return o[:, :, 0, :g].to(q.dtype).contiguous()
    lse, o = lse[..., :g], o[..., :g, :]
    w = torch.exp(lse - lse.amax(2, keepdim=True))  # [B, KVH, S, G]; splits past the row's end weigh 0
    return ((w[..., None] * o).sum(2) / w.sum(2)[..., None]).to(q.dtype).contiguous()


@gqa_decode.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape)  # contiguous, as the kernel's result


def supports(query: torch.Tensor, key: torch.Tensor, mask) -> bool:
    """What the kernel takes: a boolean mask, unit stride along the head dimension; on a GPU bf16/fp16 only (its
    float32 products would run in tf32, less exact than SDPA's)."""
    return (mask is not None and mask.dtype == torch.bool and mask.stride(-1) == 1
            and (query.dtype in (torch.bfloat16, torch.float16) or not query.is_cuda)
            and query.stride(-1) == 1 and key.stride(-1) == 1)
