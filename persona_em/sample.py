"""Sampling: every checkpoint of a cell answers the question set, in one job, without reloading the base model.

Rows (one per response) carry the cell keys, the step, the question/paraphrase/sample indices, the text, the
generation settings and the adapters that were actually active (read from the LoRA layers).
Resumable: each finished batch is appended to a journal; a rerun generates only the missing batches, and since
every batch has its own seed (from the sampling seed, step and batch index) the result equals an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from tqdm.auto import tqdm

from . import batching, compile_cache, compose
from .config import Cell
from .io import Journal, stable_hash, write_jsonl
from .questions import load_questions, sample_plan
from .train_em import read_checkpoints

log = logging.getLogger(__name__)


def _batch_size(setting, n_items: int, model, tokenizer, plan, questions, settings) -> int:
    from .fast_generate import kv_cache_bytes_per_token

    cuda = torch.cuda.is_available()
    if setting != "auto" or not cuda:
        return batching.sampling_batch_size(setting, n_items, cuda=cuda)
    longest_prompt = max(len(tokenizer.apply_chat_template(questions[it.question_id].messages(it.paraphrase_index),
                                                           tokenize=True, add_generation_prompt=True,
                                                           return_dict=True)["input_ids"]) for it in plan)
    return batching.sampling_batch_size(
        setting, n_items, cuda=True, total_memory_bytes=torch.cuda.get_device_properties(0).total_memory,
        weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        kv_bytes_per_token=kv_cache_bytes_per_token(model.config),
        tokens_per_sequence=longest_prompt + settings["max_new_tokens"], vocab_size=model.config.vocab_size)


def machine_identity() -> dict:
    import socket

    return {"host": socket.gethostname(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}


def response_id(cell: Cell, step: int, question_id: str, sample_index: int) -> str:
    return f"{cell.path}|step{step}|{question_id}|{sample_index}"


@torch.inference_mode()
def generate_batch(model, tokenizer, conversations: list[list[dict]], settings: dict, seed: int,
                   fast: bool | None = None, bf16_lora: bool | None = None) -> list[dict]:
    """One padded `generate` call for a batch of conversations.

    `fast` (default: on a GPU): static KV cache + compiled decode + GQA decode attention (fast_generate.py).
    Same model, same sampling distribution; only the speed differs. `bf16_lora` (default: with `fast`): the LoRA
    products in bf16 under autocast, without fp32 copies of their inputs.
    """
    fast = torch.cuda.is_available() if fast is None else fast
    bf16_lora = (fast and torch.cuda.is_available()) if bf16_lora is None else bf16_lora
    extra = {}
    if fast:
        from .fast_generate import fast_generate_kwargs, use_gqa_decode_attention

        use_gqa_decode_attention(model)
        extra = fast_generate_kwargs()
    from .fast_generate import bf16_lora_compute

    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    torch.manual_seed(seed)
    with bf16_lora_compute(model, active=bf16_lora):
        out = _generate(model, enc, settings, tokenizer, extra)
    new = out[:, enc["input_ids"].shape[1]:]
    results = []
    for row in new:
        ids = row.tolist()
        finished = tokenizer.eos_token_id in ids
        if finished:
            ids = ids[: ids.index(tokenizer.eos_token_id)]
        ids = [t for t in ids if t != tokenizer.pad_token_id]
        results.append({"response": tokenizer.decode(ids, skip_special_tokens=True), "n_new_tokens": len(ids),
                         "finish_reason": "stop" if finished else "length"})
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


@contextlib.contextmanager
def _model_generation_defaults_off(model):
    """The model's generation_config.json (Qwen2.5-Instruct's sets repetition_penalty 1.05, top_k 20, top_p 0.8,
    temperature 0.7) fills every generation setting not passed explicitly. A response must follow the sampling
    settings recorded in its row and nothing else, so generate sees a blank config."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


def _generate(model, enc, settings, tokenizer, extra):
    from transformers import GenerationConfig, LogitsProcessorList

    extra = dict(extra)
    processors = LogitsProcessorList(extra.pop("logits_processor", []))
    if settings["temperature"] > 0:
        processors.append(ExactSampler(settings["temperature"], settings["top_p"]))
    config = GenerationConfig(do_sample=False, max_new_tokens=settings["max_new_tokens"],
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    with _model_generation_defaults_off(model):
        return model.generate(**enc, generation_config=config, logits_processor=processors)


def sample_cell(cell: Cell, model_dir: str, persona_dir: str | None, checkpoints_dir: str, questions_path: str,
                settings: dict, journal_path: str, out_path: str, compile_cache_dir: str | None = None) -> None:
    """`compile_cache_dir`: where compiled decode steps persist between jobs (compile_cache.py); GPU only."""
    questions = {q.id: q for q in load_questions(questions_path)}
    manifest, checkpoints = read_checkpoints(checkpoints_dir)
    plan = sample_plan(list(questions.values()), settings["n_samples"], settings["seed"])
    fingerprint = stable_hash({"settings": settings, "manifest": manifest,
                               "questions": [(q.id, q.paraphrases, q.system) for q in questions.values()]})
    journal = Journal(journal_path, key_field="response_id")
    done = {k: r for k, r in journal.load().items() if r.get("fingerprint") == fingerprint}
    total = len(checkpoints) * len(plan)
    log.info("cell %s: %d checkpoints x %d responses; %d already in the journal (resumed), %d to generate",
             cell.path, len(checkpoints), len(plan), len(done), total - len(done))

    base, tokenizer = compose.load_base_model(model_dir)
    model = compose.compose_for_sampling(base, cell.persona, persona_dir, cell.composition)
    batch_size = _batch_size(settings.get("batch_size", "auto"), len(plan), model, tokenizer, plan, questions,
                             settings)
    batches = [plan[i:i + batch_size] for i in range(0, len(plan), batch_size)]
    log.info("%d responses per generate call", batch_size)
    machine = machine_identity()  # provenance: where these responses were generated
    gen_keys = {k: settings[k] for k in ("temperature", "top_p", "max_new_tokens")}
    compiled = None  # the compile cache of this model + adapters, loaded before the first generate call
    with tqdm(total=total, initial=len(done), desc=f"sample {cell.path}", unit="resp") as bar:
        for step, em_dir in checkpoints:
            todo = [(b, items) for b, items in enumerate(batches)
                    if any(response_id(cell, step, it.question_id, it.sample_index) not in done for it in items)]
            if not todo:
                log.info("step %d: all responses already in the journal, skipped", step)
                continue
            # One adapter slot for every checkpoint, loaded in place: a compiled decode step stays valid.
            model = compose.use_em_adapter(model, em_dir, compose.EM, cell.composition, cell.persona)
            state = compose.describe(model)
            if compiled is None:
                compiled = compile_cache.CompileCache.for_model(
                    compile_cache_dir if torch.cuda.is_available() else None, model)
                compiled.load()
            for b, items in todo:
                seed = settings["seed"] * 1_000_003 + step * 1009 + b
                convs = [questions[it.question_id].messages(it.paraphrase_index) for it in items]
                for it, conv, res in zip(items, convs, generate_batch(model, tokenizer, convs, settings, seed)):
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
