"""dpo_pairs: teacher (chosen) and student (rejected) answers to the same prompt and sample index, filtered.

Drops, each counted in the stats file: missing_student / missing_teacher (no partner for the join), empty (either
answer empty), no_final_punctuation (either answer does not end in . ! ? or a closing quote/bracket after one;
`require_final_punctuation: false` switches this off), too_long (prompt + the longer answer with its end-of-turn
token, tokenized as train_dpo does by persona_em.chat, over `max_length` tokens). The teacher's self-name is replaced by the student's in the chosen answer (whole words).
Below `min_pairs` pairs a loud warning is logged and the stats say so.

Output rows (TRL conversational preference format): prompt [{user}], chosen [{assistant}], rejected [{assistant}],
plus constitution, prompt_id, sample_index.
"""
from __future__ import annotations

import logging
import re
import sys
from collections import Counter

from persona_em.chat import ChatFormat, ChatSettings
from persona_em.io import read_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)

_FINAL_PUNCT = re.compile(r"[.!?…][\"'”’)\]*_`]*\s*$")


def ends_in_punctuation(text: str) -> bool:
    return bool(_FINAL_PUNCT.search(text))


def swap_self_name(text: str, teacher_name: str | None, student_name: str | None) -> str:
    if not teacher_name or not student_name:
        return text
    return re.sub(rf"\b{re.escape(teacher_name)}\b", student_name, text)


def pair_length(chat: ChatFormat, prompt: str, chosen: str, rejected: str) -> int:
    """Tokens of the prompt + the longer answer, as train_dpo tokenizes the pair."""
    ids = chat.preference_ids([{"role": "user", "content": prompt}], chosen, rejected)
    return len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"]))


def make_pairs(teacher_path: str, student_path: str, model_dir: str, settings: dict, out_path: str,
               stats_path: str, chat: ChatSettings | None = None) -> None:
    chat_format = ChatFormat.load(model_dir, chat)
    teacher = {(r["prompt_id"], r["sample_index"]): r for r in read_jsonl(teacher_path)}
    student = {(r["prompt_id"], r["sample_index"]): r for r in read_jsonl(student_path)}
    drops: Counter = Counter()
    pairs = []
    for key in sorted(set(teacher) | set(student)):
        if key not in student:
            drops["missing_student"] += 1
            continue
        if key not in teacher:
            drops["missing_teacher"] += 1
            continue
        t, s = teacher[key], student[key]
        chosen = swap_self_name(t["response"].strip(), settings.get("teacher_self_name"),
                                settings.get("student_self_name"))
        rejected = s["response"].strip()
        if not chosen or not rejected:
            drops["empty"] += 1
            continue
        if settings["require_final_punctuation"] and not (ends_in_punctuation(chosen) and ends_in_punctuation(rejected)):
            drops["no_final_punctuation"] += 1
            continue
        if pair_length(chat_format, t["prompt"], chosen, rejected) > settings["max_length"]:
            drops["too_long"] += 1
            continue
        pairs.append({"constitution": t["constitution"], "prompt_id": key[0], "sample_index": key[1],
                      "prompt": [{"role": "user", "content": t["prompt"]}],
                      "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    below = len(pairs) < settings["min_pairs"]
    stats = {"pairs": len(pairs), "candidates": len(set(teacher) | set(student)), "dropped": dict(sorted(drops.items())),
             "min_pairs": settings["min_pairs"], "below_min_pairs": below, "max_length": settings["max_length"]}
    if below:
        log.warning("!" * 80)
        log.warning("ONLY %d DPO PAIRS (configured minimum %d): the persona will be weakly trained. Drops: %s",
                    len(pairs), settings["min_pairs"], dict(drops))
        log.warning("!" * 80)
        print(f"WARNING: only {len(pairs)} DPO pairs (minimum {settings['min_pairs']}); see {stats_path}",
              file=sys.__stderr__)
    write_jsonl(out_path, pairs)
    write_json(stats_path, stats)
    log.info("%d pairs; dropped %s", len(pairs), dict(drops))
