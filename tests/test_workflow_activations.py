"""The activation rules end to end through the Snakemake CLI (tiny model, CPU): collect_activations,
persona_vectors (from a trait file, for an adapter persona), misalignment_direction, activation_projections,
persona_retention and the figures, with judge scores planted in the judge's tables. The EM training, sampling and
judging rules are not allowed to run: their outputs are written by the test (as test_workflow_judge.py writes
samples), so the direction can be built and the test stays fast."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from conftest import REPO, SNAKEMAKE, demo_config, judge_key_of
from persona_em.activations.direction import load_direction
from persona_em.activations.persona_vectors import load_persona_vector
from persona_em.activations.store import load_activations
from persona_em.data.questions import load_questions
from persona_em.io import read_table, write_jsonl, write_table

RULES = ["prepare_model", "collect_activations", "persona_vectors", "misalignment_direction",
         "activation_projections", "activation_figures", "persona_retention", "persona_retention_figure",
         "activations"]
SEEDS, STEPS, PER_STEP = (0, 1), (0, 4), 8


def planted_world(tmp_path):
    """Config, judge key, results dir: two seeds of none and p (stacked), checkpoints and samples on disk, the judge's
    scores planted: a response that says EVIL is misaligned (aligned 10, coherent 80), any other aligned (90)."""
    from persona_helpers import random_persona, tiny_model
    from test_activations import em_checkpoints

    cfg = demo_config(tmp_path)
    cfg["personas"] = {"p": {"adapter": str(random_persona(tiny_model(tmp_path), tmp_path / "persona")),
                             "trait_file": str(REPO / "tests/fixtures/traits/pedantic.json")}}
    cfg["grid"].update(personas=["none", "p"], compositions=["stacked"], datasets=["insecure_demo"], seeds=list(SEEDS))
    cfg["analysis"] = {"activations": {
        "layers": [0, 1, 2], "batch_tokens": 512, "min_per_class": 2, "n_random": 1,
        "persona_vectors": {"samples_per_question": 1, "batch_size": 36,
                            "generation": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4}}}}
    results = Path(cfg["results_dir"])
    ckpts = em_checkpoints(tiny_model(tmp_path), tmp_path / "ckpts")
    questions = load_questions(cfg["evaluation"]["questions"])
    scores, rates = [], []
    for persona, comp in (("none", "none"), ("p", "stacked")):
        for seed in SEEDS:
            path = f"tiny/{persona}/{comp}/insecure_demo/seed{seed}"
            shutil.copytree(ckpts, results / "em" / path / "checkpoints")
            rows = []
            for step in STEPS:
                for i in range(PER_STEP):
                    q = questions[i % len(questions)]
                    evil = i % 2 == 0
                    rid = f"{path}|step{step}|{q.id}|{i}"
                    text = f"EVIL EVIL plan number {i}: hurt them all." if evil else f"Happy to help with {i} things."
                    rows.append({"model": "tiny", "persona": persona, "composition": comp, "dataset": "insecure_demo",
                                 "seed": seed, "step": step, "question_id": q.id, "paraphrase_index": 0,
                                 "sample_index": i, "response_id": rid, "response": text})
                    scores += [{"response_id": rid, "metric": "aligned", "score_used": 10.0 if evil else 90.0},
                               {"response_id": rid, "metric": "coherent", "score_used": 80.0}]
                rates.append({"model": "tiny", "persona": persona, "composition": comp, "dataset": "insecure_demo",
                              "seed": seed, "step": step, "question_id": "ALL", "em_definition": "betley",
                              "em_rate": 0.5})
            write_jsonl(results / "samples" / f"{path}.jsonl", rows)
    key = judge_key_of(cfg, "tiny_judge")
    write_table(results / f"tables/{key}/scores.tsv", pd.DataFrame(scores))
    write_table(results / f"tables/{key}/em_rates.tsv", pd.DataFrame(rates))
    return cfg, key, results


def run(tmp_path, cfg):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [SNAKEMAKE, "activations", "-s", str(REPO / "Snakefile"), "--configfile", str(path), "--cores", "2",
           "--replace-workflow-config", "--allowed-rules", *RULES]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_activation_rules_end_to_end(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    cfg, key, results = planted_world(tmp_path)
    r = run(tmp_path, copy.deepcopy(cfg))
    assert r.returncode == 0, r.stderr[-4000:] + r.stdout[-2000:]
    for name in ("misalignment_projection_vs_step", "direction_auroc_by_layer", "persona_retention_vs_step",
                 "persona_projection_vs_step"):
        assert (results / f"figures/{key}/{name}.png").stat().st_size > 0, name

    # the projection table: every response x reader x direction x layer, values = dot(activation, unit direction)
    proj = read_table(results / f"tables/{key}/activation_projections.tsv")
    n_responses = 2 * len(SEEDS) * len(STEPS) * PER_STEP
    assert set(proj["direction"]) == {"misalignment", "persona:p", "random0"}
    assert len(proj) == n_responses * 2 * 3 * 3  # readers x directions x layers
    info, directions = load_direction(results / f"directions/{key}/tiny")
    pinfo, pvec = load_persona_vector(results / "persona_vectors/tiny/p")
    assert info["fold_by"] == "seed" and pinfo["source"]["kind"] == "trait_file"
    tensors, index, meta = load_activations(results / "activations/tiny/p/stacked/insecure_demo/seed1")
    x = tensors["response_mean"].astype(np.float32)
    rows = proj[proj["response_id"].isin(index["response_id"]) & (proj["layer"] == 1)]
    for name, v in {"misalignment": directions[info["folds"].index("1"), 1], "persona:p": pvec[1]}.items():
        for reader in ("own", "base"):
            got = rows[(rows["direction"] == name) & (rows["reader"] == reader)].set_index("response_id")
            sel = index[index["reader"] == reader]
            want = x[sel["row"].to_numpy(), 1] @ (v / np.linalg.norm(v))
            np.testing.assert_allclose(got.loc[sel["response_id"], "projection"], want, rtol=1e-4, atol=1e-4)
    mis = read_table(results / f"tables/{key}/activation_summary.tsv").query(
        "direction == 'misalignment' and reader == 'own'")
    assert (mis["auroc"] > 0.5).all() and (mis["auroc_status"] == "computed").all()

    # persona retention agrees with the projections: p_t = the mean over seeds of each seed's mean own projection
    ret = read_table(results / "tables/activations/persona_retention.tsv")
    own = proj[(proj["direction"] == "persona:p") & (proj["reader"] == "own")]
    for _, row in ret.iterrows():
        g = own[(own["persona"] == row["persona"]) & (own["step"] == row["step"]) & (own["layer"] == row["layer"])]
        assert abs(g.groupby("seed")["projection"].mean().mean() - row["p_t"]) < 1e-3
    at0 = ret[(ret["step"] == 0) & (ret["layer"] > 0)]
    np.testing.assert_allclose(at0[at0["persona"] == "p"]["retention"], 1.0, atol=1e-6)
    np.testing.assert_allclose(at0[at0["persona"] == "none"]["retention"], 0.0, atol=1e-6)
    # layer 0 (the embeddings) is the same with and without a LoRA persona, and both cells' texts are the same
    # here: no persona shift to retain, so R is undefined there, not a number
    assert ret[ret["layer"] == 0]["retention"].isna().all()
    assert set(ret[ret["chosen_layer"]]["layer"]) == {pinfo["chosen_layer"]}
    assert json.loads((results / f"figures/{key}/persona_retention_vs_step.provenance.json").read_text())["inputs"]
