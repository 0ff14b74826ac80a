"""The experiment grid: which cells exist and the resolved settings of each.

A cell is one EM fine-tuning run, identified by (model, persona, composition, dataset, seed). These five keys
appear in every output path of the cell and in every row it produces.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import asdict, dataclass

from persona_em.errors import UserError
from persona_em.training.settings import resolve_train_config

NO_PERSONA = "none"


@dataclass(frozen=True, order=True)
class Cell:
    model: str
    persona: str
    composition: str
    dataset: str
    seed: int

    @property
    def path(self) -> str:
        """The cell's path fragment: the same pattern as CELL in rules/common.smk."""
        return f"{self.model}/{self.persona}/{self.composition}/{self.dataset}/seed{self.seed}"

    def keys(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wildcards(cls, wildcards) -> "Cell":
        return cls(wildcards.model, wildcards.persona, wildcards.composition, wildcards.dataset, int(wildcards.seed))


def _require(config: dict, section: str, name: str, where: str) -> dict:
    table = config.get(section) or {}
    if name not in table:
        known = ", ".join(sorted(table)) or "none defined"
        raise UserError(f"config {where}: unknown {section[:-1]} {name!r} (defined under '{section}': {known})")
    return table[name]


def expand_grid(config: dict) -> list[Cell]:
    """All cells of the grid, validated against the models, personas and datasets the config defines."""
    grid = config["grid"]
    cells = []
    for model, persona, dataset, seed in itertools.product(
        grid["models"], grid["personas"], grid["datasets"], grid["seeds"]
    ):
        _require(config, "models", model, "grid.models")
        _require(config, "datasets", dataset, "grid.datasets")
        if persona == NO_PERSONA:
            compositions = [NO_PERSONA]
        else:
            _require(config, "personas", persona, "grid.personas")
            compositions = grid["compositions"]
        for composition in compositions:
            cells.append(Cell(model, persona, composition, dataset, int(seed)))
    return sorted(set(cells))


def _matches(where: dict, cell: Cell) -> bool:
    keys = cell.keys()
    for key, value in where.items():
        if key not in keys:
            raise UserError(f"config grid.overrides: unknown cell key {key!r} in 'where' (known: {', '.join(keys)})")
        allowed = value if isinstance(value, list) else [value]
        if keys[key] not in allowed and str(keys[key]) not in map(str, allowed):
            return False
    return True


def cell_overrides(config: dict, cell: Cell, section: str) -> dict:
    """The `section` overrides (training / checkpoints / sampling) of every grid.overrides entry matching the cell."""
    merged: dict = {}
    for i, entry in enumerate(config["grid"].get("overrides", [])):
        if _matches(entry.get("where", {}), cell):
            merged.update(copy.deepcopy(entry.get(section, {})))
    return merged


def train_settings(config: dict, cell: Cell) -> dict:
    """Resolved training hyper-parameters of a cell (a plain dict, so Snakemake tracks every value as a param)."""
    layers = [config.get("training", {}), cell_overrides(config, cell, "training")]
    return resolve_train_config(*layers, where=f"training settings of cell {cell.path}").to_dict()


def checkpoint_spec(config: dict, cell: Cell) -> dict:
    override = cell_overrides(config, cell, "checkpoints")
    return override or copy.deepcopy(config["checkpoints"])


def model_source(config: dict, name: str) -> dict:
    """Where a model comes from: its config entry without size_b (a size label must not retrain or re-judge)."""
    return {k: v for k, v in config["models"][name].items() if k != "size_b"}


def sampling_settings(config: dict, cell: Cell) -> dict:
    settings = copy.deepcopy(config["sampling"])
    settings.update(cell_overrides(config, cell, "sampling"))
    return settings


def control_pairs(config: dict) -> list[tuple[str, str]]:
    """(treatment, control) of every `analysis.controls` entry, checked: both datasets run in the grid.

    The grid crosses every dataset with every persona, composition and seed, so a pair whose datasets are both in
    grid.datasets is run under all of them; a pair naming a dataset outside the grid is a UserError (adding it to
    the grid silently would change what the experiment trains).
    """
    entries = (config.get("analysis") or {}).get("controls") or []
    grid = set(config["grid"]["datasets"]) if entries else set()
    pairs = []
    for i, entry in enumerate(entries):
        where = f"config analysis.controls[{i}]"
        treatment, control = entry["treatment"], entry["control"]
        for role, name in (("treatment", treatment), ("control", control)):
            if name not in grid:
                raise UserError(f"{where}: {role} dataset {name!r} is not in grid.datasets ({', '.join(sorted(grid))}); "
                                f"a control pair needs both datasets in the grid")
        if treatment == control:
            raise UserError(f"{where}: treatment and control are the same dataset {treatment!r}")
        if (treatment, control) in pairs:
            raise UserError(f"{where}: the pair {treatment!r} vs {control!r} is listed twice")
        pairs.append((treatment, control))
    return pairs


def model_config_json(config: dict, name: str, results_dir: str) -> dict | None:
    """The model's Hugging Face config.json where it can be read without loading or downloading anything: a
    `build_tiny` model's from its settings, a local `path` model's file, or a model already prepared under
    results_dir; None otherwise (a hub or GGUF model before prepare_model ran)."""
    import json
    from pathlib import Path

    spec = config["models"][name]
    if "build_tiny" in spec:
        h = spec["build_tiny"].get("hidden_size", 64)  # persona_em.demo.build_tiny_model
        return {"hidden_size": h, "intermediate_size": 2 * h, "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_hidden_layers": spec["build_tiny"].get("num_layers", 2)}
    candidates = [Path(spec["path"]) / "config.json"] if "path" in spec else []
    if "gguf" in spec and "cache_dir" in config:  # converted once by prepare_model (persona_em/models.py)
        candidates.append(Path(config["cache_dir"]) / "models" / "gguf" / spec["gguf"]["sha256"] / "config.json")
    if "hf_id" in spec and "cache_dir" in config and "revision" in spec:
        candidates.append(Path(config["cache_dir"]) / "models" / spec["hf_id"].replace("/", "--") / spec["revision"]
                          / "config.json")
    manifest = Path(results_dir) / "models" / name / "model.json"
    if manifest.is_file():
        candidates.append(Path(json.loads(manifest.read_text())["path"]) / "config.json")
    for path in candidates:
        if path.is_file():
            cfg = json.loads(path.read_text())
            return cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg
    return None


_ROWS: dict = {}


def check_cell(config: dict, cell: Cell, results_dir: str) -> None:
    """Parse-time checks of a cell's EM training that need the model's shape: layers_to_transform in range and the
    trace size guard (persona_em/training/trace.py), wherever the shape (and for the trace the rows) is known now;
    train_em repeats both before its first step."""
    from pathlib import Path

    from persona_em.data.datasets import dataset_stats
    from persona_em.training.settings import check_layers
    from persona_em.training.trace import check_trace_size, lora_params, steps_for, trace_every

    model_cfg = model_config_json(config, cell.model, results_dir)
    if model_cfg is None:
        return
    settings = train_settings(config, cell)
    check_layers(settings.get("layers_to_transform"), model_cfg["num_hidden_layers"],
                 f"training settings of cell {cell.path} (model {cell.model!r})")
    spec = checkpoint_spec(config, cell)
    if trace_every(spec):
        if cell.dataset not in _ROWS:  # read each dataset file once per parse, not once per cell
            _ROWS[cell.dataset] = dataset_stats(config, cell.dataset, Path.cwd())
        params, data = lora_params(model_cfg, settings), _ROWS[cell.dataset]
        if params is not None and data is not None:
            check_trace_size(spec, params, 4, steps_for(data[0], settings), f"checkpoints of cell {cell.path}")
