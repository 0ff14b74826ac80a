"""Dense weight trajectories: `checkpoints.trace_every: N` saves the EM adapter's tensors (safetensors, no config, never
sampled) every N optimizer steps during EM training, into <checkpoints>/trace/step-NNNNNN.safetensors, for
persona_em/analysis/weights.py.

Size guard: snapshots = ⌊last step / N⌋ × EM adapter parameters × bytes per parameter; more than
`checkpoints.trace_max_gb` (default DEFAULT_MAX_GB) is refused with one line: at parse time where the model's shape and
the dataset's rows are known without loading anything (persona_em.config.check_cell), else before the first training
step (train_em, exact parameter count).
"""
from __future__ import annotations

import math
from pathlib import Path

from persona_em.errors import UserError

DEFAULT_MAX_GB = 5.0
TRACE_DIR = "trace"  # inside a cell's checkpoints folder
TRACE_KEYS = ("trace_every", "trace_max_gb")


def trace_every(spec: dict) -> int | None:
    return spec.get("trace_every")


def trace_steps(last_step: int, every: int) -> list[int]:
    return list(range(every, last_step + 1, every))


def check_trace_size(spec: dict, n_params: int, bytes_per_param: int, last_step: int, where: str) -> None:
    every = trace_every(spec)
    if not every:
        return
    limit = float(spec.get("trace_max_gb", DEFAULT_MAX_GB))
    n = len(trace_steps(last_step, every))
    size = n * n_params * bytes_per_param / 1e9
    if size > limit:
        raise UserError(f"{where}.trace_every: {every} would write {n} adapter snapshots of {n_params:,} parameters = "
                        f"{size:.1f} GB, over checkpoints.trace_max_gb {limit:g} GB (raise trace_every or "
                        f"trace_max_gb)")


# Shapes of the projections of Llama / Qwen / Gemma-style decoders, from a Hugging Face config.json: (d_in, d_out).
def projection_shapes(cfg: dict) -> dict[str, tuple[int, int]] | None:
    try:
        h, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    except KeyError:
        return None
    head_dim = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    return {"q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim), "v_proj": (h, kv * head_dim),
            "o_proj": (heads * head_dim, h), "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def lora_params(cfg: dict, settings: dict) -> int | None:
    """EM LoRA parameters for a model config.json and training settings; None where a target's shape is unknown."""
    shapes = projection_shapes(cfg)
    if shapes is None or any(m not in shapes for m in settings["target_modules"]):
        return None
    layers = settings.get("layers_to_transform") or range(cfg["num_hidden_layers"])
    r = settings["lora_r"]
    return len(layers) * sum(r * sum(shapes[m]) for m in settings["target_modules"])


def save_snapshot(model, adapter_name: str, path: Path) -> None:
    """The adapter's LoRA tensors as one safetensors file, atomically."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from persona_em.io import atomic_path

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))


def adapter_params(model, adapter_name: str) -> tuple[int, int]:
    """(parameters, bytes per parameter) of one adapter of a PEFT model."""
    params = [p for n, p in model.named_parameters() if f".{adapter_name}." in n and "lora_" in n]
    return sum(p.numel() for p in params), (params[0].element_size() if params else 4)


def steps_for(rows: int, settings: dict) -> int:
    return math.ceil(rows / settings["effective_batch_size"]) * int(settings["epochs"])
