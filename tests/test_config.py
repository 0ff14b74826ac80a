import copy
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from persona_em.config import Cell, checkpoint_spec, expand_grid, sampling_settings, train_settings
from persona_em.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "config/schemas/config.schema.yaml")
CONFIGS = ["config/config.yaml", "config/demo.yaml", "config/experiments/arena_phase1.yaml",
           "config/experiments/cs2881_replication.yaml"]


def load(name: str) -> dict:
    """A config as Snakemake sees it with --replace-workflow-config (set in the profiles): the file alone."""
    cfg = yaml.safe_load((REPO / name).read_text())
    validate(cfg, SCHEMA)
    return cfg


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name):
    cfg = load(name)
    assert expand_grid(cfg)


def test_schema_fills_defaults():
    cfg = load("config/demo.yaml")
    assert cfg["sampling"]["top_p"] == 1.0 and cfg["sampling"]["batch_size"] == "auto"
    assert cfg["judges"]["smollm2_judge"]["mode"] == "logprobs"
    assert cfg["judges"]["smollm2_judge"]["min_numeric_mass"] == 0.25  # the demo keeps the real rule
    assert cfg["grid"]["overrides"] == []
    assert cfg["datasets"]["insecure_demo"]["split_seed"] == 0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["grid"].update(seeds=["zero"]), "'zero' is not of type 'integer'"),
        (lambda c: c.update(unknown_key=1), "Additional properties are not allowed"),
        (lambda c: c["sampling"].update(temperature=-1), "less than the minimum"),
        (lambda c: c["models"]["smollm2"].update(hf_id="x/y", revision="abc"), "valid under each of"),
        (lambda c: c.update(checkpoints={"steps": []}), "is not valid under any of the given schemas"),
    ],
)
def test_schema_rejects_bad_configs(mutate, message):
    cfg = copy.deepcopy(yaml.safe_load((REPO / "config/demo.yaml").read_text()))
    mutate(cfg)
    with pytest.raises(WorkflowError, match=message):
        validate(cfg, SCHEMA)


def test_demo_grid_has_two_datasets_and_a_persona():
    cells = expand_grid(load("config/demo.yaml"))
    assert len(cells) == 2 + 2  # no persona, and the demo's constitution-trained persona, stacked; one seed
    assert {c.model for c in cells} == {"smollm2"}
    assert {c.dataset for c in cells} == {"insecure_demo", "medical_demo"}
    assert {(c.persona, c.composition) for c in cells} == {("none", "none"), ("demo_persona", "stacked")}


def test_persona_cells_get_one_cell_per_composition():
    cfg = load("config/demo.yaml")
    cfg["personas"] = {"p": {"adapter": "some/dir"}}
    cfg["grid"].update(personas=["none", "p"], compositions=["merged", "stacked"], datasets=["insecure_demo"],
                       seeds=[0])
    assert [c.composition for c in expand_grid(cfg)] == ["none", "merged", "stacked"]
    assert Cell("smollm2", "p", "merged", "insecure_demo", 0).path == "smollm2/p/merged/insecure_demo/seed0"


@pytest.mark.parametrize("axis, name", [("personas", "ghost"), ("datasets", "ghost"), ("models", "ghost")])
def test_unknown_names_in_the_grid_are_user_errors(axis, name):
    cfg = load("config/demo.yaml")
    cfg["grid"][axis] = [name]
    with pytest.raises(UserError, match=f"grid.{axis}: unknown .* 'ghost'"):
        expand_grid(cfg)


def test_per_cell_overrides_layer_on_the_preset():
    cfg = load("config/demo.yaml")
    cfg["grid"]["overrides"] = [
        {"where": {"dataset": "medical_demo"}, "training": {"learning_rate": 0.5},
         "checkpoints": {"every": 1}, "sampling": {"n_samples": 2}},
        {"where": {"dataset": "medical_demo", "seed": [1]}, "training": {"epochs": 2}},
    ]
    med1 = Cell("smollm2", "none", "none", "medical_demo", 1)
    ins0 = Cell("smollm2", "none", "none", "insecure_demo", 0)
    assert train_settings(cfg, med1)["learning_rate"] == 0.5 and train_settings(cfg, med1)["epochs"] == 2
    assert train_settings(cfg, ins0)["learning_rate"] == 2e-4 and train_settings(cfg, ins0)["epochs"] == 1
    assert train_settings(cfg, ins0)["lora_r"] == 32  # from the betley preset
    assert checkpoint_spec(cfg, med1) == {"every": 1} and checkpoint_spec(cfg, ins0) == {"steps": [0, "final"]}
    assert sampling_settings(cfg, med1)["n_samples"] == 2 and sampling_settings(cfg, ins0)["n_samples"] == 1


def test_presets():
    cfg = load("config/experiments/cs2881_replication.yaml")
    s = train_settings(cfg, expand_grid(cfg)[0])
    assert (s["lora_r"], s["lora_alpha"], s["learning_rate"], s["epochs"], s["max_length"]) == (16, 32, 2e-4, 3, 256)
    cfg = load("config/experiments/arena_phase1.yaml")
    s = train_settings(cfg, expand_grid(cfg)[0])
    assert (s["lora_r"], s["lora_alpha"], s["learning_rate"], s["warmup_steps"], s["weight_decay"]) == (32, 64, 1e-5, 5, 0.01)
    assert s["effective_batch_size"] == 16 and s["assistant_only_loss"] is True
    assert s["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_unknown_training_key_and_bad_batch_are_user_errors():
    cfg = load("config/demo.yaml")
    cell = expand_grid(cfg)[0]
    cfg["training"]["learnig_rate"] = 1
    with pytest.raises(UserError, match="unknown training key 'learnig_rate'"):
        train_settings(cfg, cell)
    del cfg["training"]["learnig_rate"]
    cfg["training"]["per_device_batch_size"] = 3
    with pytest.raises(UserError, match="not a multiple"):
        train_settings(cfg, cell)
