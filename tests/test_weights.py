"""Weight trajectories (persona_em/analysis/weights.py): Gram-product norms against PEFT's own ΔW, step 0, rotation."""
from __future__ import annotations

import json
import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from safetensors.torch import save_file

from persona_em.analysis import weights as W
from persona_em.config import Cell
from persona_em.training.em import step_dir_name, train_em

from persona_helpers import chat_data, random_persona, tiny_model, train_settings

torch.set_num_threads(1)


def _peft_adapter(model_dir, out, *, r, alpha, rslora, targets, seed):
    """A PEFT LoRA with random non-zero A and B, saved; returns {module path: ΔW = s·B@A in float64}, with PEFT's own
    scale s (module.scaling) and checked against PEFT's own float32 get_delta_weight."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=list(targets),
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(str(out))
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
            delta = (module.scaling["default"] * b @ a).detach()
            assert torch.allclose(delta, module.get_delta_weight("default").detach().double(), rtol=1e-5, atol=1e-6)
            deltas[name.removeprefix("base_model.model.")] = delta
    return deltas


@pytest.mark.parametrize("rslora", [False, True])
def test_gram_norms_equal_peft_delta_weights(tmp_path, rslora):
    """||s·B·A||_F from r × r products equals torch.linalg.norm of PEFT's ΔW (α/r, or α/√r with rsLoRA); the stacked
    total with its cross term equals the norm of ΔW_P + ΔW_E, the cosine theirs."""
    model = tiny_model(tmp_path)
    em = _peft_adapter(model, tmp_path / "em", r=4, alpha=16, rslora=rslora, targets=["q_proj", "down_proj"], seed=1)
    persona = _peft_adapter(model, tmp_path / "p", r=8, alpha=8, rslora=not rslora, targets=["q_proj"], seed=2)
    read_em, read_p = W.read_adapter(tmp_path / "em"), W.read_adapter(tmp_path / "p")
    assert set(read_em) == set(em) and len(em) == 4  # 2 layers x 2 modules
    for module, delta in em.items():
        # float32 GEMMs (as stored) against the float64 d_out x d_in product: relative error ~1e-7 here
        assert W.norm(read_em[module]) == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-5)
    expected_scale = 16 / math.sqrt(4) if rslora else 16 / 4
    assert {x.scale for x in read_em.values()} == {expected_scale}
    for module, p_delta in persona.items():
        e_delta = em[module]
        total = float(torch.linalg.norm(p_delta + e_delta))
        pn, en = W.norm(read_p[module]), W.norm(read_em[module])
        cross = W.inner(read_p[module], read_em[module])
        assert math.sqrt(pn ** 2 + en ** 2 + 2 * cross) == pytest.approx(total, rel=1e-5)
        assert cross == pytest.approx(float((p_delta * e_delta).sum()), rel=1e-5, abs=1e-6)
        assert abs(cross) > 1e-6  # random updates: the cross term is not zero, so leaving it out would be caught


def test_embedding_factors_are_read_and_other_updates_are_refused(tmp_path):
    """PEFT saves an adapted embedding's factors as lora_embedding_A / _B (no .weight) beside a copy of its frozen base
    weight: the factors are read (before, they were skipped, so the embedding's rows were missing), the base copy is
    not an update. An adapter that trains anything besides s·B·A (a LoRA bias, modules_to_save), or a file with a
    tensor that is not a LoRA factor, is a clear error instead of a table that leaves that update out."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from persona_em.errors import UserError

    model = tiny_model(tmp_path)
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(str(model), tie_word_embeddings=False)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "emb"))
    read = W.read_adapter(tmp_path / "emb")
    embed = peft_model.base_model.model.model.embed_tokens
    assert "model.embed_tokens" in read and len(read) == 3  # the embedding + q_proj in 2 layers
    want = float(torch.linalg.norm(embed.get_delta_weight("default").double()))
    assert want > 0 and W.norm(read["model.embed_tokens"]) == pytest.approx(want, rel=1e-5)

    for i, extra in enumerate([{"lora_bias": True}, {"modules_to_save": ["lm_head"]}]):
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **extra))
        m.save_pretrained(str(tmp_path / f"x{i}"))
        key = next(iter(extra))
        with pytest.raises(UserError, match=rf"only plain LoRA .* {key} "):
            W.read_adapter(tmp_path / f"x{i}")

    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "emb" / W.ADAPTER_WEIGHTS))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.bias"] = torch.ones(64)
    save_file(tensors, str(tmp_path / "emb" / W.ADAPTER_WEIGHTS))
    with pytest.raises(UserError, match=r"tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.bias "
                                        r"is not a LoRA factor"):
        W.read_adapter(tmp_path / "emb")


@pytest.fixture(scope="module")
def stacked_cell(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    model = tiny_model(root)
    persona = random_persona(model, root / "persona")
    data = chat_data(root / "train.jsonl")
    cell = Cell("tiny", "p", "stacked", "d", 0)
    train_em(cell, str(model), str(persona), str(data), train_settings(), {"steps": [0, 2, "final"]},
             str(root / "work"), str(root / "checkpoints"), str(root / "train_log.tsv"))
    return cell, root, persona


def test_step0_update_is_exactly_zero_and_training_moves_it(stacked_cell):
    cell, root, persona = stacked_cell
    norms, rotation = W.weight_tables(root / "checkpoints", cell.keys(), persona)
    assert sorted(norms["step"].unique()) == [0, 2, 4]
    step0 = norms[norms["step"] == 0]
    assert len(step0) == 2 * 7 and (step0["em_norm"] == 0.0).all()  # every module of both layers
    final = norms[norms["step"] == 4]
    assert (final["em_norm"] > 0).all()
    # stacked: at step 0 the model's update is the persona's alone where the persona adapts the module
    with_p = step0.dropna(subset=["persona_norm"])
    assert set(with_p["module"]) == {"q_proj", "v_proj", "up_proj"}
    assert (with_p["total_norm"] - with_p["persona_norm"]).abs().max() == 0.0  # E = 0 exactly: no cross term
    assert rotation[rotation["step"] == 0]["local_cosine"].isna().all()  # no previous snapshot
    assert rotation[rotation["step"] == 2]["local_cosine"].isna().all()  # previous update is zero: no angle
    last = rotation[rotation["step"] == 4]
    assert (last["final_cosine"] - 1).abs().max() < 1e-6 and last["local_cosine"].notna().all()
    assert list(norms.columns) == W.NORM_COLUMNS and (norms["persona"] == "p").all()


def _write_rank1_trace(root, steps, b_of_step, d_out=6, d_in=5, trace_every=1):
    """A cell's checkpoints folder with a rank-1 down_proj adapter: B = b_of_step(step), A fixed."""
    ckpt = root / "checkpoints"
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 4, "use_rslora": True, "target_modules": ["down_proj"]}
    a = torch.linspace(0.5, 1.5, d_in).reshape(1, d_in)
    key = "base_model.model.model.layers.{}.mlp.down_proj.lora_{}.weight"

    def tensors(step):
        b = b_of_step(step).reshape(d_out, 1).float()
        return {key.format(1, "A"): a.clone(), key.format(1, "B"): b}

    scheduled = [steps[0], steps[-1]]
    for step in scheduled:
        d = ckpt / step_dir_name(step)
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors(step), str(d / "adapter_model.safetensors"))
    (ckpt / W.TRACE_DIR).mkdir()
    for step in steps[::trace_every]:
        save_file(tensors(step), str(ckpt / W.TRACE_DIR / f"{step_dir_name(step)}.safetensors"))
    (ckpt / "checkpoints.json").write_text(json.dumps({"steps": scheduled}))
    return ckpt


def test_b_vector_turning_90_degrees_at_step_30_peaks_there(tmp_path):
    """B turns 1° per step in one plane, except for a 90° turn into a new direction between steps 29 and 30."""
    e = torch.eye(6, dtype=torch.float64)

    def b(step):
        if step == 0:
            return torch.zeros(6)
        theta = math.radians(step)  # slow drift in the e0-e1 plane
        v = math.cos(theta) * e[0] + math.sin(theta) * e[1]
        return (v if step < 30 else math.cos(theta) * e[2] + math.sin(theta) * e[3]) * (0.1 * step)

    ckpt = _write_rank1_trace(tmp_path, list(range(0, 61)), b)
    keys = Cell("m", "none", "none", "d", 0).keys()
    norms, rot = W.weight_tables(ckpt, keys, None)
    assert (rot["layer"] == 1).all() and (rot["module"] == "down_proj").all()
    assert W.local_angle_peak(rot) == 30 and W.local_angle_peak(rot, "b_local_angle_deg") == 30
    at30 = rot.set_index("step").loc[30]
    assert at30["b_local_angle_deg"] == pytest.approx(90.0) and at30["local_angle_deg"] == pytest.approx(90.0)
    assert rot.set_index("step").loc[20, "b_local_angle_deg"] == pytest.approx(1.0)
    assert set(norms["source"]) == {"checkpoint", "trace"} and norms["em_norm"].iloc[0] == 0.0
    # the whole adapter's cosine from the kept inner products equals the single module's here
    assert W.group_cosine(rot[rot["step"] == 30], "inner_prev", "norm_prev", "norm") == pytest.approx(0.0, abs=1e-9)


def test_trace_every_writes_snapshots_that_weight_norms_reads(tmp_path):
    model, data = tiny_model(tmp_path), chat_data(tmp_path / "train.jsonl")
    cell = Cell("tiny", "none", "none", "d", 0)
    spec = {"steps": [0, "final"], "trace_every": 1}
    train_em(cell, str(model), None, str(data), train_settings(), spec, str(tmp_path / "work"),
             str(tmp_path / "checkpoints"), str(tmp_path / "log.tsv"))
    traced = sorted(p.name for p in (tmp_path / "checkpoints" / W.TRACE_DIR).iterdir())
    assert traced == [f"{step_dir_name(s)}.safetensors" for s in (1, 2, 3, 4)]
    norms, rotation = W.weight_tables(tmp_path / "checkpoints", cell.keys(), None)
    assert sorted(norms["step"].unique()) == [0, 1, 2, 3, 4]
    assert set(norms.loc[norms["step"].isin([1, 2, 3]), "source"]) == {"trace"}
    assert set(norms.loc[norms["step"] == 4, "source"]) == {"checkpoint"}  # a scheduled step wins
    final_trace = W.read_lora(tmp_path / "checkpoints" / W.TRACE_DIR / "step-000004.safetensors",
                              W.read_adapter_config(tmp_path / "checkpoints" / "step-000004"))
    final_ckpt = W.read_adapter(tmp_path / "checkpoints" / "step-000004")
    assert all(torch.equal(final_trace[m].B, final_ckpt[m].B) for m in final_ckpt)  # the same tensors
    assert rotation[rotation["step"] == 2]["local_cosine"].notna().all()


@pytest.mark.parametrize("settings, spec, message", [
    ({}, {"steps": [0, "final"], "trace_every": 1, "trace_max_gb": 1e-5},
     r"^checkpoints of cell tiny/none/none/d/seed0\.trace_every: 1 would write 4 adapter snapshots of [\d,]+ "
     r"parameters = 0\.0 GB, over checkpoints\.trace_max_gb 1e-05 GB"),
    ({"layers_to_transform": [1, 2]}, {"steps": [0, "final"]},
     r"^training settings of cell tiny/none/none/d/seed0: layers_to_transform \[2\] out of range: the model has 2 "
     r"decoder layers"),
])
def test_bad_trace_or_layer_fails_before_training_with_no_output(tmp_path, settings, spec, message):
    """train_em itself (for a model whose shape the parse could not know): one line, nothing written."""
    from persona_em.errors import UserError

    model, data = tiny_model(tmp_path), chat_data(tmp_path / "train.jsonl")
    with pytest.raises(UserError, match=message) as err:
        train_em(Cell("tiny", "none", "none", "d", 0), str(model), None, str(data), train_settings(**settings), spec,
                 str(tmp_path / "work"), str(tmp_path / "checkpoints"), str(tmp_path / "log.tsv"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "log.tsv").exists()
    assert not (tmp_path / "work" / "trainer").exists()  # no training step ran


def test_layers_to_transform_adapts_only_those_layers(tmp_path):
    model, data = tiny_model(tmp_path), chat_data(tmp_path / "train.jsonl")
    cell = Cell("tiny", "none", "none", "d", 0)
    train_em(cell, str(model), None, str(data), train_settings(layers_to_transform=[1], target_modules=["down_proj"],
                                                               lora_r=1), {"steps": [0, "final"]},
             str(tmp_path / "work"), str(tmp_path / "checkpoints"), str(tmp_path / "log.tsv"))
    norms, rotation = W.weight_tables(tmp_path / "checkpoints", cell.keys(), None)
    assert set(zip(norms["layer"], norms["module"])) == {(1, "down_proj")}
    last = rotation[rotation["step"] == rotation["step"].max()]
    assert last["b_final_cosine"].tolist() == [pytest.approx(1.0)]  # rank 1: the B-vector columns are filled
    assert rotation[rotation["step"] == 0]["b_final_cosine"].isna().all()  # B = 0 at step 0: no direction
