import copy
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from persona_em.config import Cell, checkpoint_spec, control_pairs, expand_grid, sampling_settings, train_settings
from persona_em.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "config/schemas/config.schema.yaml")
CONFIGS = ["config/config.yaml", "config/demo.yaml", "config/experiments/arena_phase1.yaml",
           "config/experiments/arena_phase1_replicated.yaml", "config/experiments/cs2881_replication.yaml"]


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
    assert len(cells) == (1 + 1) * 2 * 2  # (no persona, the constitution-trained persona stacked) x 2 datasets x 2 seeds
    assert {c.model for c in cells} == {"smollm2"}
    assert {c.dataset for c in cells} == {"insecure_demo", "secure_demo"} and {c.seed for c in cells} == {0, 1}
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
        {"where": {"dataset": "secure_demo"}, "training": {"learning_rate": 0.5},
         "checkpoints": {"every": 1}, "sampling": {"n_samples": 2}},
        {"where": {"dataset": "secure_demo", "seed": [1]}, "training": {"epochs": 2}},
    ]
    sec1 = Cell("smollm2", "none", "none", "secure_demo", 1)
    ins0 = Cell("smollm2", "none", "none", "insecure_demo", 0)
    assert train_settings(cfg, sec1)["learning_rate"] == 0.5 and train_settings(cfg, sec1)["epochs"] == 2
    assert train_settings(cfg, ins0)["learning_rate"] == 2e-4 and train_settings(cfg, ins0)["epochs"] == 1
    assert train_settings(cfg, ins0)["lora_r"] == 32  # from the betley preset
    assert checkpoint_spec(cfg, sec1) == {"every": 1} and checkpoint_spec(cfg, ins0) == {"steps": [0, "final"]}
    assert sampling_settings(cfg, sec1)["n_samples"] == 2 and sampling_settings(cfg, ins0)["n_samples"] == 1


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


def _with_controls(*pairs, datasets=("insecure_demo", "secure_demo")):
    cfg = copy.deepcopy(load("config/demo.yaml"))
    cfg["datasets"]["secure_extra"] = {"demo": {"kind": "secure"}}
    cfg["grid"]["datasets"] = list(datasets)
    cfg["analysis"] = {"controls": [{"treatment": t, "control": c} for t, c in pairs]}
    validate(cfg, SCHEMA)
    return cfg


def test_control_pairs_run_under_every_persona_composition_and_seed():
    cfg = _with_controls(("insecure_demo", "secure_demo"))
    assert control_pairs(cfg) == [("insecure_demo", "secure_demo")]
    cells = expand_grid(cfg)
    for dataset in ("insecure_demo", "secure_demo"):
        assert {(c.persona, c.composition, c.seed) for c in cells if c.dataset == dataset} == {
            (c.persona, c.composition, c.seed) for c in cells}
    assert control_pairs(load("config/demo.yaml")) == [("insecure_demo", "secure_demo")]


@pytest.mark.parametrize("pairs, message", [
    ([("insecure_demo", "secure_extra")],
     r"config analysis.controls\[0\]: control dataset 'secure_extra' is not in grid.datasets"),
    ([("insecure_demo", "secure_demo"), ("ghost", "secure_demo")],
     r"config analysis.controls\[1\]: treatment dataset 'ghost' is not in grid.datasets"),
    ([("insecure_demo", "insecure_demo")], r"analysis.controls\[0\]: treatment and control are the same dataset"),
    ([("insecure_demo", "secure_demo")] * 2, r"analysis.controls\[1\]: the pair .* is listed twice"),
])
def test_bad_control_pairs_are_one_user_error_naming_the_key(pairs, message):
    with pytest.raises(UserError, match=message) as err:
        control_pairs(_with_controls(*pairs))
    assert "\n" not in str(err.value)


def test_a_control_pair_needs_both_names():
    cfg = copy.deepcopy(yaml.safe_load((REPO / "config/demo.yaml").read_text()))
    cfg["analysis"] = {"controls": [{"treatment": "insecure_demo"}]}
    with pytest.raises(WorkflowError, match="'control' is a required property"):
        validate(cfg, SCHEMA)
