"""How a training step is cut into micro-batches on a GPU, chosen from the GPU's memory.

The optimizer step is fixed by the config (effective batch, e.g. 16 examples, loss = mean over their assistant
tokens). How it is computed is free: the users' seed setting (2 examples x 8 accumulation steps, padded, with
gradient checkpointing) runs a 7B model several times slower than the GPU allows. On a GPU with `auto` settings:

- the dataloader yields the whole effective batch (same examples, same order as the seed setting: the sampler
  does not depend on the batch size), collated padding-free (sequences back to back, position ids restarting);
- the packed row is cut at sequence boundaries into micro-batches of at most `micro_batch_tokens` tokens; each
  one's loss is its summed token loss over the step's total trainable-token count, so the accumulated gradient
  equals the seed setting's (per-token mean over the whole effective batch) up to floating-point order;
- gradient checkpointing is switched on only when one micro-batch's activations would not fit without it.

On CPU, `auto` keeps the earlier settings (2 examples per micro-batch, padded, no packing).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

GIB = 1024**3

CPU_PER_DEVICE_BATCH = 2  # what `auto` means without a GPU: the settings used before `auto` existed
# Above ~4k tokens per micro-batch the matrix products are already efficient; more only costs memory. The cap
# also makes the plan the same on an H100-80GB and an A100-64GB.
MAX_MICRO_BATCH_TOKENS = 8192
MIN_MICRO_BATCH_TOKENS = 512
# Memory kept free for the CUDA context, cuBLAS workspaces, LoRA weights + optimizer state, allocator slack.
RESERVED_BYTES = 4 * GIB
USABLE_FRACTION = 0.92
# Plan as if the GPU had this many GiB (a GPU shared with another job; the benchmark's "as on an A100-64GB").
MEMORY_ENV = "PERSONA_EM_GPU_MEMORY_GIB"


@dataclass(frozen=True)
class ModelDims:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    n_params: int
    bytes_per_param: int = 2  # bf16 on a GPU

    @classmethod
    def of(cls, model) -> "ModelDims":
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        n_params = sum(p.numel() for p in model.parameters())
        bpp = next(model.parameters()).element_size()
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size, n_params, bpp)

    @property
    def weight_bytes(self) -> int:
        return self.n_params * self.bytes_per_param

    @property
    def activation_bytes_per_token(self) -> int:
        """Saved activations per token for backward without checkpointing (bf16, LoRA on all projections).

        Per layer: the MLP keeps ~4 intermediate-sized tensors (gate, up, act(gate), their product), attention and
        norms ~10 hidden-sized ones (norm inputs in fp32); 12 so the estimate errs on the safe side (checked
        against measured peaks in BENCHMARKS.md). Assumes the LoRA inputs are not copied to fp32 (train_em
        switches PEFT's input casting off under bf16 autocast).
        """
        return self.num_layers * 2 * (4 * self.intermediate_size + 12 * self.hidden_size)

    @property
    def checkpointed_bytes_per_token(self) -> int:
        """With checkpointing: every layer's input, plus one layer's activations during its recomputation."""
        per_layer = 2 * (4 * self.intermediate_size + 12 * self.hidden_size)
        return self.num_layers * 2 * self.hidden_size + per_layer


@dataclass(frozen=True)
class BatchPlan:
    per_device_batch_size: int  # examples per dataloader batch
    gradient_accumulation_steps: int  # dataloader batches per optimizer step
    gradient_checkpointing: bool
    packed: bool  # padding-free, cut into micro-batches of <= micro_batch_tokens
    micro_batch_tokens: int | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _fixed_plan(effective: int, per_device, checkpointing, reason: str) -> BatchPlan:
    micro = CPU_PER_DEVICE_BATCH if per_device == "auto" else int(per_device)
    if effective % micro:  # only reachable with `auto` (an explicit value is validated): odd effective batch
        micro = 1
    return BatchPlan(micro, effective // micro, bool(checkpointing) if checkpointing != "auto" else False,
                     False, None, reason)


def choose_plan(
    *,
    effective_batch_size: int,
    per_device_batch_size,
    gradient_checkpointing,
    micro_batch_tokens,
    cuda: bool,
    total_memory_bytes: int | None = None,
    dims: ModelDims | None = None,
    longest_example_tokens: int = 0,
) -> BatchPlan:
    """The micro-batching of one optimizer step. `auto` values are resolved here; explicit ones are kept.

    An explicit integer `per_device_batch_size` keeps the plain padded setting (micro x accumulation), as before.
    """
    if per_device_batch_size != "auto":
        return _fixed_plan(effective_batch_size, per_device_batch_size, gradient_checkpointing,
                           "per_device_batch_size set in the config")
    if not cuda:
        return _fixed_plan(effective_batch_size, "auto", gradient_checkpointing, "no GPU: earlier CPU settings")
    if os.environ.get(MEMORY_ENV):
        total_memory_bytes = int(float(os.environ[MEMORY_ENV]) * GIB)
    if dims is None or total_memory_bytes is None:
        raise ValueError("choose_plan on a GPU needs the model's dims and the GPU's memory")

    budget = total_memory_bytes * USABLE_FRACTION - dims.weight_bytes - RESERVED_BYTES
    need = max(longest_example_tokens, MIN_MICRO_BATCH_TOKENS)

    def fit(per_token: int) -> int:
        return int(max(budget, 0) // per_token)

    if micro_batch_tokens != "auto":
        tokens = int(micro_batch_tokens)
        if gradient_checkpointing == "auto":
            ckpt = tokens > fit(dims.activation_bytes_per_token)
        else:
            ckpt = bool(gradient_checkpointing)
        return BatchPlan(effective_batch_size, 1, ckpt, True, max(tokens, longest_example_tokens),
                         "micro_batch_tokens set in the config")

    plain, ckpt_tokens = fit(dims.activation_bytes_per_token), fit(dims.checkpointed_bytes_per_token)
    if gradient_checkpointing is True or (gradient_checkpointing == "auto" and plain < need):
        if ckpt_tokens < need:
            raise MemoryError(
                f"the GPU's {total_memory_bytes / GIB:.0f} GiB cannot hold the model ({dims.weight_bytes / GIB:.1f} "
                f"GiB) and a {need}-token micro-batch even with gradient checkpointing; lower max_length"
            )
        return BatchPlan(effective_batch_size, 1, True, True, min(ckpt_tokens, MAX_MICRO_BATCH_TOKENS),
                         f"{plain} tokens fit without checkpointing, {need} needed: checkpointing on")
    tokens = max(min(plain, MAX_MICRO_BATCH_TOKENS), need) if gradient_checkpointing is False else min(
        plain, MAX_MICRO_BATCH_TOKENS)
    return BatchPlan(effective_batch_size, 1, False, True, tokens,
                     f"{plain} tokens fit in {budget / GIB:.1f} GiB without checkpointing")


def split_packed(lengths: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """Cut sequences laid back to back (in order) into runs of at most `max_tokens` tokens.

    Returns (first, end) sequence-index ranges. A sequence longer than `max_tokens` gets a run of its own.
    The order is kept: only where the cuts fall depends on `max_tokens`.
    """
    runs, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and used + n > max_tokens:
            runs.append((start, i))
            start, used = i, 0
        used += n
    if lengths:
        runs.append((start, len(lengths)))
    return runs


def packed_micro_batches(inputs: dict, max_tokens: int) -> list[tuple[dict, list[int]]]:
    """Cut one padding-free collated batch (a single packed row) into micro-batches at sequence boundaries.

    Returns (micro-batch, token offsets of its sequences [0, ..., T]) pairs."""
    import torch

    position_ids = inputs["position_ids"]
    if position_ids.shape[0] != 1:
        raise ValueError("expected one packed row (padding-free collation)")
    total = position_ids.shape[1]
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    bounds = starts + [total]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    chunks = []
    for first, end in split_packed(lengths, max_tokens):
        lo, hi = bounds[first], bounds[end]
        chunk = {k: inputs[k][:, lo:hi] for k in ("input_ids", "labels", "position_ids")}
        if "cu_seq_lens_q" in inputs:  # sequence boundaries for varlen attention kernels
            cu = torch.tensor([b - lo for b in bounds[first:end + 1]], dtype=torch.int32,
                              device=inputs["cu_seq_lens_q"].device)
            chunk["cu_seq_lens_q"] = chunk["cu_seq_lens_k"] = cu
            chunk["max_length_q"] = chunk["max_length_k"] = int(max(lengths[first:end]))
        if "seq_idx" in inputs:
            chunk["seq_idx"] = inputs["seq_idx"][:, lo:hi] - first
        chunks.append((chunk, [b - lo for b in bounds[first:end + 1]]))
    return chunks


def sampling_batch_size(setting, n_items: int, *, cuda: bool, total_memory_bytes: int | None = None,
                        weight_bytes: int = 0, kv_bytes_per_token: int = 0, tokens_per_sequence: int = 0,
                        vocab_size: int = 0) -> int:
    """Responses per `generate` call. `auto`: on CPU 32; on a GPU as many as the KV cache fits (all, on an
    80 GB or 64 GB card for the standard 8 x 50 x 600 evaluation), split into equal batches when they do not."""
    if setting != "auto":
        return int(setting)
    if not cuda:
        return 32
    # static KV cache for the whole sequence + fp32 logits, probabilities and sampling scratch for one position
    per_sequence = kv_bytes_per_token * tokens_per_sequence + 4 * 4 * vocab_size
    budget = total_memory_bytes * USABLE_FRACTION - weight_bytes - RESERVED_BYTES
    fit = max(1, int(budget // per_sequence))
    n_batches = -(-n_items // fit)
    return -(-n_items // n_batches)
