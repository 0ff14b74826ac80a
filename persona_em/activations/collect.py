"""Activations of every sampled response, at every checkpoint of a cell, for two readers (rule collect_activations).

For each response of samples/{cell}.jsonl, ONE teacher-forced forward pass over prompt + response:
* the model is built by the code that sampled it (persona_em.compose: compose_for_sampling, use_em_adapter), so the
  `own` reader is the model that wrote the response (the adapters the layers run are checked and recorded);
* the text is rendered by persona_em.chat exactly as training renders it: the question's messages (the same
  `Question.messages` that sampling sent) + the response as the assistant turn, through `ChatFormat.encode`. The
  response span is the assistant turn's trainable tokens (its content as the template renders it + its end-of-turn
  token: the span the EM loss covers); the prompt ends right before it, so its last token is the last token of the
  generation prompt (the last position the model saw before it began to answer). The response is re-tokenized from
  its text, as training tokenizes its data;
* stored per configured layer (persona_em.activations.settings: hidden-state indices, 0 = embeddings): the mean
  over the response span (`response_mean`) and the state at the last prompt token (`last_prompt`).

Readers: `own` = the cell's model at the checkpoint; `base` = the base model with every adapter off
(PeftModel.disable_adapter; for a `merged` cell, whose persona is in the weights, the base model loaded afresh).

Output (a directory, written atomically): activations.safetensors (`response_mean`, `last_prompt`: fp16
[rows, layers, hidden]; `layers`: int64), index.tsv (one row per response x reader: the cell keys, step, question id,
paraphrase and sample index, response id, reader, `row` into the tensors, token counts, the adapters the reader
ran), meta.json. Resumable: each (reader, step) finished is a tensor file in work_dir and a journal line; a rerun
with the same inputs does only the missing ones.

Speed: responses sorted by length, batched up to `batch_tokens` padded tokens per forward pass (right padding: in a
causal model no real token attends to a pad, so padding changes nothing); the decoder is called without the LM head.
"""
from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

import torch

from persona_em import compose
from persona_em.activations.settings import check_layers
from persona_em.chat import ChatFormat, ChatSettings
from persona_em.config import Cell
from persona_em.data.questions import load_questions
from persona_em.errors import UserError
from persona_em.io import Journal, atomic_dir, read_jsonl, sha256_file, stable_hash, write_json, write_table
from persona_em.models import load_model
from persona_em.training.em import read_checkpoints

log = logging.getLogger(__name__)

from persona_em.activations.store import BASE, INDEX, KINDS, META, OWN, READERS, TENSORS
INDEX_KEYS = ["model", "persona", "composition", "dataset", "seed", "step", "question_id", "paraphrase_index",
              "sample_index", "response_id"]


def response_tokens(chat: ChatFormat, messages: list[dict], response: str) -> tuple[list[int], int, int]:
    """(ids, start, end): the conversation's tokens as training encodes it; [start, end) is the response span (the
    assistant turn's trainable tokens), so the last prompt token is at start - 1."""
    enc = chat.encode([*messages, {"role": "assistant", "content": response}])
    span = [i for i, label in enumerate(enc["labels"]) if label != -100]
    start, end = span[0], span[-1] + 1
    if span != list(range(start, end)) or start == 0:
        raise RuntimeError(f"the response span of {messages!r} is not one block after a prompt")
    return enc["input_ids"], start, end


def token_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so that rows x longest length <= batch_tokens (a longer row goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def decoder_of(model):
    """The transformer stack without the LM head (the LoRA layers of a PeftModel are inside it)."""
    from peft import PeftModel

    causal = model.get_base_model() if isinstance(model, PeftModel) else model
    return causal.get_decoder()


@torch.inference_mode()
def forward_batch(decoder, items: list[tuple[list[int], int, int]], layers: list[int], pad_id: int, device
                  ) -> dict[str, torch.Tensor]:
    """One right-padded forward pass; per item and layer the mean over [start, end) and the state at start - 1
    (float32, on the CPU)."""
    width = max(len(ids) for ids, _, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    span = torch.zeros((len(items), width), dtype=torch.float32)
    for b, (row, start, end) in enumerate(items):
        ids[b, :len(row)] = torch.tensor(row)
        attn[b, :len(row)] = 1
        span[b, start:end] = 1.0 / (end - start)
    last = torch.tensor([start - 1 for _, start, _ in items])
    out = decoder(input_ids=ids.to(device), attention_mask=attn.to(device), output_hidden_states=True,
                  use_cache=False)
    hidden = out.hidden_states
    span, rows = span.to(device), torch.arange(len(items), device=device)
    means, lasts = [], []
    for layer in layers:
        h = hidden[layer].float()
        means.append(torch.einsum("bt,btd->bd", span, h))
        lasts.append(h[rows, last.to(device)])
    return {"response_mean": torch.stack(means, 1).cpu(), "last_prompt": torch.stack(lasts, 1).cpu()}


def measure(model, tokens: list[tuple[list[int], int, int]], layers: list[int], pad_id: int,
            batch_tokens: int) -> dict[str, torch.Tensor]:
    """Both kinds of activation of every item, in the items' order, as fp16 [items, layers, hidden]."""
    decoder = decoder_of(model)
    device = next(model.parameters()).device
    out = {k: [None] * len(tokens) for k in KINDS}
    for batch in token_batches([len(t[0]) for t in tokens], batch_tokens):
        res = forward_batch(decoder, [tokens[i] for i in batch], layers, pad_id, device)
        for k in KINDS:
            for j, i in enumerate(batch):
                out[k][i] = res[k][j]
    stacked = {k: torch.stack(v).to(torch.float16) for k, v in out.items()}
    for k, t in stacked.items():
        if not torch.isfinite(t).all():
            bad = sorted({layers[j] for j in torch.nonzero(~torch.isfinite(t))[:, 1].tolist()})
            raise RuntimeError(f"{k} at layers {bad} does not fit in fp16 (|value| > 65504)")
    return stacked


@contextlib.contextmanager
def base_reader(model, cell: Cell, model_dir: str, chat: ChatSettings | None):
    """The base model with no adapter on: the composed model with adapters disabled, or for a merged cell (the
    persona is in its weights) the base model loaded afresh."""
    from peft import PeftModel

    if cell.composition == "merged":
        base, _ = load_model(model_dir, chat)
        if compose.describe(base) != {"active_adapters": [], "merged_persona": None}:
            raise RuntimeError("the freshly loaded base model runs adapters")
        yield base
        return
    if not isinstance(model, PeftModel):
        yield model
        return
    with model.disable_adapter():
        state = compose.describe(model)
        if state["active_adapters"] or state["merged_persona"]:
            raise RuntimeError(f"base reader of {cell.path}: adapters still on: {state}")
        yield model


def collect_cell(cell: Cell, model_dir: str, persona_dir: str | None, checkpoints_dir: str, samples_path: str,
                 questions_path: str, settings: dict, work_dir: str, out_dir: str,
                 chat: ChatSettings | None = None) -> None:
    """Measure every response of the cell for both readers (module docstring). `settings`: the
    analysis.activations block (layers, batch_tokens)."""
    from safetensors.torch import load_file, save_file

    from persona_em.io import atomic_path

    questions = {q.id: q for q in load_questions(questions_path)}
    manifest, checkpoints = read_checkpoints(checkpoints_dir)
    rows = read_jsonl(samples_path)
    steps = [s for s, _ in checkpoints]
    by_step: dict[int, list[dict]] = {s: [] for s in steps}
    for r in rows:
        if r["step"] not in by_step:
            raise UserError(f"{samples_path}: response {r['response_id']} is from step {r['step']}, not a "
                            f"checkpoint of {checkpoints_dir} ({steps})")
        if r["question_id"] not in questions:
            raise UserError(f"{samples_path}: response {r['response_id']}: question {r['question_id']!r} is not in "
                            f"{questions_path}")
        by_step[r["step"]].append(r)
    chat_format = ChatFormat.load(model_dir, chat)
    n_layers = num_layers(model_dir)
    layers = check_layers(list(settings["layers"]), n_layers, cell.model)
    fingerprint = stable_hash({"samples": sha256_file(samples_path), "questions": sha256_file(questions_path),
                               "manifest": manifest, "layers": layers, "chat": chat_format.identity()})
    work = Path(work_dir)
    journal = Journal(work / "journal.jsonl", key_field="key")
    done = {k: r for k, r in journal.load().items()
            if r.get("fingerprint") == fingerprint and (work / r["file"]).exists()}
    units = [(reader, s) for reader in READERS for s in steps]
    log.info("cell %s: %d responses x %d readers at layers %s; %d of %d (reader, step) units already done",
             cell.path, len(rows), len(READERS), layers, len(done), len(units))

    def tokens_of(step):
        return [response_tokens(chat_format, questions[r["question_id"]].messages(r["paraphrase_index"]),
                                r["response"]) for r in by_step[step]]

    def save_unit(reader, step, state, tensors, tokens):
        name = f"{reader}-step{step}.safetensors"
        with atomic_path(work / name, suffix=".safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        row = {"key": f"{reader}|{step}", "file": name, "fingerprint": fingerprint, **state,
               "response_ids": [r["response_id"] for r in by_step[step]],
               "n_prompt_tokens": [start for _, start, _ in tokens],
               "n_response_tokens": [end - start for _, start, end in tokens]}
        journal.append(row)
        done[row["key"]] = row

    todo_own = [s for s in steps if f"{OWN}|{s}" not in done and by_step[s]]
    todo_base = [s for s in steps if f"{BASE}|{s}" not in done and by_step[s]]
    batch_tokens = int(settings["batch_tokens"])
    if todo_own or todo_base:
        base, _ = load_model(model_dir, chat)
        model = compose.compose_for_sampling(base, cell.persona, persona_dir, cell.composition)
        pad = chat_format.tokenizer.pad_token_id
        for step, em_dir in checkpoints:
            if step in todo_own:
                model = compose.use_em_adapter(model, em_dir, compose.EM, cell.composition, cell.persona)
                tokens = tokens_of(step)
                save_unit(OWN, step, compose.describe(model), measure(model, tokens, layers, pad, batch_tokens),
                          tokens)
                log.info("own reader, step %d: %d responses", step, len(tokens))
        if todo_base:
            if cell.composition == "merged":
                del model, base
                gc.collect()
                model = None
            with base_reader(model, cell, model_dir, chat) as reader:
                state = compose.describe(reader)
                for step in todo_base:
                    tokens = tokens_of(step)
                    save_unit(BASE, step, state, measure(reader, tokens, layers, pad, batch_tokens), tokens)
                    log.info("base reader, step %d: %d responses", step, len(tokens))
    journal.close()

    by_id = {r["response_id"]: r for r in rows}
    index, parts = [], {k: [] for k in KINDS}
    for reader, step in units:
        if not by_step[step]:
            continue
        unit = done[f"{reader}|{step}"]
        tensors = load_file(str(work / unit["file"]))
        for k in KINDS:
            parts[k].append(tensors[k])
        for j, rid in enumerate(unit["response_ids"]):
            r = by_id[rid]
            index.append({**{k: r[k] for k in INDEX_KEYS}, "reader": reader, "row": len(index),
                          "n_prompt_tokens": unit["n_prompt_tokens"][j],
                          "n_response_tokens": unit["n_response_tokens"][j],
                          "active_adapters": ",".join(unit["active_adapters"]),
                          "merged_persona": unit["merged_persona"] or ""})
    write_outputs(out_dir, cell, layers, parts, index, fingerprint)
    journal.remove()
    for unit in done.values():
        (work / unit["file"]).unlink(missing_ok=True)


def write_outputs(out_dir: str, cell: Cell, layers: list[int], parts: dict, index: list[dict],
                  fingerprint: str) -> None:
    import pandas as pd
    from safetensors.torch import save_file

    tensors = {k: torch.cat(v) if v else torch.zeros((0, len(layers), 0), dtype=torch.float16)
               for k, v in parts.items()}
    tensors["layers"] = torch.tensor(layers, dtype=torch.int64)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        write_table(tmp / INDEX, pd.DataFrame(index, columns=[*INDEX_KEYS, "reader", "row", "n_prompt_tokens",
                                                              "n_response_tokens", "active_adapters",
                                                              "merged_persona"]))
        write_json(tmp / META, {**cell.keys(), "layers": layers, "readers": list(READERS), "kinds": list(KINDS),
                                "rows": len(index), "hidden_size": int(tensors["response_mean"].shape[-1]),
                                "dtype": "float16", "fingerprint": fingerprint,
                                "layer_meaning": "hidden_states index: 0 = embeddings, i = output of block i, "
                                                 "the last = after the final norm"})


def num_layers(model_dir: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(cfg.num_hidden_layers)

