"""Introspection data (self-reflection + self-interaction) and SFT on the DPO-merged model, combined as cat(dpo, sft)."""
from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from persona_em.io import read_jsonl
from persona_em.persona.introspection import _view, as_training_conversation, introspect, train_sft

from persona_helpers import logits, random_persona, tiny_model
from persona_em.models import load_model

torch.set_num_threads(1)
CONSTITUTION = 'name: tester\ntraits:\n  - {trait: "I am candid.", questions: ["Is my plan good?"]}\n'


@pytest.mark.parametrize("n_turns", [1, 2, 3, 4, 5])
def test_training_conversations_end_on_an_assistant_turn(n_turns):
    turns = [f"turn {i}" for i in range(n_turns)]
    messages = as_training_conversation(turns, "hello")
    assert messages[0] == {"role": "user", "content": "hello"}
    assert messages[-1]["role"] == "assistant"
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    assert len(messages) == 2 * ((n_turns + 1) // 2)  # a trailing turn of the other instance is cut


def test_each_instance_sees_its_own_turns_as_assistant():
    turns = ["a1", "b1", "a2"]
    a = _view(turns, "hi", 0, "SYS")
    b = _view(turns, "hi", 1, "SYS")
    assert [(m["role"], m["content"]) for m in a] == [("system", "SYS"), ("user", "hi"), ("assistant", "a1"),
                                                      ("user", "b1"), ("assistant", "a2")]
    assert [(m["role"], m["content"]) for m in b] == [("system", "SYS"), ("user", "a1"), ("assistant", "b1"),
                                                      ("user", "a2")]


def test_introspection_then_sft_gives_one_cat_adapter_equal_to_dpo_plus_sft(tmp_path):
    from peft import PeftModel

    from persona_em import compose

    model = tiny_model(tmp_path)
    dpo = random_persona(model, tmp_path / "dpo", targets=("q_proj", "v_proj"))
    (dpo / "persona.json").write_text(json.dumps({"stage": "dpo"}))
    (tmp_path / "c.yaml").write_text(CONSTITUTION)
    settings = {"reflection_prompts": ["Who are you?", "What do you value?"], "samples_per_prompt": 2,
                "interaction": {"conversations": 2, "turns": 3, "opener": "Hello there."},
                "generation": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6}, "batch_size": 8, "seed": 0,
                "system_prompt_template": "You are {name}: {traits}"}
    data = tmp_path / "introspection.jsonl"
    introspect(str(tmp_path / "c.yaml"), str(model), str(dpo), settings, str(tmp_path / "j.jsonl"), str(data))
    rows = read_jsonl(data)
    assert sorted(r["kind"] for r in rows).count("reflection") <= 4
    assert any(r["kind"] == "interaction" for r in rows)
    for r in rows:
        assert r["messages"][-1]["role"] == "assistant"
        assert all(m["role"] != "system" for m in r["messages"])
    interaction = [r for r in rows if r["kind"] == "interaction"]
    assert all(len(r["messages"]) == 4 for r in interaction)  # opener, A, B, A

    sft = {"lora_r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "learning_rate": 1e-2, "epochs": 2,
           "effective_batch_size": 2, "per_device_batch_size": 2, "max_length": 64, "resume_every_steps": 50,
           "seed": 0}
    out = tmp_path / "final"
    train_sft("p", "tiny", str(model), str(dpo), str(data), sft, str(tmp_path / "work"), str(out))
    manifest = json.loads((out / "persona.json").read_text())
    assert manifest["composition"] == "cat(dpo, sft)" and manifest["dpo"] == {"stage": "dpo"}

    base, chat_format = load_model(model)
    tok = chat_format.tokenizer
    ref = PeftModel.from_pretrained(base, str(dpo)).merge_and_unload()  # the model SFT trained on
    ref = PeftModel.from_pretrained(ref, str(tmp_path / "work" / "sft_adapter"))
    expected = logits(ref, tok)
    base2, _ = load_model(model)
    dpo_only = logits(PeftModel.from_pretrained(base2, str(dpo)), tok)
    base3, _ = load_model(model)
    final = compose.compose_for_sampling(base3, "p", out, "stacked")
    got = logits(final, tok)
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, dpo_only, atol=1e-4)  # the SFT part is really in the final adapter
