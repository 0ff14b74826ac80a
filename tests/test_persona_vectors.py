"""Persona vectors (issue 14 stage 4): a planted shift is recovered and its layer chosen on held-out questions;
trait files in the persona-vectors format (our own fixture); a persona without a source is refused by name; the
whole stage on the tiny model (CPU)."""
from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

from conftest import REPO
from persona_em.activations import persona_vectors as PV
from persona_em.errors import UserError

TRAIT = REPO / "tests" / "fixtures" / "traits" / "pedantic.json"
LAYERS = [0, 3, 6]


def planted(rng, shift, n=400, layer=1, hidden=32, noise=0.5):
    """Rollouts: persona = baseline + `shift` at one layer (index `layer`); half the questions extract."""
    condition = np.array([PV.PERSONA, PV.BASELINE] * (n // 2))
    split = np.array([PV.EXTRACT] * (n // 2) + [PV.EVALUATE] * (n // 2))
    x = rng.normal(scale=noise, size=(n, len(LAYERS), hidden)) + rng.normal(size=(len(LAYERS), hidden)) * 5
    x[condition == PV.PERSONA, layer] += shift
    return x, condition, split


def cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_a_planted_persona_shift_is_recovered_and_its_layer_chosen():
    rng = np.random.default_rng(0)
    shift = rng.normal(size=32) * 2
    x, condition, split = planted(rng, shift)
    res = PV.build_vector(x, condition, split, LAYERS, "test")
    assert cos(res["vectors"][1], shift) > 0.99
    assert res["chosen_layer"] == 3
    rows = {r["layer"]: r for r in res["rows"]}
    assert rows[3]["auroc_heldout"] == 1.0 and rows[3]["cohens_d_heldout"] > 5
    assert abs(rows[0]["cohens_d_heldout"]) < 1.5  # no shift at layer 0: little held-out separation
    # shuffled conditions carry no shift: the vector is noise
    shuffled = rng.permutation(condition)
    noise = PV.build_vector(x, shuffled, split, LAYERS, "test")
    assert abs(cos(noise["vectors"][1], shift)) < 0.3


def test_the_vector_uses_only_the_extract_half():
    rng = np.random.default_rng(1)
    x, condition, split = planted(rng, np.zeros(32))
    x[(split == PV.EVALUATE) & (condition == PV.PERSONA)] += 100.0  # a held-out offset must not leak in
    res = PV.build_vector(x, condition, split, LAYERS, "test")
    assert np.abs(res["vectors"]).max() < 5


def test_split_by_question_is_deterministic_and_refuses_one_question():
    qs = [(f"q{i}", f"question {i}?") for i in range(7)]
    a, b = PV.split_questions(qs, 0, "w"), PV.split_questions(list(reversed(qs)), 0, "w")
    assert a == b and sorted(a) == [q for q, _ in qs]
    assert sum(v == PV.EXTRACT for v in a.values()) == 4
    assert PV.split_questions(qs, 1, "w") != a  # the seed changes the split
    with pytest.raises(UserError, match="at least two"):
        PV.split_questions(qs[:1], 0, "persona vector of 'p'")


def test_trait_file_in_the_persona_vectors_format():
    trait = PV.load_trait_file(TRAIT)
    assert trait["name"] == "pedantic" and len(trait["pairs"]) == 3 and len(trait["questions"]) == 6
    questions, systems = PV.prompt_sets({"kind": "trait_file", "path": str(TRAIT)}, "unused {traits}")
    assert [q for q, _ in questions] == [f"q{i}" for i in range(6)]
    pos, neg = systems[0]
    assert pos.startswith("You are a pedantic assistant. Correct every small inaccuracy")
    assert neg.startswith("You are a helpful assistant. Answer the user's actual question")


def test_a_constitution_gives_its_system_prompt_against_none_on_its_questions():
    from persona_em.persona.constitution import load_constitution, system_prompt

    path = REPO / "config" / "constitutions" / "demo_persona.yaml"
    questions, systems = PV.prompt_sets({"kind": "constitution", "path": str(path)}, "Be: {traits}")
    constitution = load_constitution(path)
    assert systems == [(system_prompt(constitution, "Be: {traits}"), None)]
    assert [q for _, q in questions] == [q for t in constitution.traits for q in t.questions]
    assert len(questions) == 9


def test_bad_trait_files_name_the_file_and_field(tmp_path):
    data = json.loads(TRAIT.read_text())
    data["instruction"][1] = {"pos": "be pedantic"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"trait file .*bad\.json: instruction\[1\]"):
        PV.load_trait_file(bad)
    data = json.loads(TRAIT.read_text())
    data["questions"] = []
    bad.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"bad\.json: questions"):
        PV.load_trait_file(bad)


def test_a_persona_without_constitution_or_trait_file_is_refused_by_name():
    config = {"personas": {"hubby": {"hub": "hf://o/r"}, "trained": {"constitution": "c.yaml"},
                           "traited": {"adapter": "a", "trait_file": str(TRAIT)}}}
    with pytest.raises(UserError, match=r"config personas\.hubby: .*constitution or a trait_file"):
        PV.check_config(config, ["none", "trained", "hubby"])
    sources = PV.check_config(config, ["none", "trained", "traited"])
    assert sources == {"trained": {"kind": "constitution", "path": "c.yaml"},
                       "traited": {"kind": "trait_file", "path": str(TRAIT)}}


def _tiny_run(tmp_path, layers=(0, 1, 2), work="work", out="out"):
    """persona_vectors on the tiny model (CPU): 1 instruction pair x 4 questions x 2 samples; the output dir."""
    import torch

    from persona_helpers import tiny_model

    torch.set_num_threads(1)
    model = tiny_model(tmp_path)
    settings = {"layers": list(layers), "batch_tokens": 256, "kind": "response_mean",
                "persona_vectors": {"samples_per_question": 2, "batch_size": 8, "seed": 0,
                                    "generation": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4}}}
    src = tmp_path / "small.json"
    data = json.loads(TRAIT.read_text())
    data["instruction"], data["questions"] = data["instruction"][:1], data["questions"][:4]
    src.write_text(json.dumps(data))
    PV.persona_vectors("tiny", "p", {"kind": "trait_file", "path": str(src)}, str(model), settings, "",
                       str(tmp_path / work), str(tmp_path / out))
    return tmp_path / out


def test_persona_vectors_on_the_tiny_model(tmp_path):
    """The stage end to end on CPU: rollouts with and without the system prompt, one vector per layer, the files."""
    out = _tiny_run(tmp_path)
    info, vecs = PV.load_persona_vector(out)
    assert vecs.shape == (3, 64) and info["layers"] == [0, 1, 2] and info["chosen_layer"] in (0, 1, 2)
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 4 * 2 * 2
    assert {r["condition"] for r in rollouts} == {PV.PERSONA, PV.BASELINE}
    assert all(r["system"].startswith("You are a small assistant.") for r in rollouts if r["condition"] == PV.PERSONA)
    assert set(info["split"]["extract"]) | set(info["split"]["evaluate"]) == {"q0", "q1", "q2", "q3"}
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == []  # journals and the kept pass removed


def test_a_job_killed_after_the_teacher_forced_pass_reuses_it(tmp_path, monkeypatch, caplog):
    """Killed after the pass (before the output is written), a rerun loads neither the model nor measures again,
    says so in its log, and writes the same bytes as an uninterrupted run; a kept pass of other layers is not
    reused."""
    import logging

    import persona_em.models
    from persona_em.activations import collect

    reference = _tiny_run(tmp_path, work="ref_work", out="ref")
    real_measure, real_write, calls = collect.measure, PV.write_vector, []
    monkeypatch.setattr(collect, "measure", lambda *a, **k: (calls.append(1), real_measure(*a, **k))[1])

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(PV, "write_vector", killed)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tmp_path, layers=(0, 2))
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tmp_path)  # other layers than the kept pass: measured again
    assert len(calls) == 2 and not (tmp_path / "out").exists()
    assert (tmp_path / "work" / PV.FORWARD_FILE).exists()

    calls.clear()
    monkeypatch.setattr(PV, "write_vector", real_write)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded again")

    monkeypatch.setattr(persona_em.models, "load_model", no_model)
    with caplog.at_level(logging.INFO, logger=PV.__name__):
        out = _tiny_run(tmp_path)
    assert calls == []
    assert any("teacher-forced pass over 16 rollouts resumed from" in r.getMessage() for r in caplog.records)
    files = sorted(p.name for p in reference.iterdir())
    assert files == sorted(p.name for p in out.iterdir()) and "vector.safetensors" in files
    for name in files:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == []


def test_dry_run_names_a_grid_persona_without_a_vector_source(tmp_path):
    """At parse time (snakemake -n), before any job: one line naming the key, non-zero exit."""
    import yaml

    from conftest import run_snakemake
    from test_project import write_user_files

    write_user_files(tmp_path, "arena_phase1.yaml")
    cfg = yaml.safe_load((REPO / "config/experiments/arena_phase1.yaml").read_text())
    cfg["analysis"] = {"activations": {"layers": [0, 14]}}
    cfg["personas"]["goodness"]["trait_file"] = str(TRAIT)  # sycophancy has neither source
    res = run_snakemake(tmp_path, cfg, "-n")
    assert res.returncode != 0
    lines = [line for line in res.stdout.splitlines() if "config personas." in line]
    assert len(lines) == 1 and "config personas.sycophancy: persona vectors" in lines[0], res.stdout[-2000:]
    assert not (tmp_path / "results").exists()
