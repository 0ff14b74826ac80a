"""Chat prompts: the one place where a conversation becomes text and tokens, for every stage.

EM training and introspection SFT (`encode`), DPO pairs (`preference_ids`), EM sampling, persona-arm generation
(`prompt_ids`, `stop_ids`, `cut_at_stop`) and the local judge all go through `ChatFormat`, so a prompt is the same
wherever it is made:

* The model's own chat template renders it, defaults included: a default system prompt the template adds when the
  conversation has none (Qwen2.5's "You are Qwen, created by Alibaba Cloud. ...", SmolLM2's), Llama-3.x's
  "Cutting Knowledge Date ... Today Date ..." header. Training and evaluation see them alike.
* Per-model settings, `models.<name>.chat` in the config (`ChatSettings`), reach the template as variables:
  `enable_thinking` (default false: Qwen3's template then renders an empty `<think>\\n\\n</think>\\n\\n` before the
  answer, in the generation prompt and in training alike) and `template_date` as `date_string` (Llama-3.2's template
  renders the day it runs otherwise). `prepare_model` writes them into the model manifest (model.json), the tracked
  input of every job that renders a prompt for the model; `read_settings` is the one reader.
* Stop ids = the model's generation_config `eos_token_id` (one id or a list) + the tokenizer's eos + the template's
  end-of-turn token (the special token it puts right after an assistant turn's content) + `stop_tokens` (extra
  tokens, e.g. GLM's `<|user|>` and `<|observation|>`: its template has no end-of-turn token).

Trainable tokens of a conversation: each assistant turn's content as the template renders it, plus the one token
that follows it, which must be a stop id (its end-of-turn token: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`); no
header, no think-block scaffolding, nothing of the next turn. They are found without assuming that the rendering of
messages[:i] is a prefix of the full rendering (Qwen3 renders the last assistant turn with an empty think block and
earlier ones without): the conversation is rendered once with every assistant content replaced by a unique marker,
which gives the template's text around each turn, and once as it is. The real rendering must be that text with each
content in its place, the content changed at most by whitespace the template trims (Llama, Gemma); otherwise
encoding fails naming the model, the message and the conversation. Scaffolding and contents are tokenized piece by
piece, so the prompt's tokens end exactly where the answer's begin (no token merges across the boundary, as ChatML's
"\\n" with an answer starting with "\\n" would) and the text before the last assistant turn is the generation prompt.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from persona_em.errors import UserError
from persona_em.io import read_json, stable_hash

log = logging.getLogger(__name__)

# Llama-3.1-8B-Instruct's template uses this date when no date_string is given (Llama-3.2's uses today's date).
DEFAULT_TEMPLATE_DATE = "26 Jul 2024"
_KEYS = ("enable_thinking", "template_date", "stop_tokens")
_MARK = "\ue000persona-em-assistant-{}\ue001"  # Unicode private-use characters: not in real text


@dataclass(frozen=True)
class ChatSettings:
    """`models.<name>.chat`: how prompts for this model are rendered and where its generations stop."""

    enable_thinking: bool = False
    template_date: str = DEFAULT_TEMPLATE_DATE
    stop_tokens: tuple[str, ...] = ()
    model: str = field(default="", compare=False)  # the model's name under models:, for messages only

    @classmethod
    def from_dict(cls, d: dict | None, model: str = "") -> "ChatSettings":
        d = dict(d or {})
        where = f"config models.{model}.chat" if model else "chat settings"
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise UserError(f"{where}: unknown keys {unknown} (known: {list(_KEYS)})")
        thinking = d.get("enable_thinking", False)
        date = d.get("template_date", DEFAULT_TEMPLATE_DATE)
        stops = d.get("stop_tokens", [])
        if not isinstance(thinking, bool) or not isinstance(date, str) or not isinstance(stops, (list, tuple)) \
                or not all(isinstance(t, str) and t for t in stops):
            raise UserError(f"{where}: enable_thinking must be true/false, template_date a string, stop_tokens a "
                            f"list of non-empty strings (got {d})")
        return cls(thinking, date, tuple(stops), model)

    def to_dict(self) -> dict:
        return {"enable_thinking": self.enable_thinking, "template_date": self.template_date,
                "stop_tokens": list(self.stop_tokens)}

    @property
    def where(self) -> str:
        return f"models.{self.model}.chat" if self.model else "chat settings"


def read_settings(manifest_path: str | Path) -> ChatSettings:
    """The chat settings a model manifest (model.json, written by prepare_model) records."""
    manifest = read_json(manifest_path)
    if "chat" not in manifest:
        raise UserError(f"{manifest_path}: no 'chat' settings (written by an older version): rerun prepare_model")
    return ChatSettings.from_dict(manifest["chat"], manifest.get("model", ""))


def generation_eos_ids(model_dir: str | Path) -> list[int]:
    """The stop ids of a model directory's generation_config.json (`eos_token_id`: one id or a list), if any."""
    path = Path(model_dir) / "generation_config.json"
    eos = read_json(path).get("eos_token_id") if path.exists() else None
    if eos is None:
        return []
    return [int(i) for i in (eos if isinstance(eos, list) else [eos])]


def describe(messages: list[dict]) -> str:
    """A conversation in one short line, for error messages."""
    roles = ",".join(str(m.get("role")) for m in messages)
    first = next((str(m.get("content")) for m in messages if m.get("role") == "user"), "")
    return f"[{roles}] starting {first[:50]!r}"


class ChatFormat:
    """A tokenizer's chat template with a model's chat settings: rendering, tokens, trainable spans, stop ids."""

    def __init__(self, tokenizer, settings: ChatSettings | None = None, generation_eos: list[int] | tuple = (),
                 name: str = ""):
        self.tokenizer = tokenizer
        self.settings = settings or ChatSettings()
        self.name = name or self.settings.model or str(getattr(tokenizer, "name_or_path", "")) or "the model"
        if not tokenizer.chat_template:
            raise UserError(f"{self.name}: the tokenizer has no chat template")
        self.end_of_turn = self._end_of_turn()
        extra = [self._one_token(t) for t in self.settings.stop_tokens]
        ids = [*generation_eos, tokenizer.eos_token_id, self.end_of_turn, *extra]
        self.stop_ids: tuple[int, ...] = tuple(sorted({int(i) for i in ids if i is not None}))
        if not self.stop_ids:
            raise UserError(f"{self.name}: no stop token (no eos, no end-of-turn token in the template): set "
                            f"{self.settings.where}.stop_tokens")
        self._stop = frozenset(self.stop_ids)
        self._warned_prompt = False

    @classmethod
    def load(cls, model_dir: str | Path, settings: ChatSettings | None = None, tokenizer=None) -> "ChatFormat":
        """The chat format of a model directory (its tokenizer and generation_config.json; no weights loaded)."""
        from persona_em.models import load_tokenizer  # models.py owns loading (it imports this module)

        settings = settings or ChatSettings()
        return cls(tokenizer if tokenizer is not None else load_tokenizer(model_dir), settings,
                   generation_eos_ids(model_dir), name=settings.model or str(model_dir))

    # --- text ------------------------------------------------------------------------------------------------
    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=generation_prompt,
                enable_thinking=self.settings.enable_thinking, date_string=self.settings.template_date)
        except TemplateError as e:
            raise UserError(f"the chat template of {self.name} cannot render the conversation {describe(messages)}: "
                            f"{e}") from None

    def tokenize(self, text: str) -> list[int]:
        """Token ids of rendered text (special tokens in it are parsed; none are added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_text(self, messages: list[dict], prefill: str = "") -> str:
        return self.render(messages, generation_prompt=True) + prefill

    def prompt_ids(self, messages: list[dict], prefill: str = "") -> list[int]:
        """The tokens a generation starts from: the conversation, the assistant header (with thinking off, Qwen3's
        empty think block) and an optional prefill of the answer."""
        return self.tokenize(self.prompt_text(messages, prefill))

    # --- stop ids ----------------------------------------------------------------------------------------------
    def _one_token(self, text: str) -> int:
        ids = self.tokenize(text)
        if len(ids) != 1:
            raise UserError(f"config {self.settings.where}.stop_tokens: {text!r} is {len(ids)} tokens of the "
                            f"tokenizer of {self.name}, not one")
        return ids[0]

    def _end_of_turn(self) -> int | None:
        """The special token the template puts right after an assistant turn's content, if any."""
        mark = _MARK.format(0)
        text = self.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": mark}])
        if mark not in text:
            raise UserError(f"the chat template of {self.name} does not render an assistant turn's content")
        after = self.tokenize(text.split(mark, 1)[1])
        return after[0] if after and after[0] in self.tokenizer.added_tokens_decoder else None

    def cut_at_stop(self, ids: list[int]) -> tuple[list[int], bool]:
        """Generated ids up to the first stop id (excluded), and whether one was generated. Everything after a stop
        (the padding `generate` appends to finished rows, whatever its id) is dropped; a stop that is also the pad
        token (Qwen's <|endoftext|>) still counts as a stop."""
        for n, t in enumerate(ids):
            if t in self._stop:
                return ids[:n], True
        return list(ids), False

    def token_names(self, ids) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(ids))

    def identity(self) -> dict:
        """Everything here that changes a prompt or where a generation stops (for fingerprints)."""
        return {"chat": self.settings.to_dict(), "stop_ids": list(self.stop_ids), "end_of_turn": self.end_of_turn,
                "chat_template_sha": stable_hash(self.tokenizer.chat_template, 16)}

    # --- trainable spans ---------------------------------------------------------------------------------------
    def _defeated(self, messages, index: int, why: str) -> UserError:
        return UserError(f"the chat template of {self.name} defeats locating assistant message {index} of the "
                         f"conversation {describe(messages)}: {why}")

    def pieces(self, messages: list[dict]) -> list[tuple[str, int | None]]:
        """The full rendering as consecutive pieces: (text, None) for the template's text, (text, i) for the content
        of assistant message i as rendered. Their concatenation is the rendering."""
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not turns:
            raise UserError(f"conversation {describe(messages)}: no assistant turn")
        for i in turns:
            if not isinstance(messages[i].get("content"), str):
                raise UserError(f"conversation {describe(messages)}: assistant message {i} has no text content")
        marks = {i: _MARK.format(k) for k, i in enumerate(turns)}
        skeleton = self.render([{**m, "content": marks[i]} if i in marks else m for i, m in enumerate(messages)])
        parts, rest = [], skeleton
        for i in turns:
            if rest.count(marks[i]) != 1:
                raise self._defeated(messages, i, f"its content is rendered {skeleton.count(marks[i])} times, "
                                                  "not once, or out of order")
            before, rest = rest.split(marks[i])
            parts.append(before)
        parts.append(rest)
        real = self.render(messages)
        if not real.startswith(parts[0]):
            raise self._defeated(messages, turns[0], "the text before it depends on the assistant contents")
        pieces: list[tuple[str, int | None]] = [(parts[0], None)]
        pos = len(parts[0])
        for k, i in enumerate(turns):
            after, want = parts[k + 1], messages[i]["content"].strip()
            end = _content_end(real, pos, after, want, last=k == len(turns) - 1)
            if end is None:
                raise self._defeated(messages, i, "the rendering is not the template's text with the content in "
                                                  "place (the template changes the content beyond trimming "
                                                  "whitespace, or its text depends on the content)")
            pieces += [(real[pos:end], i), (after, None)]
            pos = end + len(after)
        return pieces

    def _tokens(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """All token ids of a conversation and which of them are trainable (see the module docstring)."""
        pieces = self.pieces(messages)
        ids: list[int] = []
        trainable: list[bool] = []
        due = None  # the assistant message whose end-of-turn token comes next
        for text, turn in pieces:
            t = self.tokenize(text)
            flags = [turn is not None] * len(t)
            if due is not None and turn is None:
                if not t:
                    raise self._defeated(messages, due, "the template renders nothing after it (no end-of-turn "
                                                        "token)")
                if t[0] not in self._stop:
                    raise self._defeated(
                        messages, due, f"its content is followed by {text[:30]!r}, which does not start with an "
                        f"end-of-turn token (stop ids {self.token_names(self.stop_ids)}); if the token that follows "
                        f"ends a turn, add it to {self.settings.where}.stop_tokens")
                flags[0] = True
                due = None
            if turn is not None:
                due = turn
            ids += t
            trainable += flags
        if due is not None:
            raise self._defeated(messages, due, "the template renders nothing after it (no end-of-turn token)")
        if messages[-1].get("role") == "assistant":
            self._check_generation_prompt(messages, "".join(text for text, _ in pieces[:-2]))
        return ids, trainable

    def _check_generation_prompt(self, messages: list[dict], trained_prefix: str) -> None:
        """Warn (once) when the text before the last assistant turn in training is not the generation prompt: the
        model would be trained on one prompt and evaluated on another."""
        if self._warned_prompt:
            return
        prompt = self.render(messages[:-1], generation_prompt=True)
        if prompt != trained_prefix:
            self._warned_prompt = True
            n = next((k for k, (a, b) in enumerate(zip(prompt, trained_prefix)) if a != b),
                     min(len(prompt), len(trained_prefix)))
            log.warning("the chat template of %s (%s) renders the generation prompt differently from the text "
                        "before the last assistant turn in training, from %r vs %r: the model is trained on another "
                        "prompt than it is evaluated with", self.name, self.settings.to_dict(),
                        prompt[n:n + 40], trained_prefix[n:n + 40])

    def encode(self, messages: list[dict], assistant_only: bool = True, max_length: int | None = None) -> dict:
        """input_ids and labels of a conversation for SFT: labels are -100 outside the trainable tokens when
        `assistant_only`, else every token. Both cut at `max_length`."""
        ids, trainable = self._tokens(messages)
        labels = [t if (keep or not assistant_only) else -100 for t, keep in zip(ids, trainable)]
        return {"input_ids": ids[:max_length], "labels": labels[:max_length]}

    def preference_ids(self, prompt: list[dict], chosen: str, rejected: str) -> dict:
        """A DPO pair as tokens: prompt_ids (everything before the answer: the generation prompt), chosen_ids and
        rejected_ids (each answer's content + its end-of-turn token, nothing after)."""
        out, prompts = {}, []
        for key, answer in (("chosen", chosen), ("rejected", rejected)):
            ids, trainable = self._tokens([*prompt, {"role": "assistant", "content": answer}])
            start = trainable.index(True)
            end = len(trainable) - trainable[::-1].index(True)
            prompts.append(ids[:start])
            out[f"{key}_ids"] = ids[start:end]
        if prompts[0] != prompts[1]:
            raise UserError(f"the chat template of {self.name} renders the prompt {describe(prompt)} differently "
                            "depending on the answer")
        return {"prompt_ids": prompts[0], **out}


def _content_end(real: str, pos: int, after: str, want: str, last: bool) -> int | None:
    """Where the content that starts at `pos` ends: the template's text `after` follows it, and it is the message's
    content up to surrounding whitespace."""
    if last:
        end = len(real) - len(after)
        ok = end >= pos and real.endswith(after) and real[pos:end].strip() == want
        return end if ok else None
    j = real.find(after, pos)
    while j >= 0:
        if real[pos:j].strip() == want:
            return j
        j = real.find(after, j + 1)
    return None
