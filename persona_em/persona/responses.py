"""teacher and student: every prompt x K samples, answered in character (teacher) or plainly (student).

teacher: system prompt = the constitution's traits through `system_prompt_template`; with `reasoning.prefill` the
  answer starts with that text (e.g. "<think>") and only what follows `reasoning.close_tag` is kept; a sample whose
  closing tag is missing is dropped (counted in the log and the output's companion stats).
student: the base model, no system prompt.
Both append every finished item to a journal at once (rerun continues) and write the final JSONL atomically.

Output rows: constitution, prompt_id, sample_index, prompt, response, role (teacher|student), generator, model.
"""
from __future__ import annotations

import logging

from persona_em.chat import ChatSettings
from persona_em.io import read_jsonl, write_jsonl
from persona_em.persona.constitution import load_constitution, system_prompt
from persona_em.persona.generation import Request, generator_identity, item_seed, make_backend, run_journaled, split_reasoning

log = logging.getLogger(__name__)


def respond(role: str, constitution_path: str, prompts_path: str, generator: dict, model_dir: str | None,
            settings: dict, journal_path: str, out_path: str, chat: ChatSettings | None = None) -> None:
    constitution = load_constitution(constitution_path)
    prompts = read_jsonl(prompts_path)
    gen = settings["generation"]
    system = system_prompt(constitution, settings["system_prompt_template"]) if role == "teacher" else None
    reasoning = settings.get("reasoning") or {} if role == "teacher" else {}
    prefill, close_tag = reasoning.get("prefill", ""), reasoning.get("close_tag")
    k = settings["samples_per_prompt"]
    requests = []
    for p in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": p["prompt"]}]
        for i in range(k):
            key = f"{p['prompt_id']}|{i}"
            requests.append(Request(key, messages, item_seed(settings["seed"], role, key), prefill,
                                    meta={"prompt_id": p["prompt_id"], "sample_index": i}))
    fingerprint = generator_identity(generator, {**gen, "system": system, "prefill": prefill}, model_dir, chat)
    done = run_journaled(requests, lambda: make_backend(generator, gen, model_dir, chat=chat), journal_path,
                         fingerprint, desc=f"{role} {constitution.name}")
    by_id = {p["prompt_id"]: p for p in prompts}
    rows, dropped = [], 0
    for req in requests:
        row = done[req.key]
        answer = split_reasoning(row["text"], close_tag)
        if answer is None:
            dropped += 1
            continue
        rows.append({"constitution": constitution.name, "prompt_id": row["prompt_id"],
                     "sample_index": row["sample_index"], "prompt": by_id[row["prompt_id"]]["prompt"],
                     "response": answer, "role": role, "generator": generator["name"], "model": generator["model"]})
    if dropped:
        log.warning("%s: dropped %d of %d samples whose reasoning had no closing tag %r",
                    role, dropped, len(requests), close_tag)
    write_jsonl(out_path, rows)
    log.info("%s: %d responses written to %s", role, len(rows), out_path)
