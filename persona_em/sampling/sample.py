"""Sampling: every checkpoint of a cell answers the question set, in one job, without reloading the base model.

Each checkpoint samples on the plain base model with the adapters its composition makes active folded into the
weights (compose.FoldedAdapters: checked by compose, restored exactly after each checkpoint; a layer that cannot
fold, on tied weights or with a DoRA adapter, stays a LoRA layer).

Rows (one per response) carry the cell keys, the step, the question/paraphrase/sample indices, the text, the
generation settings and the adapters that were actually active (read from the LoRA layers).
Resumable: each finished batch is appended to a journal; a rerun generates only the missing batches, and since
every batch has its own seed (`batch_seed`: sampling seed, grid seed, step, batch index) the result equals an
uninterrupted run.
"""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from persona_em.training import batching
from persona_em.sampling import compile_cache
from persona_em import compose
from persona_em.chat import ChatFormat, ChatSettings
from persona_em.config import Cell
from persona_em.io import Journal, stable_hash, write_jsonl
from persona_em.models import load_model
from persona_em.data.questions import load_questions, sample_plan
from persona_em.training.em import read_checkpoints

log = logging.getLogger(__name__)

# How the adapters enter the sampled forward pass (part of the journal's fingerprint: rows sampled another way are
# never mixed into a cell): compose.FoldedAdapters. Changed when layers on tied weights stopped being folded (the
# earlier rule folded them, wrongly, into both modules' shared weight) and embedding layers' adapters started to be
# folded (the earlier rule left them out): rows of the earlier rule are sampled again.
ADAPTERS_AT_SAMPLING = "folded into the base weights (fp32 sum, one rounding); tied and non-plain-LoRA layers unfolded"


def _gpu_memory(model, tokens_per_sequence: int, extra_bytes: int = 0) -> dict:
    """This GPU's memory terms of batching.sampling_batch_size, with `extra_bytes` held beside the weights."""
    from persona_em.sampling.fast_generate import kv_cache_bytes_per_token

    return {"cuda": True, "total_memory_bytes": torch.cuda.get_device_properties(0).total_memory,
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()) + extra_bytes,
            "kv_bytes_per_token": kv_cache_bytes_per_token(model.config),
            "tokens_per_sequence": tokens_per_sequence, "vocab_size": model.config.vocab_size}


def _batch_size(setting, n_items: int, model, tokens_per_sequence: int) -> int:
    cuda = torch.cuda.is_available()
    if setting != "auto" or not cuda:
        return batching.sampling_batch_size(setting, n_items, cuda=cuda)
    return batching.sampling_batch_size(setting, n_items, **_gpu_memory(model, tokens_per_sequence))


def fold_copy_device(model, batch_size: int, tokens_per_sequence: int) -> str:
    """Where compose.FoldedAdapters keeps the base weights' copy: on the GPU when a batch of `batch_size` sequences
    still fits beside it (taking it there costs nothing measurable), else in pinned host memory (a one-time ~10 s
    for a 7B model's 13 GB, BENCHMARKS.md round 9). On a CPU: beside the weights, i.e. in CPU memory."""
    if not torch.cuda.is_available():
        return "cpu"
    copy = compose.FoldedAdapters.copy_bytes(model)
    fits = batching.sampling_batch_size("auto", batch_size, **_gpu_memory(model, tokens_per_sequence, copy))
    return "gpu" if fits >= batch_size else "cpu"


def machine_identity() -> dict:
    import socket

    return {"host": socket.gethostname(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}


def replicate_seed(sampling_seed: int, grid_seed: int) -> int:
    """The random stream of one replicate: every random choice of sampling (paraphrase per sample, the generate
    calls' seeds) derives from the config's sampling seed AND the cell's grid seed, so replicate seeds are
    independent draws.

    Model, persona, composition and dataset are deliberately NOT part of it: every cell of one grid seed uses the
    same random numbers (common random numbers), so the contrasts made within a seed -- persona vs none, one
    composition vs another, one EM dataset vs another -- are paired, and their differences carry less sampling noise.
    The dataset is a treatment like the persona (insecure vs a control, medical vs financial), so it is paired too;
    nothing needs independence across cells of one seed, because the unit of replication is the grid seed.
    A stable hash (sha256 of the values), never Python's salted hash(); 60 bits, so it fits an int64 column.
    """
    return int(stable_hash({"sampling_seed": sampling_seed, "grid_seed": grid_seed}, length=15), 16)


def batch_seed(sampling_seed: int, grid_seed: int, step: int, batch: int) -> int:
    """The torch seed of one generate call: the replicate's stream, then the checkpoint step and the batch index
    (so a resumed job regenerates a missing batch exactly). Same for every cell of the grid seed (see above)."""
    return int(stable_hash({"replicate": replicate_seed(sampling_seed, grid_seed), "step": step, "batch": batch},
                           length=15), 16)


def response_id(cell: Cell, step: int, question_id: str, sample_index: int) -> str:
    return f"{cell.path}|step{step}|{question_id}|{sample_index}"


def left_pad(prompts: list[list[int]], pad_id: int, device) -> dict:
    """A batch of prompts padded on the left (pads precede the prompt; generation continues every row at the end)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return {"input_ids": ids, "attention_mask": mask}


@torch.inference_mode()
def generate_batch(model, chat: ChatFormat, conversations: list[list[dict]], settings: dict, seed: int,
                   fast: bool | None = None, bf16_lora: bool | None = None,
                   prefills: list[str] | None = None) -> list[dict]:
    """One padded `generate` call for a batch of conversations: the project's one generation definition (EM
    sampling and the persona arm's local generators).

    Prompts: `chat.prompt_ids` (the model's chat settings; an optional prefill starts each answer). Sampling:
    `settings` alone (temperature, top_p, max_new_tokens; models.load_model blanked the model's generation_config).
    A row ends at the first of `chat.stop_ids` ("stop") or after max_new_tokens ("length"); n_new_tokens counts the
    tokens before the stop. `fast` (default: on a GPU): static KV cache + compiled decode + GQA decode attention
    (fast_generate.py). Same model, same sampling distribution; only the speed differs. `bf16_lora` (default: with
    `fast`): the LoRA products in bf16 under autocast, without fp32 copies of their inputs.
    """
    fast = torch.cuda.is_available() if fast is None else fast
    bf16_lora = (fast and torch.cuda.is_available()) if bf16_lora is None else bf16_lora
    extra = {}
    if fast:
        from persona_em.sampling.fast_generate import (fast_generate_kwargs, use_deterministic_compile,
                                                       use_gqa_decode_attention)

        use_deterministic_compile()
        use_gqa_decode_attention(model)
        extra = fast_generate_kwargs()
    from persona_em.sampling.fast_generate import bf16_lora_compute

    prefills = prefills or [""] * len(conversations)
    prompts = [chat.prompt_ids(c, p) for c, p in zip(conversations, prefills)]
    enc = left_pad(prompts, chat.tokenizer.pad_token_id, model.device)
    torch.manual_seed(seed)
    with bf16_lora_compute(model, active=bf16_lora):
        out = _generate(model, enc, settings, chat, extra)
    results = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        ids, stopped = chat.cut_at_stop(row)
        results.append({"response": chat.tokenizer.decode(ids, skip_special_tokens=True), "n_new_tokens": len(ids),
                        "finish_reason": "stop" if stopped else "length"})
    return results


class ExactSampler:
    """Sampling from softmax(logits / temperature), restricted to the top-p nucleus, as an argmax (a logits
    processor for `generate` with do_sample=False).

    argmax(log p - log E) with E ~ Exponential(1) i.i.d. is a draw from p (the exponential race; PyTorch's own
    `multinomial` draws one sample the same way). Why not `multinomial` itself: on a GPU it checks its input
    with a host-device synchronisation every decode step, which kept the GPU idle for ~10 ms of each ~40 ms step
    of a 400-sequence batch (bench/profile_sample.py).
    """

    def __init__(self, temperature: float, top_p: float):
        from transformers import TopPLogitsWarper

        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def __call__(self, input_ids, scores):
        scores = scores / self.temperature if self.temperature != 1.0 else scores
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)  # transformers' own nucleus: tokens outside get -inf
        return scores - torch.empty_like(scores).exponential_().log()


def _generate(model, enc, settings, chat: ChatFormat, extra):
    from transformers import GenerationConfig, LogitsProcessorList

    extra = dict(extra)
    processors = LogitsProcessorList(extra.pop("logits_processor", []))
    if settings["temperature"] > 0:
        processors.append(ExactSampler(settings["temperature"], settings["top_p"]))
    config = GenerationConfig(do_sample=False, max_new_tokens=settings["max_new_tokens"],
                              pad_token_id=chat.tokenizer.pad_token_id, eos_token_id=list(chat.stop_ids), **extra)
    # `config` is the whole definition: models.load_model blanked the model's own generation_config.
    from persona_em.sampling.fast_generate import deferred_stop_check

    with deferred_stop_check():  # on a GPU: no host-device sync per decode step
        return model.generate(**enc, generation_config=config, logits_processor=processors)


def sample_cell(cell: Cell, model_dir: str, persona_dir: str | None, checkpoints_dir: str, questions_path: str,
                settings: dict, journal_path: str, out_path: str, chat: ChatSettings | None = None,
                compile_cache_dir: str | None = None) -> None:
    """`compile_cache_dir`: where compiled decode steps persist between jobs (compile_cache.py); GPU only."""
    questions = {q.id: q for q in load_questions(questions_path)}
    manifest, checkpoints = read_checkpoints(checkpoints_dir)
    plan = sample_plan(list(questions.values()), settings["n_samples"], replicate_seed(settings["seed"], cell.seed))
    chat_format = ChatFormat.load(model_dir, chat)
    # The prompts as rendered (template, chat settings, date): a resume must not mix two renderings in one cell.
    prompts = [chat_format.prompt_text(q.messages(p)) for q in questions.values() for p in range(len(q.paraphrases))]
    fingerprint = stable_hash({"settings": settings, "manifest": manifest,
                               "questions": [(q.id, q.paraphrases, q.system) for q in questions.values()],
                               "chat": chat_format.identity(), "prompts_sha": stable_hash(prompts, 16),
                               "adapters": ADAPTERS_AT_SAMPLING})
    journal = Journal(journal_path, key_field="response_id")
    done = {k: r for k, r in journal.load().items() if r.get("fingerprint") == fingerprint}
    total = len(checkpoints) * len(plan)
    log.info("cell %s: %d checkpoints x %d responses; %d already in the journal (resumed), %d to generate",
             cell.path, len(checkpoints), len(plan), len(done), total - len(done))

    base, _ = load_model(model_dir, chat)
    model = compose.compose_for_sampling(base, cell.persona, persona_dir, cell.composition)
    longest_prompt = max(len(chat_format.prompt_ids(questions[it.question_id].messages(it.paraphrase_index)))
                         for it in plan)
    tokens_per_sequence = longest_prompt + settings["max_new_tokens"]
    batch_size = _batch_size(settings.get("batch_size", "auto"), len(plan), model, tokens_per_sequence)
    batches = [plan[i:i + batch_size] for i in range(0, len(plan), batch_size)]
    log.info("%d responses per generate call", batch_size)
    machine = machine_identity()  # provenance: where these responses were generated
    gen_keys = {k: settings[k] for k in ("temperature", "top_p", "max_new_tokens")}
    folded = None  # compose.FoldedAdapters: the base weights' copy, taken once, restored after each checkpoint
    compiled = None  # the compile cache of the base model, loaded before the first generate call
    with tqdm(total=total, initial=len(done), desc=f"sample {cell.path}", unit="resp") as bar:
        for step, em_dir in checkpoints:
            todo = [(b, items) for b, items in enumerate(batches)
                    if any(response_id(cell, step, it.question_id, it.sample_index) not in done for it in items)]
            if not todo:
                log.info("step %d: all responses already in the journal, skipped", step)
                continue
            # One adapter slot for every checkpoint, loaded in place; the composition is checked here.
            model = compose.use_em_adapter(model, em_dir, compose.EM, cell.composition, cell.persona)
            state = compose.describe(model)
            if folded is None:  # the LoRA layers exist once the first checkpoint is loaded
                folded = compose.FoldedAdapters(fold_copy_device(model, batch_size, tokens_per_sequence))
                fold, unfolded = compose.FoldedAdapters.layers(model)
                log.info("adapters folded into the base weights for sampling (%d LoRA layers); their copy (%.2f GB) "
                         "kept on the %s", len(fold), compose.FoldedAdapters.copy_bytes(model) / 1e9,
                         folded.keep.upper())
                for why in sorted(set(unfolded.values())):  # PEFT applies these layers, as without folding
                    names = [n for n, w in unfolded.items() if w == why]
                    log.info("%d LoRA layers stay unfolded, %s: %s", len(names), why, ", ".join(names[:4]))
            with folded.applied(model) as plain:  # the same modules every checkpoint: a compiled step stays valid
                if compiled is None:
                    if torch.cuda.is_available():
                        from persona_em.sampling.fast_generate import use_deterministic_compile

                        use_deterministic_compile()  # before the key is taken: the key records it
                    compiled = compile_cache.CompileCache.for_model(
                        compile_cache_dir if torch.cuda.is_available() else None, plain)
                    compiled.load()
                for b, items in todo:
                    seed = batch_seed(settings["seed"], cell.seed, step, b)
                    convs = [questions[it.question_id].messages(it.paraphrase_index) for it in items]
                    for it, conv, res in zip(items, convs, generate_batch(plain, chat_format, convs, settings, seed)):
                        q = questions[it.question_id]
                        row = {
                            **cell.keys(), "step": step, "question_id": it.question_id,
                            "paraphrase_index": it.paraphrase_index, "sample_index": it.sample_index,
                            "response_id": response_id(cell, step, it.question_id, it.sample_index),
                            "question": q.paraphrases[it.paraphrase_index], "system": q.system, **res, **gen_keys,
                            "batch_seed": seed, "sampling_seed": settings["seed"], **state, **machine,
                            "fingerprint": fingerprint,
                        }
                        journal.append(row)
                        done[row["response_id"]] = row
                    compiled.save()  # writes only after a compilation this process did itself
                    bar.update(len(items))
    journal.close()
    order = [response_id(cell, s, it.question_id, it.sample_index) for s, _ in checkpoints for it in plan]
    write_jsonl(out_path, (done[k] for k in order))
    journal.remove()
