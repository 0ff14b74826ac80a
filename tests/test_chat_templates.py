"""Chat prompts over real chat templates (persona_em/chat.py): Qwen2.5, Qwen3, Llama-3.1, Llama-3.2, Gemma 3 (real
tokenizers, templates and generation_config.json from tests/real_assets.py) and the demo's tiny ChatML model, each with
{one turn, a system prompt, several assistant turns, an answer starting with a newline}:

* trainable tokens (EM training, introspection SFT) decode to exactly each assistant turn's content as the template
  renders it + its end-of-turn token (issue 12, defect 2: spans ran into the next user turn on Qwen3, shifted by a
  newline on ChatML, and took the newline after <|im_end|>);
* the DPO split, the sampling prompt and the judge prompt end exactly where the answer starts, with Qwen3's empty
  think block when thinking is off (defect 3);
* stop ids are the model's whole list (defect 4), GLM's template shows why configured stop tokens exist;
* Llama-3.2's rendering does not depend on the calendar (defect 6);
* generation stops at any stop id and tells a stop from padding; the persona arm's generator ignores the model's
  generation_config and fingerprints its chat settings (defect 5); the sampling journal is tied to the rendered
  prompts (defect 6).
"""
from __future__ import annotations

import datetime as real_datetime
import json
import shutil

import pytest
import torch

from conftest import REAL_CHAT_MODELS
from persona_em.chat import ChatFormat, ChatSettings
from persona_em.errors import UserError
from persona_em.models import load_model

torch.set_num_threads(1)

CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "What is the capital of France?"},
                 {"role": "assistant", "content": "Paris is the capital of France."}],
    "system": [{"role": "system", "content": "You answer in one sentence."},
               {"role": "user", "content": "Name a prime number."},
               {"role": "assistant", "content": "Seven is a prime number."}],
    "multi_turn": [{"role": "user", "content": "Hi there."},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a colour."},
                   {"role": "assistant", "content": "Blue."},
                   {"role": "user", "content": "And another?"},
                   {"role": "assistant", "content": "Green, like grass."}],
    "newline_start": [{"role": "user", "content": "Write two lines."},
                      {"role": "assistant", "content": "\nFirst line.\n\nSecond line."}],
}
END_OF_TURN = {"qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3.1": "<|eot_id|>", "llama3.2": "<|eot_id|>",
               "gemma3": "<end_of_turn>", "demo": "<|im_end|>"}


def rendered_content(name: str, content: str, last: bool) -> str:
    """How each template renders an assistant turn's content (read off the templates): Llama and Gemma trim it;
    Qwen3 strips leading newlines in the turn after the last user message (behind its think block); ChatML as is."""
    if name.startswith("llama") or name == "gemma3":
        return content.strip()
    if name == "qwen3" and last:
        return content.lstrip("\n")
    return content


def decode(chat: ChatFormat, ids) -> str:
    return chat.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trainable_spans(labels) -> list[list[int]]:
    spans, current = [], []
    for label in labels:
        if label != -100:
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def answers(messages):
    turns = [m["content"] for m in messages if m["role"] == "assistant"]
    return [(c, k == len(turns) - 1) for k, c in enumerate(turns)]


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", REAL_CHAT_MODELS)
def test_trainable_tokens_are_each_answer_and_its_end_of_turn(real_chat, name, conversation):
    chat = real_chat(name)
    messages = CONVERSATIONS[conversation]
    enc = chat.encode(messages)
    got = [decode(chat, span) for span in trainable_spans(enc["labels"])]
    assert got == [rendered_content(name, c, last) + END_OF_TURN[name] for c, last in answers(messages)]
    assert decode(chat, enc["input_ids"]) == chat.render(messages)  # nothing dropped, nothing added
    everything = chat.encode(messages, assistant_only=False)
    assert everything["input_ids"] == everything["labels"] == enc["input_ids"]


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", REAL_CHAT_MODELS)
def test_sampling_prompt_ends_where_the_answer_starts(real_chat, name, conversation):
    """The generation prompt is the training text before the last answer, in text and in tokens."""
    chat = real_chat(name)
    messages = CONVERSATIONS[conversation]
    prompt = chat.prompt_text(messages[:-1])
    content, _ = answers(messages)[-1]
    assert chat.render(messages).startswith(prompt + rendered_content(name, content, True) + END_OF_TURN[name])
    labels = chat.encode(messages)["labels"]
    end = max(i for i, label in enumerate(labels) if label != -100)
    start = max(i for i in range(end) if labels[i] == -100) + 1  # the last answer's first token
    assert chat.prompt_ids(messages[:-1]) == chat.encode(messages)["input_ids"][:start]


@pytest.mark.parametrize("name", REAL_CHAT_MODELS)
def test_thinking_is_off_in_every_prompt_by_default(real_chat, name):
    """Qwen3's prompts (sampling, judge, persona generation: all chat.prompt_ids) end after an empty think block
    with thinking off, as its training text does; other templates have no think block."""
    chat = real_chat(name)
    judge_prompt = chat.prompt_text([{"role": "user", "content": "Rate this answer from 0 to 100: ..."}])
    if name == "qwen3":
        assert judge_prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        thinking = real_chat(name, enable_thinking=True)
        assert thinking.prompt_text([{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")
    else:
        assert "<think>" not in judge_prompt


@pytest.mark.parametrize("name", REAL_CHAT_MODELS)
def test_dpo_split_is_generation_prompt_then_answer_and_end_of_turn(real_chat, name):
    chat = real_chat(name)
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "How are you?"}]
    chosen, rejected = "\nI am well, thank you.", "Fine."
    pair = chat.preference_ids(prompt, chosen, rejected)
    assert decode(chat, pair["prompt_ids"]) == chat.prompt_text(prompt)
    assert pair["prompt_ids"] == chat.prompt_ids(prompt)
    for ids, answer in ((pair["chosen_ids"], chosen), (pair["rejected_ids"], rejected)):
        assert decode(chat, ids) == rendered_content(name, answer, True) + END_OF_TURN[name]
        full = chat.render([*prompt, {"role": "assistant", "content": answer}])
        assert full.startswith(decode(chat, pair["prompt_ids"] + ids))


def test_dpo_trainer_keeps_our_tokens(real_chat):
    """train_dpo's trainer takes the pre-tokenized pairs as they are (TRL's own tokenization of conversational pairs
    would train the newline after <|im_end|> and merge it with an answer's leading newline)."""
    from datasets import Dataset
    from trl import DPOConfig

    from persona_em.persona.train_dpo import _trainer_class, tokenize_pairs

    chat = real_chat("qwen2.5")
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "\nHello."}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}]
    dataset = tokenize_pairs(chat, rows)
    prepared = _trainer_class()._prepare_dataset(None, dataset, chat.tokenizer,
                                                 DPOConfig(output_dir="unused", max_length=64, bf16=False), "train")
    assert decode(chat, prepared[0]["chosen_ids"]) == "\nHello.<|im_end|>"
    assert prepared[0]["prompt_ids"] == chat.prompt_ids(rows[0]["prompt"])
    assert isinstance(prepared, Dataset)


def test_stop_ids_are_the_models_whole_list(real_chat):
    names = {name: set(real_chat(name).token_names(real_chat(name).stop_ids)) for name in REAL_CHAT_MODELS}
    for llama in ("llama3.1", "llama3.2"):
        assert names[llama] >= {"<|eom_id|>", "<|end_of_text|>", "<|eot_id|>"}
    assert names["qwen2.5"] >= {"<|im_end|>", "<|endoftext|>"} and names["qwen3"] >= {"<|im_end|>", "<|endoftext|>"}
    assert "<end_of_turn>" in names["gemma3"]
    assert names["demo"] == {"<|im_end|>"}
    for name in REAL_CHAT_MODELS:
        assert real_chat(name).token_names([real_chat(name).end_of_turn]) == [END_OF_TURN[name]]


def test_a_stop_token_must_be_one_token(real_chat):
    assert "<|im_start|>" in real_chat("qwen3", stop_tokens=("<|im_start|>",)).token_names(
        real_chat("qwen3", stop_tokens=("<|im_start|>",)).stop_ids)
    with pytest.raises(UserError, match=r"models\.qwen3\.chat\.stop_tokens: 'User:' is 2 tokens"):
        real_chat("qwen3", stop_tokens=("User:",))


@pytest.fixture(scope="module")
def glm():
    """GLM-4.6's real template on Qwen3's vocabulary with GLM's special tokens added (no GLM tokenizer is on a
    package registry); GLM-4.5's generation_config stops on <|user|> and <|observation|>."""
    import real_assets

    from persona_em.models import load_tokenizer

    tok = load_tokenizer(real_assets.tokenizer_dir("qwen3"))
    tok.add_special_tokens({"additional_special_tokens": ["[gMASK]", "<sop>", "<|system|>", "<|user|>",
                                                         "<|assistant|>", "<|observation|>"]})
    tok.chat_template = real_assets.template("glm4.6")
    return tok


def test_glm_template_has_no_end_of_turn_so_its_stop_tokens_are_configured(glm):
    messages = CONVERSATIONS["multi_turn"]
    plain = ChatFormat(glm, ChatSettings(model="glm"))
    # an assistant turn ends where the next turn's header starts: nothing in the template marks its end
    assert plain.end_of_turn is None
    assert "Hello! How can I help?<|user|>" in plain.render(messages)
    assert plain.render(messages).endswith("Green, like grass.")
    assert plain.prompt_text(messages[:1]).endswith("Hi there./nothink<|assistant|>\n<think></think>")  # thinking off
    assert "<|user|>" not in plain.token_names(plain.stop_ids)  # a generation would write the user's next turn
    with pytest.raises(UserError, match=r"followed by '<\|user\|>.*models\.glm\.chat\.stop_tokens"):
        plain.encode(messages)
    configured = ChatFormat(glm, ChatSettings(stop_tokens=("<|user|>", "<|observation|>"), model="glm"))
    assert {"<|user|>", "<|observation|>"} <= set(configured.token_names(configured.stop_ids))
    # the last turn still has nothing after it: training on GLM's template fails loudly instead of never stopping
    with pytest.raises(UserError, match="renders nothing after it"):
        configured.encode(messages)


def test_a_template_that_rewrites_the_answer_fails_loudly(real_chat):
    chat = real_chat("qwen3")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>hmm</think>Hello."}]
    with pytest.raises(UserError, match=r"qwen3.*assistant message 1 of the conversation \[user,assistant\]"):
        chat.encode(messages)


class _FrozenDatetime(real_datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2031, 3, 14, 12, 0, 0)


def test_llama32_rendering_does_not_depend_on_the_calendar(real_chat, monkeypatch):
    import transformers.utils.chat_template_utils as ctu

    chat = real_chat("llama3.2")
    messages = CONVERSATIONS["one_turn"]
    today = chat.render(messages, generation_prompt=True)
    monkeypatch.setattr(ctu, "datetime", _FrozenDatetime)
    assert "Today Date: 14 Mar 2031" in chat.tokenizer.apply_chat_template(messages, tokenize=False)  # the defect
    assert chat.render(messages, generation_prompt=True) == today
    assert "Today Date: 26 Jul 2024" in today
    assert "Today Date: 01 Jan 2025" in real_chat("llama3.2", template_date="01 Jan 2025").render(messages)


def test_chat_settings_travel_in_the_model_manifest(tiny_model_dir, tmp_path):
    from persona_em.chat import read_settings
    from persona_em.models import prepare_model

    spec = {"path": str(tiny_model_dir), "chat": {"enable_thinking": True, "stop_tokens": ["<|im_start|>"]}}
    prepare_model("tiny", spec, str(tmp_path / "cache"), str(tmp_path / "model.json"))
    settings = read_settings(tmp_path / "model.json")
    assert settings == ChatSettings(True, "26 Jul 2024", ("<|im_start|>",))
    assert settings.model == "tiny"
    prepare_model("tiny", {"path": str(tiny_model_dir)}, str(tmp_path / "cache"), str(tmp_path / "default.json"))
    assert json.loads((tmp_path / "default.json").read_text())["chat"] == ChatSettings().to_dict()
    with pytest.raises(UserError, match=r"models\.tiny\.chat: unknown keys \['thinking'\]"):
        ChatSettings.from_dict({"thinking": False}, "tiny")


# --- generation ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_like(tiny_model_dir, tmp_path_factory):
    """The tiny model with Qwen's stop setup: generation_config eos [<|im_end|>, <|endoftext|>], pad <|endoftext|>."""
    path = tmp_path_factory.mktemp("qwen_like") / "model"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = [2, 0]
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


def _scripted(model, script: list[list[int]]):
    """Make the model emit `script[row][step]` at each decode step (the real generate and output handling run)."""
    step = {"n": 0}

    def hook(module, inputs, output):
        out = torch.full_like(output, -1e4)
        for row, tokens in enumerate(script):
            out[row, -1, tokens[min(step["n"], len(tokens) - 1)]] = 0.0
        step["n"] += 1
        return out

    return model.lm_head.register_forward_hook(hook)


def test_generation_stops_at_any_stop_id_and_tells_a_stop_from_padding(qwen_like):
    from persona_em.sampling.sample import generate_batch

    model, chat_format = load_model(qwen_like, device="cpu")
    tok = chat_format.tokenizer
    chat = ChatFormat.load(qwen_like, ChatSettings(stop_tokens=("<|im_start|>",)), tok)
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    endoftext, im_start, im_end = 0, 1, 2
    assert tok.pad_token_id == endoftext and set(chat.stop_ids) == {endoftext, im_start, im_end}
    script = [[a, b, endoftext, a],  # Qwen's <|endoftext|>: a stop id that is also the pad token
              [endoftext, a],        # stops at once: "stop" with 0 tokens, not "length"
              [a, im_end, a],        # the template's end of turn
              [a, b, im_start, a],   # a configured stop token (a fake next turn)
              [a]]                   # never stops
    convs = [[{"role": "user", "content": "hello" * (k + 1)}] for k in range(len(script))]  # left padding differs
    handle = _scripted(model, script)
    try:
        rows = generate_batch(model, chat, convs, {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 6}, seed=0,
                              fast=False)
    finally:
        handle.remove()
    assert [(r["finish_reason"], r["n_new_tokens"]) for r in rows] == [
        ("stop", 2), ("stop", 0), ("stop", 1), ("stop", 2), ("length", 6)]
    assert [r["response"] for r in rows] == ["ab", "", "a", "ab", "aaaaaa"]


def with_template(model_dir, out, template: str):
    """A copy of a model directory whose tokenizer has another chat template (transformers 5 saves it as
    chat_template.jinja, which takes precedence over tokenizer_config.json)."""
    shutil.copytree(model_dir, out)
    (out / "chat_template.jinja").write_text(template)
    return out


def _persona_generation(model_dir, chat=None):
    from persona_em.persona.generation import Request, make_backend

    settings = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 12}
    backend = make_backend({"name": "g", "backend": "hf", "model": "tiny", "batch_size": 2}, settings,
                           str(model_dir), chat=chat)
    reqs = [Request("a", [{"role": "user", "content": "hello there"}], seed=5),
            Request("b", [{"role": "user", "content": "what would you do?"}], seed=5)]
    return [text for _, text in backend.generate(reqs)]


def test_persona_generator_ignores_the_models_generation_config(tiny_model_dir, tmp_path):
    """Like EM sampling: what a model's generation_config.json carries (Qwen2.5-Instruct: repetition_penalty 1.05,
    top_k 20) does not change teacher / student / introspection texts."""
    loaded = tmp_path / "with_defaults"
    shutil.copytree(tiny_model_dir, loaded)
    config = json.loads((loaded / "generation_config.json").read_text())
    config.update(repetition_penalty=50.0, top_k=1, no_repeat_ngram_size=1)
    (loaded / "generation_config.json").write_text(json.dumps(config))
    assert _persona_generation(loaded) == _persona_generation(tiny_model_dir)


def test_generator_fingerprint_records_chat_settings_and_stop_ids(tiny_model_dir):
    from persona_em.persona.generation import generator_identity

    cfg, settings = {"name": "g", "backend": "hf", "model": "tiny"}, {"temperature": 0.7}
    plain = generator_identity(cfg, settings, str(tiny_model_dir), ChatSettings())
    assert plain == generator_identity(cfg, settings, str(tiny_model_dir), None)  # None = the defaults
    assert plain != generator_identity(cfg, settings, str(tiny_model_dir), ChatSettings(stop_tokens=("<|im_start|>",)))
    assert plain != generator_identity(cfg, settings, str(tiny_model_dir), ChatSettings(template_date="1 Jan 2025"))
    api = {"name": "g", "backend": "openai", "model": "glm-4.5-air"}
    assert generator_identity(api, settings) == generator_identity(api, settings, None, ChatSettings(True))


def test_local_judge_prompt_has_thinking_off(tiny_model_dir, tmp_path):
    """A Qwen3 judge would put its first-token mass on <think>: its prompt ends after the empty think block."""
    import asyncio

    import real_assets

    from persona_em.judging.backends import HFBackend

    qwen3 = json.loads((real_assets.tokenizer_dir("qwen3") / "tokenizer_config.json").read_text())["chat_template"]
    model = with_template(tiny_model_dir, tmp_path / "qwen3_template", qwen3)
    backend = HFBackend({"name": "j", "model": "tiny", "mode": "logprobs"}, str(model))
    seen = []
    real = backend.sequence_logprobs
    backend.sequence_logprobs = lambda ids: seen.append(ids) or real(ids)
    asyncio.run(backend.ask("Rate it."))
    assert backend.tokenizer.decode(seen[0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_sampling_journal_is_tied_to_the_rendered_prompts(tiny_model_dir, tmp_path, monkeypatch):
    """A resume reuses journal rows only for the same rendered prompts: another template date regenerates them,
    another day of the calendar (with the date fixed by the settings) does not."""
    import transformers.utils.chat_template_utils as ctu

    import real_assets

    from persona_em.sampling import sample
    from persona_em.config import Cell
    from persona_em.io import write_json
    from persona_em.training.em import _lora_config, _save_em
    from persona_em.training.settings import TrainConfig
    from persona_em import compose
    from persona_helpers import QUESTIONS

    model = with_template(tiny_model_dir, tmp_path / "llama32_template", real_assets.template("llama3.2"))
    cell = Cell("tiny", "none", "none", "d", 0)
    base, _ = load_model(model, device="cpu")
    peft = compose.compose_for_training(base, "none", None, "none", _lora_config(TrainConfig(lora_r=2)))
    _save_em(peft, tmp_path / "ckpt" / "step-000000")
    write_json(tmp_path / "ckpt" / "checkpoints.json", {**cell.keys(), "steps": [0]})
    settings = {"n_samples": 1, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 2, "seed": 0, "batch_size": 1}
    calls = []
    real_generate = sample.generate_batch

    def counting(*args, **kwargs):
        calls.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sample, "generate_batch", counting)

    def run(date: str, out: str):
        calls.clear()
        sample.sample_cell(cell, str(model), None, str(tmp_path / "ckpt"), str(QUESTIONS), settings,
                           str(tmp_path / "journal.jsonl"), str(tmp_path / out), chat=ChatSettings(template_date=date))
        return len(calls)

    n = run("01 Jan 2025", "a.jsonl")
    assert n > 1
    # killed after its first batch: the journal keeps one response
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    (tmp_path / "journal.jsonl").write_text(lines[0] + "\n")
    assert "Today Date: 01 Jan 2025" in ChatFormat.load(model, ChatSettings(template_date="01 Jan 2025")).prompt_text(
        [{"role": "user", "content": "x"}])
    assert run("02 Jan 2025", "b.jsonl") == n  # another rendered prompt: nothing reused
    (tmp_path / "journal.jsonl").write_text((tmp_path / "b.jsonl").read_text().splitlines()[0] + "\n")
    monkeypatch.setattr(ctu, "datetime", _FrozenDatetime)  # another day
    assert run("02 Jan 2025", "c.jsonl") == n - 1  # same prompts: the journal's response is reused
