"""The local judge's exact multi-token scores for many prompts at once: one forward pass per batch of prompts,
each prompt followed by a token tree of all candidate answers (tree attention).

What is computed is what `HFBackend.sequence_logprobs` computes for one prompt (backends.py): for every candidate
answer c = t_1..t_n (the numbers 0-100, CODE, REFUSAL in their canonical tokenization)
    log P(c | prompt) = sum_j log P(t_j | prompt, t_1..t_{j-1})   and   log P(no digit next | prompt, c).
Both need the next-token distribution after the prompt and after every proper or full prefix of a candidate. The
distinct non-empty prefixes form a tree of ~105 nodes (Qwen-like digit tokenizers: 10 one-digit nodes, 90 two-digit
ones, "100", and CODE / REFUSAL's prefixes). Each node is one extra token after the prompt, at position
len(prompt) + depth - 1, attending to the whole prompt and to its own ancestors only (a 4D attention mask), so
its output is exactly the next-token distribution after that prefix. Instead of copying the prompt's KV cache
103 times and running 103 padded continuations per prompt, one pass runs prompt + tree for a whole batch of
prompts (left-padded to a common length; pads are masked out as keys), and only the tree's and the prompt's last
positions go through the LM head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Tokens (prompt + tree, padded) per forward pass: bounds the activations and the [batch, tree, vocab] logits.
GPU_BATCH_TOKENS = 32768
CPU_BATCH_TOKENS = 4096


@dataclass
class CandidateTree:
    """The candidates' distinct non-empty prefixes as tree nodes (node i = token tokens[i] at depth depth[i])."""

    tokens: list[int]
    depth: list[int]
    ancestors: torch.Tensor  # [N, N] bool: node k is node i or one of its ancestors
    steps: torch.Tensor  # [C, W] kept-logit row predicting each candidate token (0 = the prompt's last position)
    step_tokens: torch.Tensor  # [C, W] the candidate's tokens
    step_valid: torch.Tensor  # [C, W] bool: a real token (candidates shorter than W are padded)
    end_rows: torch.Tensor  # [C] kept-logit row after the whole candidate

    @classmethod
    def of(cls, candidates: list[list[int]]) -> "CandidateTree":
        prefixes = sorted({tuple(c[:j]) for c in candidates for j in range(1, len(c) + 1)}, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(prefixes)}
        n = len(prefixes)
        ancestors = torch.zeros(n, n, dtype=torch.bool)
        for i, p in enumerate(prefixes):
            for j in range(1, len(p) + 1):
                ancestors[i, index[p[:j]]] = True
        width = max(len(c) for c in candidates)
        steps = torch.zeros(len(candidates), width, dtype=torch.long)
        toks = torch.zeros(len(candidates), width, dtype=torch.long)
        valid = torch.zeros(len(candidates), width, dtype=torch.bool)
        for ci, c in enumerate(candidates):
            for j, t in enumerate(c):
                # kept row 0 = the prompt's last position; kept row 1 + i = tree node i
                steps[ci, j] = 0 if j == 0 else 1 + index[tuple(c[:j])]
                toks[ci, j] = t
                valid[ci, j] = True
        end_rows = torch.tensor([1 + index[tuple(c)] for c in candidates])
        return cls([p[-1] for p in prefixes], [len(p) for p in prefixes], ancestors, steps, toks, valid, end_rows)

    def __len__(self) -> int:
        return len(self.tokens)


def _batches(lengths: list[int], n_tree: int, max_tokens: int) -> list[list[int]]:
    """Prompt indices, longest first, grouped so that batch size x (longest prompt + tree) <= max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        width = lengths[current[0]] + n_tree if current else lengths[i] + n_tree
        if current and (len(current) + 1) * width > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _inputs(prompts: list[list[int]], tree: CandidateTree, pad_id: int, device):
    """input_ids, position_ids and the [B, 1, L, L] boolean attention mask (True = attend) of prompt + tree rows."""
    b, n = len(prompts), len(tree)
    lp = max(len(p) for p in prompts)
    length = lp + n
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    pos = torch.zeros((b, length), dtype=torch.long)
    mask = torch.zeros((b, 1, length, length), dtype=torch.bool)
    causal = torch.ones(lp, lp, dtype=torch.bool).tril()
    tree_tokens = torch.tensor(tree.tokens, dtype=torch.long)
    depth = torch.tensor(tree.depth, dtype=torch.long)
    for r, p in enumerate(prompts):
        start = lp - len(p)
        ids[r, start:lp] = torch.tensor(p, dtype=torch.long)
        ids[r, lp:] = tree_tokens
        pos[r, start:lp] = torch.arange(len(p))
        pos[r, lp:] = len(p) + depth - 1
        real = torch.zeros(lp, dtype=torch.bool)
        real[start:] = True
        mask[r, 0, :lp, :lp] = causal & real[None, :]
        mask[r, 0, lp:, :lp] = real[None, :]
        mask[r, 0, lp:, lp:] = tree.ancestors
        idx = torch.arange(start)
        mask[r, 0, idx, idx] = True  # a pad row sees itself only (no all-masked row); nothing real sees a pad
    return ids.to(device), pos.to(device), mask.to(device)


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _window(model) -> int | None:
    """The sliding window of the model's local layers (Gemma 3; Qwen2 with use_sliding_window), None if none."""
    cfg = _text_config(model)
    return getattr(cfg, "sliding_window", None) if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()) \
        else None


def _model_mask(mask: torch.Tensor, pos: torch.Tensor, model, dtype):
    """The boolean mask as the model's attention implementation takes a ready 4D mask. A model with sliding-window
    layers gets one mask per layer type (transformers' mapping), the local layers' limited to the window: a query
    at position i sees keys at positions i - window + 1 .. i (transformers' sliding_window_overlay), so every
    prompt position and tree node sees what it sees in the one-at-a-time path."""
    impl = model.config._attn_implementation
    if impl == "sdpa":
        convert = lambda m: m  # noqa: E731
    elif impl == "eager":  # additive
        convert = lambda m: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(  # noqa: E731
            ~m, torch.finfo(dtype).min)
    else:
        raise ValueError(f"tree scoring needs sdpa or eager attention, not {impl!r}")
    window = _window(model)
    if window is None:
        return convert(mask)
    local = mask & ((pos[:, None, :, None] - pos[:, None, None, :]) < window)
    return {"full_attention": convert(mask), "sliding_attention": convert(local)}


def supports(model) -> bool:
    """sdpa or eager attention, and every layer either global or a sliding window given per layer type (a model
    whose window is not in `layer_types`, or with other layer kinds, is scored one prompt at a time)."""
    cfg = _text_config(model)
    kinds = set(getattr(cfg, "layer_types", None) or ())
    if kinds - {"full_attention", "sliding_attention"}:
        return False
    if getattr(cfg, "sliding_window", None) and not kinds:  # e.g. Mistral: its window applies to every layer
        return False
    return model.config._attn_implementation in ("sdpa", "eager")


@torch.inference_mode()
def score_prompts(model, prompts: list[list[int]], candidates: list[list[int]], digit_start: torch.Tensor,
                  pad_id: int, max_batch_tokens: int | None = None, tree: CandidateTree | None = None):
    """For each prompt (token ids): (log-probabilities of the first answer token [V] on the CPU, log P(candidate)
    list, log P(no digit after candidate) list), in the order of `candidates`."""
    tree = tree or CandidateTree.of(candidates)
    dev = model.device
    if max_batch_tokens is None:
        max_batch_tokens = GPU_BATCH_TOKENS if dev.type == "cuda" else CPU_BATCH_TOKENS
    steps, step_tokens = tree.steps.to(dev), tree.step_tokens.to(dev)
    step_valid, end_rows = tree.step_valid.to(dev), tree.end_rows.to(dev)
    digit_idx = digit_start.nonzero().squeeze(1).to(dev)
    results: list = [None] * len(prompts)
    for batch in _batches([len(p) for p in prompts], len(tree), max_batch_tokens):
        ids, pos, mask = _inputs([prompts[i] for i in batch], tree, pad_id, dev)
        dtype = next(model.parameters()).dtype
        out = model(input_ids=ids, position_ids=pos, attention_mask=_model_mask(mask, pos, model, dtype),
                    use_cache=False, logits_to_keep=len(tree) + 1)
        logp = torch.log_softmax(out.logits.float(), -1)  # [B, 1 + N, V]: the prompt's last position, then the tree
        del out
        seq_lp = torch.where(step_valid, logp[:, steps, step_tokens], 0.0).sum(-1)  # [B, C]
        # digit_start may be shorter than the logits: a model's vocab can be padded beyond its tokenizer's
        p_digit = logp.index_select(-1, digit_idx).exp().sum(-1)[:, end_rows]  # [B, C]
        end_lp = torch.log((1.0 - p_digit).clamp_min(1e-30))
        first = logp[:, 0].cpu()
        seq_lp, end_lp = seq_lp.tolist(), end_lp.tolist()
        for r, i in enumerate(batch):
            results[i] = (first[r], seq_lp[r], end_lp[r])
    return results
