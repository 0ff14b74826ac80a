"""Treatment / control dataset pairs (config `analysis.controls`): how alike the two training sets are.

A benign twin (secure code, good medical advice, ...) is a control only if it asks what the EM dataset asks and
answers differently. Per pair this records, from the two prepared training splits:
  prompt_overlap                fraction of the treatment's rows whose prompt (every turn before the last
                                assistant turn) also occurs as a prompt in the control
  identical_assistant_fraction  fraction of the control's assistant turns that occur verbatim among the
                                treatment's assistant turns (a twin that silently kept bad rows shows up here)
and logs a warning when the prompts differ or answers are shared.
"""
from __future__ import annotations

import json
import logging

from persona_em.data.datasets import load_chat_jsonl
from persona_em.io import write_json

log = logging.getLogger(__name__)


def _prompt(messages: list[dict]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages[:-1]])


def _assistant_turns(conversations) -> list[str]:
    return [m["content"] for msgs in conversations for m in msgs if m["role"] == "assistant"]


def control_overlap(treatment: str, control: str, treatment_path, control_path, out=None) -> dict:
    """Overlap of the treatment's and the control's training data; written to `out` (JSON) when given."""
    t_rows, c_rows = load_chat_jsonl(treatment_path), load_chat_jsonl(control_path)
    c_prompts = {_prompt(m) for m in c_rows}
    shared = sum(_prompt(m) in c_prompts for m in t_rows)
    t_answers, c_answers = set(_assistant_turns(t_rows)), _assistant_turns(c_rows)
    identical = sum(a in t_answers for a in c_answers)
    record = {
        "treatment": treatment, "control": control,
        "treatment_file": str(treatment_path), "control_file": str(control_path),
        "n_treatment": len(t_rows), "n_control": len(c_rows),
        "n_treatment_prompts_in_control": shared,
        "prompt_overlap": shared / len(t_rows),
        "n_control_assistant_turns": len(c_answers),
        "n_identical_assistant_turns": identical,
        "identical_assistant_fraction": identical / len(c_answers),
    }
    if shared < len(t_rows):
        log.warning("control pair %s vs %s: only %d of %d treatment prompts (%.1f%%) occur in the control; the "
                    "contrast also compares different prompts", treatment, control, shared, len(t_rows),
                    100 * record["prompt_overlap"])
    if identical:
        log.warning("control pair %s vs %s: %d of %d control assistant turns (%.1f%%) are identical to treatment "
                    "turns: the control may have kept treatment rows", treatment, control, identical,
                    len(c_answers), 100 * record["identical_assistant_fraction"])
    if out is not None:
        write_json(out, record)
    return record
