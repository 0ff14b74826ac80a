"""Persona vectors: one direction per base model, persona and layer (rule persona_vectors; issue 14 stage 4).

Recipe (Chen et al. 2025, "Persona vectors", safety-research/persona_vectors): the base model answers questions
with a system prompt that asks for the persona and with one that does not; the persona vector at a layer is the mean
activation over the response tokens of the first minus that of the second. Here:

* Source of a persona (`personas.<name>` in the config): `trait_file` when given (a file in the persona-vectors
  format, see load_trait_file), else its `constitution`. A persona with neither (a hub or adapter persona without a
  trait file) is refused at parse time naming the key (check_config).
  - constitution: "persona" rollouts have the constitution's system prompt, made by
    persona_em.persona.constitution.system_prompt with persona_training.teacher.system_prompt_template (the prompt
    the persona arm's teacher answered in character with); "baseline" rollouts have no system prompt (the chat
    template's own default, if it adds one, stays: that is the model without the persona). Questions: every trait's
    seed questions.
  - trait file: "persona" = "You are a(n) <trait> assistant. <pos>", "baseline" = "You are a helpful assistant.
    <neg>", for every instruction pair (safety-research/persona_vectors eval/eval_persona.py,
    load_persona_questions: the system prompt f"You are {a_or_an(name)} {name} assistant. {instruction}", name =
    the trait for pos and "helpful" for neg). Questions: the file's `questions`.
  Every (question, system prompt) is answered `samples_per_question` times. Unlike the paper, the rollouts are not
  filtered by a judge's trait score (no judge is needed; a weak persona prompt gives a weak vector, which the
  held-out separation below shows).
* Rollouts: the base model, through the project's one generation definition (persona_em.sampling.sample
  .generate_batch via persona_em.persona.generation's journaled runner: a killed job resumes).
* Activations: the same teacher-forced pass and exact assistant span as collect_activations (collect.response_tokens,
  collect.measure), the base model reading its own rollouts with the system prompt they were written under; `kind`
  (analysis.activations.kind) at the configured layers. The pass is kept in work_dir with a journal line
  (teacher_forced), so a job killed after it reuses it instead of loading the model again.
* Split: by question, so that held-out rollouts answer questions the vector never saw: the questions ordered by a
  stable hash of (seed, text), the first half (rounded up) = extract, the rest = evaluate. Fewer than two questions
  is an error.
* Vector per layer: mean(persona, extract) - mean(baseline, extract). Layer: the highest held-out Cohen's d of the
  evaluate half's projections on the unit vector (persona vs baseline rollouts; persona_em.analysis.stats.cohens_d);
  Cohen's d, not AUROC, because AUROC saturates at 1 on every layer where the two sets separate fully and then
  cannot rank them. The held-out AUROC is recorded beside it. Ties go to the earlier layer.

Output (a directory, atomically): vector.safetensors (`vectors` float32 [layers, hidden] -- not unit: the raw mean
difference, `layers`), layers.tsv (per layer: counts, norm, held-out Cohen's d and AUROC, chosen), rollouts.jsonl
(every rollout with its condition, split and system prompt), vector.json (model, persona, source and its sha256,
chosen layer, split, settings).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from persona_em.errors import UserError

log = logging.getLogger(__name__)

PERSONA, BASELINE = "persona", "baseline"
EXTRACT, EVALUATE = "extract", "evaluate"
NO_PERSONA = "none"
# in work_dir, removed once the output is written: the rollouts' journal, the teacher-forced pass and its journal line
ROLLOUTS_JOURNAL = "rollouts.journal.jsonl"
FORWARD_FILE = "activations.safetensors"
FORWARD_JOURNAL = "activations.journal.jsonl"


# --- sources -------------------------------------------------------------------------------------------------------
def _a_or_an(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def load_trait_file(path: str | Path) -> dict:
    """A trait file in the persona-vectors format (data_generation/trait_data_extract/<trait>.json of
    safety-research/persona_vectors): {"instruction": [{"pos": str, "neg": str}, ...], "questions": [str, ...],
    "eval_prompt": str}; the trait's name is the file's stem. Returns {name, pairs, questions, eval_prompt}; any
    defect is one UserError naming the file and the field."""
    path = Path(path)
    where = f"trait file {path}"
    if not path.is_file():
        raise UserError(f"{where}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected an object with instruction, questions and eval_prompt")
    pairs = data.get("instruction")
    if not isinstance(pairs, list) or not pairs:
        raise UserError(f"{where}: instruction: a non-empty list of {{pos, neg}} pairs is required")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict) or set(pair) != {"pos", "neg"} or not all(
                isinstance(pair[k], str) and pair[k].strip() for k in ("pos", "neg")):
            raise UserError(f"{where}: instruction[{i}]: must be {{\"pos\": text, \"neg\": text}}, got {pair!r}")
    questions = data.get("questions")
    if not isinstance(questions, list) or not questions:
        raise UserError(f"{where}: questions: a non-empty list of strings is required")
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"{where}: questions[{i}]: must be a non-empty string")
    eval_prompt = data.get("eval_prompt", "")
    if not isinstance(eval_prompt, str):
        raise UserError(f"{where}: eval_prompt: must be a string")
    return {"name": path.stem, "pairs": [(p["pos"].strip(), p["neg"].strip()) for p in pairs],
            "questions": [q.strip() for q in questions], "eval_prompt": eval_prompt}


def persona_source(config: dict, persona: str) -> dict:
    """{kind: trait_file | constitution, path} of a persona's vector (module docstring), or one UserError naming
    the key."""
    spec = (config.get("personas") or {}).get(persona)
    if spec is None:
        raise UserError(f"config personas.{persona}: not defined, so it has no persona vector source")
    if "trait_file" in spec:
        return {"kind": "trait_file", "path": spec["trait_file"]}
    if "constitution" in spec:
        return {"kind": "constitution", "path": spec["constitution"]}
    raise UserError(f"config personas.{persona}: persona vectors (analysis.activations) need a constitution or a "
                    f"trait_file (persona-vectors format), and persona {persona!r} has neither")


def check_config(config: dict, personas: list[str]) -> dict[str, dict]:
    """Parse time: the vector source of every grid persona but none, each file read and checked when it is on
    disk. persona -> source."""
    from persona_em.persona.constitution import load_constitution

    sources = {}
    for persona in personas:
        if persona == NO_PERSONA:
            continue
        src = persona_source(config, persona)
        if Path(src["path"]).is_file():
            load_trait_file(src["path"]) if src["kind"] == "trait_file" else load_constitution(src["path"])
        sources[persona] = src
    return sources


def prompt_sets(source: dict, template: str) -> tuple[list[tuple[str, str]], list[tuple[str | None, str | None]]]:
    """(questions as (id, text), system prompt pairs (persona, baseline); None = no system prompt)."""
    if source["kind"] == "trait_file":
        trait = load_trait_file(source["path"])
        name = trait["name"]
        systems = [(f"You are {_a_or_an(name)} {name} assistant. {pos}", f"You are a helpful assistant. {neg}")
                   for pos, neg in trait["pairs"]]
        texts = trait["questions"]
    else:
        from persona_em.persona.constitution import load_constitution, system_prompt

        constitution = load_constitution(source["path"])
        systems = [(system_prompt(constitution, template), None)]
        texts = list(dict.fromkeys(q for t in constitution.traits for q in t.questions))
    return [(f"q{i}", text) for i, text in enumerate(texts)], systems


def split_questions(questions: list[tuple[str, str]], seed: int, where: str) -> dict[str, str]:
    """question id -> extract | evaluate: ordered by a stable hash of (seed, text), the first half (rounded up)
    extract."""
    from persona_em.io import stable_hash

    if len(questions) < 2:
        raise UserError(f"{where}: {len(questions)} question(s); persona vectors need at least two, so that the "
                        f"layer is chosen on questions the vector was not built from")
    order = sorted(questions, key=lambda q: stable_hash([seed, q[1]]))
    n_extract = math.ceil(len(order) / 2)
    return {qid: EXTRACT if i < n_extract else EVALUATE for i, (qid, _) in enumerate(order)}


# --- the vector ----------------------------------------------------------------------------------------------------
def build_vector(x: np.ndarray, condition: np.ndarray, split: np.ndarray, layers: list[int], where: str) -> dict:
    """The persona vector per layer from x [n, layers, hidden] (module docstring). condition: PERSONA / BASELINE;
    split: EXTRACT / EVALUATE. Returns {vectors [layers, hidden], rows (layers.tsv), chosen_layer}."""
    from persona_em.activations.direction import ALIGNED, MISALIGNED, auroc, unit
    from persona_em.analysis.stats import cohens_d

    masks = {(c, s): (condition == c) & (split == s) for c in (PERSONA, BASELINE) for s in (EXTRACT, EVALUATE)}
    empty = [f"{c}/{s}" for (c, s), m in masks.items() if not m.any()]
    if empty:
        raise UserError(f"{where}: no rollouts in {', '.join(empty)}")
    vectors = x[masks[PERSONA, EXTRACT]].mean(0) - x[masks[BASELINE, EXTRACT]].mean(0)
    held = masks[PERSONA, EVALUATE] | masks[BASELINE, EVALUATE]
    labels = np.where(condition[held] == PERSONA, MISALIGNED, ALIGNED)  # auroc's positive class = persona
    rows, ds = [], []
    for j, layer in enumerate(layers):
        proj = x[held, j] @ unit(vectors[j])
        d = cohens_d(proj[labels == MISALIGNED], proj[labels == ALIGNED])
        ds.append(d)
        rows.append({"layer": layer, "n_persona_extract": int(masks[PERSONA, EXTRACT].sum()),
                     "n_baseline_extract": int(masks[BASELINE, EXTRACT].sum()),
                     "n_persona_evaluate": int(masks[PERSONA, EVALUATE].sum()),
                     "n_baseline_evaluate": int(masks[BASELINE, EVALUATE].sum()),
                     "vector_norm": float(np.linalg.norm(vectors[j])), "cohens_d_heldout": d,
                     "auroc_heldout": auroc(proj, labels)})
    if all(math.isnan(d) for d in ds):
        raise UserError(f"{where}: the held-out separation is undefined at every layer (fewer than two evaluate "
                        f"rollouts per condition, or no spread); add questions or samples_per_question")
    best = int(np.nanargmax(ds))
    for j, row in enumerate(rows):
        row["chosen"] = j == best
    return {"vectors": vectors.astype(np.float32), "rows": rows, "chosen_layer": layers[best]}


def persona_vectors(model: str, persona: str, source: dict, model_dir: str, settings: dict, template: str,
                    work_dir: str, out_dir: str, chat=None) -> None:
    """Rollouts, activations and the vector of one (model, persona) (module docstring). `settings`: the
    analysis.activations block (layers, batch_tokens, kind, persona_vectors: samples_per_question, batch_size,
    generation, seed)."""
    from persona_em.activations.collect import num_layers, response_tokens
    from persona_em.activations.settings import check_layers
    from persona_em.chat import ChatFormat
    from persona_em.io import sha256_file, stable_hash
    from persona_em.persona.generation import HFBackend, Request, generator_identity, item_seed, run_journaled

    where = f"persona vector of {persona!r} on model {model!r}"
    pv = settings["persona_vectors"]
    layers = check_layers(list(settings["layers"]), num_layers(model_dir), model)
    questions, systems = prompt_sets(source, template)
    split_of = split_questions(questions, pv["seed"], f"{where} ({source['kind']} {source['path']})")
    requests = []
    for qid, text in questions:
        for k, pair in enumerate(systems):
            for condition, system in zip((PERSONA, BASELINE), pair):
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": text}]
                for i in range(pv["samples_per_question"]):
                    key = f"{condition}|{qid}|{k}|{i}"
                    requests.append(Request(key, messages, item_seed(pv["seed"], key), meta={
                        "condition": condition, "question_id": qid, "question": text, "instruction_index": k,
                        "sample_index": i, "system": system, "split": split_of[qid]}))
    generator = {"name": f"persona_vectors_{model}", "backend": "hf", "model": model, "batch_size": pv["batch_size"]}
    fingerprint = generator_identity(generator, {**pv["generation"], "source": sha256_file(source["path"]),
                                                 "template": template}, model_dir, chat)
    held = {}

    def backend():
        held["backend"] = HFBackend(generator, pv["generation"], model_dir, chat=chat)
        return held["backend"]

    work = Path(work_dir)
    done = run_journaled(requests, backend, work / ROLLOUTS_JOURNAL, fingerprint,
                         desc=f"persona vector rollouts {model}/{persona}")
    rollouts = [{**{k: done[r.key][k] for k in r.meta}, "key": r.key, "response": done[r.key]["text"]}
                for r in requests]
    chat_format = ChatFormat.load(model_dir, chat)
    tokens = [response_tokens(chat_format, r.messages, row["response"]) for r, row in zip(requests, rollouts)]

    def model_obj():
        if "backend" in held:
            return held["backend"].model
        from persona_em.models import load_model

        return load_model(model_dir, chat, device="auto")[0]

    x = teacher_forced(model_obj, tokens, layers, chat_format.tokenizer.pad_token_id, int(settings["batch_tokens"]),
                       stable_hash([fingerprint, layers, [(r["key"], r["response"]) for r in rollouts]]), work,
                       where)[settings["kind"]].float().numpy()
    for row, (_, start, end) in zip(rollouts, tokens):
        row["n_prompt_tokens"], row["n_response_tokens"] = start, end - start
    res = build_vector(x, np.array([r["condition"] for r in rollouts]), np.array([r["split"] for r in rollouts]),
                       layers, where)
    log.info("%s: %d rollouts, chosen layer %d (held-out Cohen's d %.2f)", where, len(rollouts),
             res["chosen_layer"], next(r["cohens_d_heldout"] for r in res["rows"] if r["chosen"]))
    write_vector(out_dir, {
        "model": model, "persona": persona, "source": {**source, "sha256": sha256_file(source["path"])},
        "layers": layers, "chosen_layer": res["chosen_layer"], "kind": settings["kind"],
        "layer_selection": "highest held-out Cohen's d (evaluate half, persona vs baseline rollouts)",
        "split": {"by": "question", "extract": sorted(q for q, s in split_of.items() if s == EXTRACT),
                  "evaluate": sorted(q for q, s in split_of.items() if s == EVALUATE)},
        "n_rollouts": len(rollouts), "settings": pv, "system_prompts": [list(p) for p in systems]},
        res["vectors"], res["rows"], [{"model": model, "persona": persona, **r} for r in rollouts])
    for name in (ROLLOUTS_JOURNAL, FORWARD_JOURNAL, FORWARD_FILE):
        (work / name).unlink(missing_ok=True)


def teacher_forced(load_model, tokens, layers: list[int], pad_id: int, batch_tokens: int, fingerprint: str,
                   work: Path, where: str) -> dict:
    """Both kinds of activation of every rollout (collect.measure, fp16), journaled as collect_activations journals
    its units: the tensors go to work/FORWARD_FILE atomically, then a journal line with `fingerprint` (the rollouts'
    generation fingerprint, their texts and the layers). A rerun with the same fingerprint loads them instead of
    loading the model and measuring again; `load_model()` gives the model only when a pass is needed."""
    import torch
    from safetensors.torch import load_file, save_file

    from persona_em.activations.collect import measure
    from persona_em.io import Journal, atomic_path

    journal = Journal(work / FORWARD_JOURNAL, key_field="key")
    row = journal.load().get("forward")
    if row is not None and row.get("fingerprint") == fingerprint and (work / row["file"]).exists():
        log.info("%s: teacher-forced pass over %d rollouts resumed from %s (not measured again)", where, len(tokens),
                 work / row["file"])
        return load_file(str(work / row["file"]))
    model = load_model()
    model.eval()
    with torch.inference_mode():
        x = measure(model, tokens, layers, pad_id, batch_tokens)
    with atomic_path(work / FORWARD_FILE, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in x.items()}, str(tmp))
    journal.append({"key": "forward", "file": FORWARD_FILE, "fingerprint": fingerprint, "n_rollouts": len(tokens)})
    journal.close()
    log.info("%s: teacher-forced pass over %d rollouts measured, kept in %s until the output is written", where,
             len(tokens), work / FORWARD_FILE)
    return x


def write_vector(out_dir, info: dict, vectors: np.ndarray, rows: list[dict], rollouts: list[dict]) -> None:
    """One persona_vectors output directory, atomically (module docstring): `info` becomes vector.json."""
    import pandas as pd
    from safetensors.numpy import save_file

    from persona_em.io import atomic_dir, write_json, write_jsonl, write_table

    with atomic_dir(out_dir) as tmp:
        save_file({"vectors": np.asarray(vectors, dtype=np.float32),
                   "layers": np.array(info["layers"], dtype=np.int64)}, str(tmp / "vector.safetensors"))
        write_table(tmp / "layers.tsv", pd.DataFrame(rows).assign(model=info["model"], persona=info["persona"]))
        write_jsonl(tmp / "rollouts.jsonl", rollouts)
        write_json(tmp / "vector.json", info)


def load_persona_vector(out_dir) -> tuple[dict, np.ndarray]:
    """(vector.json, vectors [layers, hidden]) of one persona_vectors output."""
    from safetensors.numpy import load_file

    from persona_em.io import read_json

    return read_json(f"{out_dir}/vector.json"), load_file(f"{out_dir}/vector.safetensors")["vectors"]
