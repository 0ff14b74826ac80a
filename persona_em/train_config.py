"""Training hyper-parameters as a dataclass, with the named presets of the seed studies.

A cell's training settings = preset, then `training:` keys from the config, then the cell's overrides.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from .errors import UserError

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    lora_r: int = 32
    lora_alpha: int = 64
    use_rslora: bool = False
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    learning_rate: float = 1e-5
    epochs: int = 1
    effective_batch_size: int = 16
    # How the effective batch is computed (persona_em/batching.py). `auto`: on a GPU, the whole effective batch
    # packed padding-free and cut into micro-batches sized from the GPU's memory; on CPU, 2 per micro-batch.
    # An integer: that many examples per padded micro-batch, grad-accumulation = effective / micro (as before).
    # Either way the optimizer step is the same: loss = mean over the effective batch's trainable tokens.
    per_device_batch_size: int | str = "auto"
    # Tokens per packed micro-batch (GPU `auto` plan only): auto = from the GPU's memory, capped at 4096.
    micro_batch_tokens: int | str = "auto"
    warmup_steps: int = 5
    lr_scheduler: str = "linear"
    weight_decay: float = 0.01
    max_length: int = 2048
    assistant_only_loss: bool = True  # False reproduces training on the whole text
    gradient_checkpointing: bool | str = "auto"  # auto: on only when a micro-batch would not fit without it
    optimizer: str = "adamw_torch"
    # Resume granularity: a full trainer checkpoint (optimizer, scheduler, RNG) every N optimizer steps.
    resume_every_steps: int = 50
    # Test knob: sleep this long after every optimizer step (to force a SLURM TIMEOUT in tests). Keep 0 for real runs.
    slow_down_seconds: float = 0.0

    def validate(self, where: str) -> "TrainConfig":
        for key in ("per_device_batch_size", "micro_batch_tokens"):
            value = getattr(self, key)
            if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise UserError(f"{where}: {key} must be a positive integer or 'auto', got {value!r}")
        if self.gradient_checkpointing not in (True, False, "auto"):
            raise UserError(f"{where}: gradient_checkpointing must be true, false or 'auto', "
                            f"got {self.gradient_checkpointing!r}")
        if self.per_device_batch_size == "auto":
            return self
        if self.effective_batch_size % self.per_device_batch_size:
            raise UserError(
                f"{where}: effective_batch_size {self.effective_batch_size} is not a multiple of "
                f"per_device_batch_size {self.per_device_batch_size}"
            )
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # What seed 000 ran (Betley et al. settings).
    "betley": dict(
        lora_r=32, lora_alpha=64, use_rslora=False, lora_dropout=0.0, target_modules=list(ALL_PROJECTIONS),
        learning_rate=1e-5, epochs=1, effective_batch_size=16, per_device_batch_size="auto", warmup_steps=5,
        lr_scheduler="linear", weight_decay=0.01, max_length=2048, assistant_only_loss=True,
    ),
    # The CS2881 replication.
    "cs2881": dict(
        lora_r=16, lora_alpha=32, learning_rate=2e-4, epochs=3, effective_batch_size=16, per_device_batch_size="auto",
        max_length=256, assistant_only_loss=True,
    ),
}


def resolve_train_config(*layers: dict, where: str) -> TrainConfig:
    """Merge `preset` + override layers (later wins) into a validated TrainConfig."""
    merged: dict = {}
    preset = "betley"
    for layer in layers:
        preset = layer.get("preset", preset)
    if preset not in PRESETS:
        raise UserError(f"{where}: unknown training preset {preset!r} (known: {', '.join(sorted(PRESETS))})")
    merged.update(PRESETS[preset])
    known = {f.name for f in fields(TrainConfig)}
    for layer in layers:
        for key, value in layer.items():
            if key == "preset":
                continue
            if key not in known:
                raise UserError(f"{where}: unknown training key {key!r} (known: {', '.join(sorted(known))})")
            merged[key] = value
    return TrainConfig(**merged).validate(where)
