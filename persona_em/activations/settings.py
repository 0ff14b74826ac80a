"""`analysis.activations` in the config: which layers are stored, and how their number is checked.

Layers are indices into the decoder's hidden states as transformers returns them: 0 = the embedding output, i = the
output of decoder block i (1..L), L = the last block's output after the final norm (transformers applies it to the
last entry). A layer outside 0..L is refused naming the key, at parse time when the model's config.json is already
on disk (a local path, a converted GGUF, a downloaded snapshot, the tiny model's spec), else in the job before any
output is written.
"""
from __future__ import annotations

from persona_em.errors import UserError

KEY = "analysis.activations"


def activation_settings(config: dict) -> dict | None:
    """The `analysis.activations` block (defaults filled in by the schema), or None when the analysis is off."""
    return (config.get("analysis") or {}).get("activations")


def check_layers(layers: list[int], n_layers: int, model: str) -> list[int]:
    """The layers, checked against a model with `n_layers` decoder blocks (hidden states 0..n_layers)."""
    bad = [layer for layer in layers if not isinstance(layer, int) or isinstance(layer, bool)
           or not 0 <= layer <= n_layers]
    if bad or not layers:
        raise UserError(f"config {KEY}.layers: {bad or 'empty list'} out of range for model {model!r}, which has "
                        f"{n_layers} decoder layers (hidden states 0..{n_layers}: 0 = embeddings, {n_layers} = "
                        f"the last block after the final norm)")
    if len(set(layers)) != len(layers):
        raise UserError(f"config {KEY}.layers: {layers} lists a layer twice")
    return sorted(layers)


def known_num_layers(config: dict, model: str) -> int | None:
    """The model's number of decoder layers if it can be known without running anything, else None."""
    from persona_em.config import model_config_json

    cfg = model_config_json(config, model, config.get("results_dir", "results"))
    return None if cfg is None else int(cfg["num_hidden_layers"])


def check_config(config: dict, models: list[str]) -> None:
    """Parse-time checks of `analysis.activations` for the grid's models (no-op when the analysis is off)."""
    settings = activation_settings(config)
    if settings is None:
        return
    for model in models:
        n = known_num_layers(config, model)
        if n is not None:
            check_layers(settings["layers"], n, model)
