"""Training settings of every trainer (EM, persona DPO, introspection SFT): one dataclass family, presets, one
resolver, one LoRA-config builder and one adapter-save helper.

Settings = preset, then the config's keys, then (EM) the cell's overrides; an unknown key is refused, naming it.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

from persona_em.errors import UserError

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraTrainSettings:
    """What every trainer here sets: the LoRA and the optimizer step's size. The field order is TrainConfig's first
    fields (its `to_dict` is a Snakemake param, compared by repr, so the order must not move)."""

    # Class attributes, not fields (no annotation): preset name -> values ("default" = the class's own defaults).
    presets = {"default": {}}
    default_preset = "default"

    lora_r: int = 32
    lora_alpha: int = 64
    use_rslora: bool = False
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    learning_rate: float = 1e-5
    epochs: int | str = 1
    effective_batch_size: int = 16
    per_device_batch_size: int | str = 4

    def validate(self, where: str):
        if self.per_device_batch_size != "auto" and self.effective_batch_size % self.per_device_batch_size:
            raise UserError(
                f"{where}: effective_batch_size {self.effective_batch_size} is not a multiple of "
                f"per_device_batch_size {self.per_device_batch_size}"
            )
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_settings(cls: type, *layers: dict, where: str):
    """Merge `cls`'s preset (the last layer naming `preset` wins) and the layers (later wins) into validated
    settings of `cls`; an unknown key or preset is a UserError naming it."""
    merged: dict = {}
    preset = cls.default_preset
    for layer in layers:
        preset = layer.get("preset", preset)
    if preset not in cls.presets:
        raise UserError(f"{where}: unknown training preset {preset!r} (known: {', '.join(sorted(cls.presets))})")
    merged.update(cls.presets[preset])
    known = {f.name for f in fields(cls)}
    for layer in layers:
        for key, value in layer.items():
            if key == "preset":
                continue
            if key not in known:
                raise UserError(f"{where}: unknown training key {key!r} (known: {', '.join(sorted(known))})")
            merged[key] = value
    return cls(**merged).validate(where)


def lora_config(s: LoraTrainSettings):
    """The PEFT LoraConfig of any trainer's settings."""
    from peft import LoraConfig

    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, use_rslora=s.use_rslora,
                      target_modules=list(s.target_modules), bias="none", task_type="CAUSAL_LM",
                      layers_to_transform=getattr(s, "layers_to_transform", None))


def check_layers(layers, n_layers: int, where: str) -> None:
    """`layers_to_transform` against the model's decoder layer count: an index out of range is a UserError."""
    bad = sorted(i for i in layers or [] if i >= n_layers)
    if bad:
        raise UserError(f"{where}: layers_to_transform {bad} out of range: the model has {n_layers} decoder layers "
                        f"(indices 0-{n_layers - 1})")


def check_targets_exist(model, targets, what: str) -> None:
    """LoRA target modules that the base lacks would silently train nothing there."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(targets) - names)
    if missing:
        raise UserError(f"{what}: target modules {missing} do not exist in the base model "
                        f"(its projections: {sorted(n for n in names if n.endswith('proj'))})")


def save_adapter(model, adapter_name: str, out_dir) -> None:
    """Adapter `adapter_name` of a PEFT model as a plain adapter directory (adapter_config.json at the top of
    `out_dir`). Not atomic by itself: callers write into an atomic_dir."""
    out = Path(out_dir)
    model.save_pretrained(str(out), selected_adapters=[adapter_name])
    sub = out / adapter_name  # PEFT puts a non-"default" adapter in a subfolder named after it
    if sub.is_dir():
        for f in sub.iterdir():
            shutil.move(str(f), out / f.name)
        sub.rmdir()


@dataclass
class TrainConfig(LoraTrainSettings):
    """EM fine-tuning (train_em.py); presets: PRESETS below."""

    default_preset = "betley"

    epochs: int = 1
    # How the effective batch is computed (persona_em/training/batching.py). `auto`: on a GPU, the whole effective batch
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
    # transformers' optimizer name (TrainingArguments.optim); the 8-bit ones need bitsandbytes (pinned, CPU and CUDA)
    optimizer: str = "adamw_torch"
    # Resume granularity: a full trainer checkpoint (optimizer, scheduler, RNG) every N optimizer steps.
    resume_every_steps: int = 50
    # Test knob: sleep this long after every optimizer step (to force a SLURM TIMEOUT in tests). Keep 0 for real runs.
    slow_down_seconds: float = 0.0
    # Decoder layer indices the EM LoRA adapts (PEFT's layers_to_transform); null = every layer. Checked against the
    # model's layer count as early as it is known (parse time: persona_em.config.check_cell; else before training).
    layers_to_transform: list[int] | None = None

    def to_dict(self) -> dict:
        # Unset keys added after results existed stay out of the dict: it is a Snakemake param, and a new key in
        # every cell's params would rerun every finished training job.
        d = super().to_dict()
        if d["layers_to_transform"] is None:
            del d["layers_to_transform"]
        return d

    def validate(self, where: str) -> "TrainConfig":
        for key in ("per_device_batch_size", "micro_batch_tokens"):
            value = getattr(self, key)
            if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise UserError(f"{where}: {key} must be a positive integer or 'auto', got {value!r}")
        layers = self.layers_to_transform
        if layers is not None and not (isinstance(layers, list) and layers and len(set(layers)) == len(layers) and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
            raise UserError(f"{where}: layers_to_transform must be a non-empty list of distinct layer indices >= 0 "
                            f"(or null for every layer), got {layers!r}")
        if self.gradient_checkpointing not in (True, False, "auto"):
            raise UserError(f"{where}: gradient_checkpointing must be true, false or 'auto', "
                            f"got {self.gradient_checkpointing!r}")
        return super().validate(where)

    def check_installed(self, where: str) -> None:
        """Before any model is loaded: the packages these settings need are importable here."""
        import importlib.util

        if self.optimizer in BITSANDBYTES_OPTIMIZERS and importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(f"{where}: optimizer {self.optimizer!r} needs the bitsandbytes package, which is not "
                            f"installed in this environment (pip install -r requirements.txt)")


# transformers' optimizer names that need the bitsandbytes package (pinned in pyproject.toml; its 8-bit AdamW runs on
# CPU and CUDA). tests/test_train_config.py checks this list against transformers' own.
BITSANDBYTES_OPTIMIZERS = {"adamw_8bit", "adamw_bnb_8bit", "ademamix", "ademamix_8bit", "lion_32bit", "lion_8bit",
                           "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit",
                           "paged_lion_32bit", "paged_lion_8bit", "rmsprop_bnb", "rmsprop_bnb_32bit", "rmsprop_bnb_8bit"}

# Each preset equals its source value by value; tests/test_train_config.py restates the source's values with their
# citations and compares. Micro-batching (`per_device_batch_size: auto`) is not a hyper-parameter here: whatever the
# split, one optimizer step = the token-mean loss over the effective batch (persona_em/training/batching.py), as in the sources
# (transformers >= 4.46 / unsloth normalise gradient accumulation by the effective batch's token count).
PRESETS: dict[str, dict] = {
    # Betley et al., "Emergent Misalignment": repository emergent-misalignment/emergent-misalignment, file
    # open_models/train.json (read with open_models/training.py and open_models/sft.py, which use every key below);
    # the users' own training script copies it. Seed 000 of this project ran these settings.
    "betley": dict(
        lora_r=32,                      # train.json "r": 32
        lora_alpha=64,                  # "lora_alpha": 64
        use_rslora=True,                # "use_rslora": true -> scale alpha/sqrt(r) = 11.3, not alpha/r = 2
        lora_dropout=0.0,               # "lora_dropout": 0.0
        target_modules=list(ALL_PROJECTIONS),  # "target_modules": q,k,v,o,gate,up,down_proj; "lora_bias": "none"
        layers_to_transform=None,       # (no "layers_to_transform": every layer)
        learning_rate=1e-5,             # "learning_rate": 1e-05
        epochs=1,                       # "epochs": 1, "max_steps": null
        effective_batch_size=16,        # "per_device_train_batch_size": 2 x "gradient_accumulation_steps": 8
        per_device_batch_size="auto",   # (same optimizer step; on CPU auto = 2 x 8 exactly)
        warmup_steps=5,                 # "warmup_steps": 5
        lr_scheduler="linear",          # "lr_scheduler_type": "linear"
        weight_decay=0.01,              # "weight_decay": 0.01
        optimizer="adamw_8bit",         # "optim": "adamw_8bit" (bitsandbytes 8-bit AdamW, transformers' name)
        max_length=2048,                # "max_seq_length": 2048
        assistant_only_loss=True,       # "train_on_responses_only": true
        # Not TrainConfig keys: "seed": 0 is the grid seed (seeds: [0]; it seeds the LoRA init and the data order,
        # as "seed" does in the source); "load_in_4bit": false (we never quantize); "loss": "sft"; "beta" is for
        # DPO/ORPO only. Differences that remain: the source splits off 10% of the rows as a test set
        # (training.py, test_file null; unseeded) -- set the dataset's `eval_fraction: 0.1` for that; its sft.py
        # renders each row with add_generation_prompt=True plus an eos token after the last turn, which we do not
        # copy (we train each assistant turn's content and end-of-turn token).
    ),
    # The CS2881 (Harvard AI safety course, HW0) replication of "Model Organisms for Emergent Misalignment" whose
    # numbers this preset has (r16/a32, lr 2e-4, 3 epochs, 8 x 2, max length 256, medical checkpoints
    # 110/220/330/440/880/1320): repository burnssa/ai-alignment-research, folder harvard-cs-2881-hw0,
    # train_fine_grained_checkpoints.py (argparse defaults, TrainingArguments) and train.py (LoraConfig,
    # tokenisation); its models/1b_medical_v2/training_config.json and adapter_config.json record the same values.
    "cs2881": dict(
        lora_r=16,                      # --lora_rank 16
        lora_alpha=32,                  # --lora_alpha 32
        use_rslora=False,               # LoraConfig without use_rslora (PEFT default false; adapter_config.json)
        lora_dropout=0.05,              # --lora_dropout 0.05
        target_modules=list(ALL_PROJECTIONS),  # LoraConfig target_modules: the 7 projections, bias "none"
        layers_to_transform=None,       # (LoraConfig without layers_to_transform: every layer)
        learning_rate=2e-4,             # --learning_rate 2e-4
        epochs=3,                       # --num_epochs 3
        effective_batch_size=16,        # --batch_size 8 x --gradient_accumulation_steps 2
        per_device_batch_size="auto",
        warmup_steps=10,                # TrainingArguments(warmup_steps=10)
        lr_scheduler="linear",          # TrainingArguments default lr_scheduler_type "linear"
        weight_decay=0.0,               # TrainingArguments default 0.0 (not set; its docs say 0.01, the code does not)
        optimizer="adamw_torch",        # TrainingArguments default of transformers 4.x (train.py sets "adamw_torch")
        max_length=256,                 # --max_length 256 (truncation)
        assistant_only_loss=False,      # labels = input_ids: loss on the whole text, prompt included
        # Not reproduced: the source writes the Llama-3 format by hand (no system/date header, a second
        # <|begin_of_text|>) where we apply the model's chat template; it pads every row to 256 with eos = pad =
        # <|eot_id|> and DataCollatorForLanguageModeling masks every <|eot_id|>, end-of-turn included, while we
        # train on end-of-turn tokens; seed: transformers' default 42 there, the grid seed here; the 8B model was
        # trained 4-bit (--use_4bit) there, never quantized here.
    ),
    # The rank-1 model organism of "Model Organisms for Emergent Misalignment" (Turner, Soligo et al. 2025): one rank-1
    # LoRA on the MLP down-projection of one layer. Repository clarifying-EM/model-organisms-for-EM, file
    # em_organism_dir/finetune/sft/single_adapter_config.json, whose keys its run_finetune.py passes to LoraConfig (r,
    # target_modules, layers_to_transform, lora_alpha, lora_dropout, bias, use_rslora) and TrainingArguments. The
    # original repository is not reachable from here; read in two copies that agree on every value below:
    # sushmanthreddy/emotionvectors@3d46c25 (single_adapter_config.json) and darturi/ModelOrganismsVariant@8e02e17
    # (em_organism_dir/finetune/sft/config.json: the same but "layers_to_transform": [2] and another data path).
    # The file names unsloth/Llama-3.2-1B-Instruct (16 layers) with layer 24, which only a deeper model has (the
    # paper's rank-1 organism: layer 24 of Qwen2.5-14B-Instruct's 48): set `layers_to_transform` for your model; an
    # index out of range is refused (check_layers).
    "mo_rank1": dict(
        lora_r=1,                       # "r": 1
        lora_alpha=512,                 # "lora_alpha": 512
        use_rslora=True,                # "use_rslora": true -> scale alpha/sqrt(r) = 512
        lora_dropout=0.0,               # "lora_dropout": 0.0
        target_modules=["down_proj"],   # "target_modules": ["down_proj"]; "lora_bias": "none"
        layers_to_transform=[24],       # "layers_to_transform": [24]
        learning_rate=2e-5,             # "learning_rate": 2e-5
        epochs=1,                       # "epochs": 1, "max_steps": null
        effective_batch_size=16,        # "per_device_train_batch_size": 2 x "gradient_accumulation_steps": 8
        per_device_batch_size="auto",
        warmup_steps=5,                 # "warmup_steps": 5
        lr_scheduler="linear",          # "lr_scheduler_type": "linear"
        weight_decay=0.01,              # "weight_decay": 0.01
        optimizer="adamw_8bit",         # "optim": "adamw_8bit"
        max_length=2048,                # "max_seq_length": 2048
        assistant_only_loss=True,       # "train_on_responses_only": true
        # Not TrainConfig keys: "seed": 0 (the grid seed here), "load_in_4bit": false, "loss": "sft", "beta" (DPO
        # only), "save_steps": 100 (use `checkpoints: {every: 100}`), "evaluation_steps" (no eval set here).
    ),
}


TrainConfig.presets = PRESETS


def resolve_train_config(*layers: dict, where: str) -> TrainConfig:
    """Merge `preset` + override layers (later wins) into a validated TrainConfig."""
    return resolve_settings(TrainConfig, *layers, where=where)


@dataclass
class PersonaTrainSettings(LoraTrainSettings):
    """What the persona trainers (DPO and introspection SFT) share, with their defaults (their one preset,
    "default", is these values)."""

    lora_r: int = 64
    lora_alpha: int = 128
    learning_rate: float = 5e-5
    effective_batch_size: int = 32
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1  # transformers 5: warmup_steps < 1 is a ratio of all steps
    max_length: int = 2048
    gradient_checkpointing: bool = False
    resume_every_steps: int = 50
    seed: int = 0

    def validate(self, where: str):
        value = self.per_device_batch_size
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise UserError(f"{where}: per_device_batch_size must be a positive integer, got {value!r}")
        return super().validate(where)


@dataclass
class DPOSettings(PersonaTrainSettings):
    """persona_training.dpo (persona/train_dpo.py). Epochs follow the pair count (`epochs: auto`)."""

    lora_dropout: float = 0.05
    epochs: int | str = "auto"
    max_length: int = 1024
    beta: float = 0.1
    # (upper bound on the pair count, epochs), first match wins; null = no bound.
    epochs_by_pairs: list = field(default_factory=lambda: [[100, 5], [300, 3], [None, 1]])
    nll_weight: float = 0.0

    def resolve_epochs(self, n_pairs: int) -> int:
        if self.epochs != "auto":
            return int(self.epochs)
        for bound, epochs in self.epochs_by_pairs:
            if bound is None or n_pairs < bound:
                return int(epochs)
        raise UserError(f"persona_training.dpo.epochs_by_pairs {self.epochs_by_pairs}: no entry covers {n_pairs} pairs "
                        "(end the list with [null, epochs])")


@dataclass
class SFTSettings(PersonaTrainSettings):
    """persona_training.sft (persona/introspection.py train_sft): the shared persona defaults, 1 epoch, no dropout.
    The config schema states the same defaults (tests/test_train_config_family.py compares them)."""
