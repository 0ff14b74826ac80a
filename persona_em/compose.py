"""Composition of the persona adapter with the EM adapter: the one place that decides which adapters are ON.

Modes (the `composition` key of every cell):
  none         no persona: base + EM LoRA.
  merged       persona merged into the base weights, then a fresh EM LoRA on top.
  stacked      persona loaded frozen + EM LoRA trainable, BOTH active in every forward pass.
  persona_off  persona loaded but switched off (only EM active): a named control reproducing the users' old bug,
               where `set_adapter("em")` silently disabled the persona.
  posthoc      EM trained without the persona (base + EM LoRA, as `none`), the persona switched on only at
               sampling (persona + EM both active): separates "protects during training" from "masks at inference".

Training and sampling both build their model through `compose`, and `check_composition` compares the adapters
that the LoRA layers actually run with what the mode requires in that stage, so a persona cannot be silently OFF
(or ON). The EM adapter's initialisation depends only on the seed (`compose_for_training(seed=...)` seeds torch right
before the adapter is created, after any persona is loaded), so every composition of one seed starts from the same
EM tensors.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from persona_em.errors import UserError

EM = "em"
PERSONA = "persona"
MERGED_MARKER = "persona_em_merged_persona"  # set on the model config when a persona is merged into the weights


COMPOSITIONS = ("none", "merged", "stacked", "persona_off", "posthoc")


def expected_active(composition: str, em_name: str = EM, *, training: bool) -> list[str]:
    """The adapters `composition` runs in training (training=True) or in sampling."""
    if composition not in COMPOSITIONS:
        raise UserError(f"unknown composition {composition!r} (known: {', '.join(COMPOSITIONS)})")
    persona_on = composition == "stacked" or (composition == "posthoc" and not training)
    return sorted([PERSONA, em_name] if persona_on else [em_name])


def inner_model(model):
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _held(layer) -> list[str]:
    """The adapters a LoRA layer holds: PEFT keeps an embedding layer's in lora_embedding_A, not lora_A."""
    return [*layer.lora_A, *getattr(layer, "lora_embedding_A", {})]


def _applied(layer) -> list[str]:
    """The adapters a LoRA layer applies in a forward pass."""
    return [a for a in _held(layer) if not layer.disable_adapters and a in layer.active_adapters]


def active_adapters(model) -> list[str]:
    """Adapters the LoRA layers actually apply in a forward pass, read from the layers themselves.

    An adapter counts as active when every layer that holds it applies it (a persona may target fewer modules than
    the EM adapter, so layers need not hold the same adapters). Raises if some layers apply an adapter that other
    layers holding it do not.
    """
    from peft.tuners.lora import LoraLayer

    on: dict[str, set[bool]] = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            applied = _applied(module)
            for name in _held(module):
                on.setdefault(name, set()).add(name in applied)
    mixed = sorted(name for name, states in on.items() if len(states) > 1)
    if mixed:
        raise RuntimeError(f"LoRA layers disagree on whether adapters {mixed} are active")
    return sorted(name for name, states in on.items() if states == {True})


def merged_persona(model) -> str | None:
    from peft import PeftModel

    base = model.base_model.model if isinstance(model, PeftModel) else model
    return getattr(base.config, MERGED_MARKER, None)


def describe(model) -> dict:
    """What the model really runs, for every output row: active adapters and any persona merged into the weights."""
    return {"active_adapters": active_adapters(model), "merged_persona": merged_persona(model)}


def check_composition(model, composition: str, persona: str, em_name: str = EM, *, training: bool) -> dict:
    """Fail loudly unless the model runs exactly the adapters `composition` requires in training / in sampling."""
    state = describe(model)
    want = expected_active(composition, em_name, training=training)
    want_merged = persona if composition == "merged" else None
    if state["active_adapters"] != want or state["merged_persona"] != want_merged:
        raise RuntimeError(
            f"composition {composition!r} needs active adapters {want} and merged persona {want_merged!r} "
            f"in {'training' if training else 'sampling'}, "
            f"but the model runs {state['active_adapters']} with merged persona {state['merged_persona']!r}"
        )
    return state


def check_target_modules(model, adapter_dir: str | Path, what: str) -> None:
    """An adapter whose target modules do not exist in the base would silently train/apply nothing there."""
    from peft import PeftConfig

    cfg = PeftConfig.from_pretrained(str(adapter_dir))
    targets = cfg.target_modules
    if isinstance(targets, str):  # a regex: PEFT itself fails if nothing matches
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(targets or []) - names)
    if missing:
        raise UserError(
            f"{what} at {adapter_dir} targets modules {missing} that the base model does not have "
            f"(its linear layers include: {sorted(n for n in names if n.endswith('proj'))})"
        )


def load_persona(base, persona_dir: str | Path, persona: str):
    """`base` with the persona adapter `persona_dir` on top, frozen, under the adapter name PERSONA."""
    persona_dir = Path(persona_dir)
    if not (persona_dir / "adapter_config.json").exists():
        raise UserError(f"persona {persona!r}: no adapter_config.json in {persona_dir}")
    check_target_modules(base, persona_dir, f"persona adapter {persona!r}")
    return load_adapter(base, persona_dir, PERSONA, f"persona adapter {persona!r}")


# Adapter tensors of a vision-language model's other parts: they do nothing for text, and the text-only language
# model that load_model gives has no module for them.
_NOT_LANGUAGE_MODEL = ("vision_tower.", "vision_model.", "multi_modal_projector.")


def load_adapter(model, adapter_dir: str | Path, name: str, what: str, trainable: bool = False):
    """`model` (a base model or a PeftModel) with the adapter in `adapter_dir` loaded as adapter `name`, checked.

    PEFT only warns when an adapter file's tensors do not fit the model's module names, and leaves the adapter at its
    initialisation: B = 0, a persona silently off (or random A and B, where the config says init_lora_weights:
    false). Here every tensor of the file must land in the adapter and every tensor of the adapter must come from the
    file, with the file's values; otherwise a UserError names the adapter and the keys. An adapter trained on a
    vision-language model (Gemma 3 4B-27B) is read with its language model's weights under the text-only names
    load_model uses; its vision-tower tensors are left out (they never act on text)."""
    from peft import PeftModel

    from persona_em.models import LANGUAGE_MODEL_KEYS

    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=trainable, key_mapping=LANGUAGE_MODEL_KEYS)
    else:
        model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name, is_trainable=trainable,
                                          key_mapping=LANGUAGE_MODEL_KEYS)
    check_loaded(model, name, _adapter_file_tensors(adapter_dir), f"{what} at {adapter_dir}")
    return model


def check_loaded(model, name: str, stored: dict, what: str) -> None:
    """Adapter `name` of `model` holds exactly the tensors `stored` (an adapter file's, under PEFT's saved names)."""
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    extra = sorted(k for k in set(stored) - set(loaded)
                   if not any(p in k for p in _NOT_LANGUAGE_MODEL) and not k.endswith("base_layer.weight"))
    missing = sorted(set(loaded) - set(stored))
    differ = sorted(k for k in set(loaded) & set(stored) if not _same_tensor(loaded[k], stored[k]))
    if extra or missing or differ:
        raise UserError(f"{what} does not fit the model's modules: "
                        + "; ".join(f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                                    for label, keys in (("tensors matching no module", extra),
                                                        ("adapter tensors not in the file", missing),
                                                        ("tensors loaded with other values", differ)) if keys))


def _adapter_file_tensors(adapter_dir: str | Path) -> dict:
    """The adapter file's tensors under the names PEFT loads them by (language-model keys mapped as load_adapter)."""
    from peft.utils.save_and_load import load_peft_weights

    from persona_em.models import LANGUAGE_MODEL_KEYS

    return load_peft_weights(str(adapter_dir), device="cpu", key_mapping=LANGUAGE_MODEL_KEYS)


def _same_tensor(a, b) -> bool:
    """The loaded adapter tensor equals the file's (PEFT may hold it in another dtype: compared in the loaded one)."""
    import torch

    a = a.detach()
    return a.shape == b.shape and torch.equal(a, b.to(device=a.device, dtype=a.dtype))


def tied_lora_layers(model) -> list[str]:
    """LoRA layers of `model` whose base weight another module shares (tied input embeddings and lm_head): adding
    an adapter's delta to that weight, as a merge or a fold does, would change the other module too."""
    from collections import Counter

    from peft.tuners.lora import LoraLayer

    inner = inner_model(model)
    uses = Counter(id(p) for _, p in inner.named_parameters(remove_duplicate=False))
    return [name for name, m in inner.named_modules()
            if isinstance(m, LoraLayer) and uses[id(m.get_base_layer().weight)] > 1]


def merge_lora(model, what: str):
    """PEFT's merge_and_unload, refused where an adapter sits on tied weights (PEFT only warns there, and the
    merge changes the tied module too: tests/test_compose.py)."""
    tied = tied_lora_layers(model)
    if tied:
        raise UserError(f"{what} has LoRA layers on weights the base model ties to another module "
                        f"({', '.join(tied)}): merging it would change both. Use an adapter without those modules"
                        f" (or, for a persona, the stacked composition)")
    return model.merge_and_unload()


def _merge_persona(base, persona_dir, persona: str):
    merged = merge_lora(load_persona(base, persona_dir, persona), f"persona {persona!r} ({persona_dir})")
    setattr(merged.config, MERGED_MARKER, persona)
    return merged


def _activate(model, composition: str, em_name: str, *, training: bool) -> None:
    # PeftModel.set_adapter takes a single name; the tuner's set_adapter takes a list and activates all of them.
    model.base_model.set_adapter(expected_active(composition, em_name, training=training))


def _seed(seed: int | None) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)


def compose_for_training(base, persona: str, persona_dir, composition: str, em_lora_config, seed: int | None = None):
    """A PeftModel whose only trainable parameters are the fresh EM adapter, with the persona as `composition` says.

    `seed` (the cell's grid seed) seeds torch right before the EM adapter is created: loading or merging a persona
    draws random numbers too (PEFT initialises an adapter's layers before loading its weights), so seeding any
    earlier would give the EM adapter of a persona cell another initialisation than the no-persona cell's.
    """
    from peft import get_peft_model

    if composition in ("none", "posthoc"):  # posthoc: the persona joins only at sampling
        _seed(seed)
        model = get_peft_model(base, em_lora_config, adapter_name=EM)
    elif composition == "merged":
        merged = _merge_persona(base, persona_dir, persona)
        _seed(seed)
        model = get_peft_model(merged, em_lora_config, adapter_name=EM)
    else:
        model = load_persona(base, persona_dir, persona)
        _seed(seed)
        model.add_adapter(EM, em_lora_config)
        _activate(model, composition, EM, training=True)
    if PERSONA in model.peft_config:
        model.set_requires_grad(PERSONA, requires_grad=False)
    model.set_requires_grad(EM, requires_grad=True)
    check_composition(model, composition, persona, training=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not trainable or any(f".{EM}." not in n for n in trainable):
        raise RuntimeError(f"only the EM adapter may be trainable; trainable: {sorted(trainable)[:5]}...")
    return model


def reactivate(model, composition: str, persona: str, em_name: str = EM) -> None:
    """Re-assert the composition after anything that may have switched adapters (e.g. loading a checkpoint)."""
    _activate(model, composition, em_name, training=True)
    # PEFT's set_adapter makes every adapter it activates trainable: freeze the persona again, or a resumed run
    # would train it (and its optimizer state would not match the checkpoint's).
    if PERSONA in model.peft_config:
        model.set_requires_grad(PERSONA, requires_grad=False)
    check_composition(model, composition, persona, em_name, training=True)


def compose_for_sampling(base, persona: str, persona_dir, composition: str):
    """The base with the persona composed as `composition` says; EM checkpoints are then added by `use_em_adapter`."""
    if composition == "merged":
        return _merge_persona(base, persona_dir, persona)
    if composition in ("stacked", "persona_off", "posthoc"):
        return load_persona(base, persona_dir, persona)
    return base


def use_em_adapter(model, em_dir: str | Path, name: str, composition: str, persona: str):
    """Load one EM checkpoint as adapter `name` and make the active set exactly what `composition` requires.

    Returns the (possibly newly wrapped) model. Other EM adapters are deleted so only one checkpoint's weights are
    ever in memory beside the base. When adapter `name` already exists with the same LoRA shape, the checkpoint's
    weights are copied into it in place: the modules and tensors stay the same objects, so a compiled,
    graph-captured forward stays valid from one checkpoint to the next.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel) and name in model.peft_config and _same_lora_shape(model, em_dir, name):
        _load_weights_in_place(model, em_dir, name)
    else:
        if isinstance(model, PeftModel) and name in model.peft_config:
            model.delete_adapter(name)
        model = load_adapter(model, em_dir, name, f"EM checkpoint {name!r}")
    _activate(model, composition, name, training=False)
    for old in [a for a in model.peft_config if a not in (PERSONA, name)]:
        model.delete_adapter(old)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    check_composition(model, composition, persona, em_name=name, training=False)
    return model


def _same_lora_shape(model, em_dir, name: str) -> bool:
    from peft import PeftConfig

    new, old = PeftConfig.from_pretrained(str(em_dir)), model.peft_config[name]
    keys = ("r", "lora_alpha", "use_rslora", "target_modules", "bias", "use_dora")
    norm = lambda v: sorted(v) if isinstance(v, (set, list)) else v  # noqa: E731
    return all(norm(getattr(new, k, None)) == norm(getattr(old, k, None)) for k in keys)


def _load_weights_in_place(model, em_dir, name: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(em_dir) / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, state, adapter_name=name)
    check_loaded(model, name, state, f"EM checkpoint {name!r} at {em_dir}")


class FoldedAdapters:
    """Sampling runs the active adapters folded into the base weights, on the plain transformers model.

    `with folded.applied(model) as plain:` yields the transformers model inside `model` (a PeftModel) with every LoRA
    layer replaced by its base layer, whose weight is W + sum over the adapters the layer applies (`active_adapters`:
    read from the layers, so exactly what `check_composition` checked) of PEFT's own delta s * B @ A, summed in fp32
    and rounded once to W's dtype. On exit the LoRA layers are put back and every W is restored bit for bit from a
    copy taken the first time the layer was folded, never by subtracting the delta again, so the weights one
    checkpoint samples with depend only on the base and that checkpoint's adapters: a job resumed in a new process
    samples with the same weights as the one it replaces.

    `keep`: where that copy lives, "cpu" (pinned when the weights are on a GPU) or "gpu" (beside the weights).
    For a 7B model (13 GB of wrapped weights, H200, BENCHMARKS.md round 9) taking a host copy costs 9-12 s once per
    job (the operating system providing fresh pages) and restoring from it 0.24 s per checkpoint; a GPU copy 0.05 s
    and 0.007 s, but GPU memory (sample.fold_copy_device chooses).

    Why fold (round 9): every sampling job is a new process, and Dynamo traces the compiled decode step's Python in
    each one; PEFT's per-layer adapter logic (7 wrapped projections x every layer) more than doubles that tracing,
    and the LoRA products add 14 small kernels per layer to every decode step (steady 400 x 600: 12.6 s through the
    LoRA layers, 10.4 s folded). The plain model also gives every cell of a base model the same compiled graph (one
    compile-cache key per base model). Same function as the PeftModel up to one rounding of each folded weight
    (tests/test_compose.py; in bf16 as close to an fp32 reference as PEFT's own path: round 9).

    A layer that cannot be folded stays a LoRA layer, and PEFT applies it as before (`unfolded` says which and why):
    one whose base weight another module shares (tied input embeddings and lm_head: folding an adapter of one into
    the shared weight would change the other too), and one applying an adapter that is not plain LoRA (DoRA or
    another variant, a LoRA bias). A layer whose adapters PEFT has merged into its weight raises.
    """

    def __init__(self, keep: str = "cpu"):
        if keep not in ("cpu", "gpu"):
            raise ValueError(f"keep={keep!r}: 'cpu' or 'gpu'")
        self.keep = keep
        self._base: dict[str, tuple] = {}  # layer name -> (the base weight parameter, its pristine copy)
        self.unfolded: dict[str, str] = {}  # layer name -> why it stays a LoRA layer (at the last `applied`)

    @staticmethod
    def layers(model) -> tuple[list, dict[str, str]]:
        """The LoRA layers of `model` that fold, as (name, layer), and those that stay LoRA layers, name -> why."""
        from peft.tuners.lora import LoraLayer

        inner = inner_model(model)
        tied = set(tied_lora_layers(inner))
        fold, unfolded = [], {}
        for name, layer in inner.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            if layer.merged:
                raise RuntimeError(f"LoRA layer {name} has adapters merged by PEFT ({layer.merged_adapters}): "
                                   f"folding them again would apply them twice")
            on = _applied(layer)
            if name in tied:
                unfolded[name] = "its base weight is shared with another module (tied weights)"
            elif any(a in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(a) for a in on):
                unfolded[name] = "an adapter that is not plain LoRA (a variant such as DoRA, or a LoRA bias)"
            else:
                fold.append((name, layer))
        return fold, unfolded

    @staticmethod
    def copy_bytes(model) -> int:
        """Bytes of the copy: the base weights of every LoRA layer that folds."""
        weights = [layer.get_base_layer().weight for _, layer in FoldedAdapters.layers(model)[0]]
        return sum(w.numel() * w.element_size() for w in weights)

    @contextlib.contextmanager
    def applied(self, model):
        import torch

        inner = inner_model(model)
        layers, self.unfolded = self.layers(inner)
        self._take([(name, layer.get_base_layer().weight) for name, layer in layers
                    if name not in self._base or self._base[name][0] is not layer.get_base_layer().weight])
        swapped = []
        try:
            with torch.no_grad():
                for name, layer in layers:
                    parent, _, attr = name.rpartition(".")
                    swapped.append((name, inner.get_submodule(parent), attr, layer))
                    self._fold(name, layer)
                    swapped[-1][1].register_module(attr, layer.get_base_layer())
            yield inner
        finally:
            with torch.no_grad():
                for name, parent, attr, layer in reversed(swapped):
                    parent.register_module(attr, layer)
                    weight, pristine = self._base[name]
                    weight.copy_(pristine, non_blocking=True)

    def _take(self, named_weights) -> None:
        """The pristine copies of these weights, in one buffer (one allocation; pinned memory would round each
        tensor of its own up to a power of two)."""
        import torch

        if not named_weights:
            return
        first = named_weights[0][1]
        device = first.device if self.keep == "gpu" else torch.device("cpu")
        flat = torch.empty(sum(w.numel() for _, w in named_weights), dtype=first.dtype, device=device,
                           pin_memory=self.keep == "cpu" and first.is_cuda)
        at = 0
        with torch.no_grad():
            for name, w in named_weights:
                if w.dtype != flat.dtype:
                    raise RuntimeError(f"{name}: weights of mixed dtypes ({w.dtype}, {flat.dtype})")
                self._base[name] = (w, flat[at:at + w.numel()].view(w.shape).copy_(w, non_blocking=True))
                at += w.numel()
        if first.is_cuda:
            torch.cuda.synchronize(first.device)  # the copies are complete before any weight is changed

    def _fold(self, name: str, layer) -> None:
        import torch

        weight, pristine = self._base[name]
        on = _applied(layer)
        if on:
            total = pristine.to(weight.device, non_blocking=True).to(torch.float32, copy=True)
            for a in on:
                total += layer.get_delta_weight(a).float()
            weight.copy_(total)
