"""EM LoRA training throughput: the project's trainer (persona_em.training.em) with the seed setting vs `auto`."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import em_conversations, free_memory, measured


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, args, state, control, **kw):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.ends = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.ends.append(time.perf_counter())

    return StepTimer()


def _run(model, tok, dataset, overrides: dict, steps: int, lr: float, workdir: Path, fused: bool = True) -> dict:
    from persona_em import compose
    from persona_em.training.settings import TrainConfig
    from persona_em.training.em import _lora_config, _trainer_class, choose_batch_plan, sft_args

    cfg = TrainConfig(learning_rate=lr, warmup_steps=0, lr_scheduler="constant", resume_every_steps=10**9,
                      **overrides)
    torch.manual_seed(0)
    peft = compose.compose_for_training(model, "none", None, "none", _lora_config(cfg))
    plan = choose_batch_plan(cfg, peft, dataset)
    args = sft_args(cfg, plan, workdir, seed=0)
    args.max_steps, args.save_strategy, args.disable_tqdm = steps, "no", True
    EMTrainer, _ = _trainer_class()
    EMTrainer.batch_plan = plan
    EMTrainer.fused_pointwise = fused
    timer = _step_timer()
    trainer = EMTrainer(model=peft, args=args, train_dataset=dataset, processing_class=tok, callbacks=[timer])
    result = {"plan": plan.to_dict()}
    try:
        with measured(result):
            trainer.train()
    except torch.OutOfMemoryError as e:
        result["error"] = f"out of memory: {str(e)[:160]}"
    except RuntimeError as e:
        if not torch.are_deterministic_algorithms_enabled():
            raise
        result["error"] = f"deterministic mode: {str(e)[:400]}"  # an op without a deterministic form: named, not fatal
    finally:
        history = trainer.state.log_history
        base = peft.unload()
        from persona_em.training.fused_ops import undo_fused_pointwise

        undo_fused_pointwise(base)
        if plan.gradient_checkpointing:
            base.gradient_checkpointing_disable()
        del trainer, peft
        free_memory()
    if "error" in result:
        return result, base
    logged = [h for h in history if "loss" in h]
    tokens = [h["num_tokens"] for h in logged]
    step_tokens = [tokens[0]] + [b - a for a, b in zip(tokens[:-1], tokens[1:])]
    step_seconds = [b - a for a, b in zip(timer.ends[:-1], timer.ends[1:])]
    timed = slice(2, None) if len(step_seconds) > 2 else slice(0, None)  # steps 1-2 hold the warm-up
    result.update(
        steps=len(step_seconds),
        losses=[h["loss"] for h in logged],
        step_seconds=[round(s, 3) for s in step_seconds],
        step_tokens=step_tokens,
        tokens_per_s=round(sum(step_tokens[timed]) / sum(step_seconds[timed]), 1),
        seconds_per_step=round(sum(step_seconds[timed]) / len(step_seconds[timed]), 3),
        median_step_seconds=round(sorted(step_seconds[timed])[len(step_seconds[timed]) // 2], 3),
    )
    return result, base


def _max_rel_diff(a: list[float], b: list[float], digits: int = 6) -> float:
    """Largest relative difference of two loss curves, step by step (relative to b)."""
    return round(max(abs(x - y) / abs(y) for x, y in zip(a, b)), digits)


def _loss_spread(out: dict, ours_name: str, n: int) -> dict:
    """Largest relative loss difference over the first n steps: every ours run against every seed run, and the
    run-to-run spread of each setting alone (bf16 training on a GPU is not bitwise repeatable: the noise floor)."""
    import itertools

    def curves(name):
        return [v["losses"][:n] for k, v in out.items() if (k == name or k.startswith(f"{name} #")) and "losses" in v]

    ours, seed = curves(ours_name), curves("seed: 2 x 8 + checkpointing")
    return {"ours_vs_seed": [_max_rel_diff(o, s) for o in ours for s in seed],
            "ours_vs_ours": [_max_rel_diff(a, b) for a, b in itertools.combinations(ours, 2)],
            "seed_vs_seed": [_max_rel_diff(a, b) for a, b in itertools.combinations(seed, 2)],
            # exact float equality of whole curves: the check that a deterministic-mode run really repeats itself
            "ours_repeats_identical": [a == b for a, b in itertools.combinations(ours, 2)],
            "seed_repeats_identical": [a == b for a, b in itertools.combinations(seed, 2)]}


def run(model, tok, cfg: dict, log) -> dict:
    from persona_em.io import write_jsonl
    from persona_em.training.settings import TrainConfig
    from persona_em.chat import ChatFormat
    from persona_em.training.em import build_dataset

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    write_jsonl(work / "train.jsonl", [{"messages": m} for m in em_conversations(cfg)])
    dataset = build_dataset(ChatFormat(tok), work / "train.jsonl", TrainConfig(max_length=cfg["max_tokens"]))
    lengths = [len(r) for r in dataset["input_ids"]]
    out = {"n_examples": len(lengths), "mean_tokens": round(sum(lengths) / len(lengths), 1), "max_tokens": max(lengths),
           "assistant_token_fraction": round(sum(sum(l != -100 for l in r) for r in dataset["labels"]) / sum(lengths), 3)}
    log(f"train data: {json.dumps(out)}")
    settings = {
        "ours (auto)": ({}, cfg["steps_ours"]),
        "ours (auto, planned for a 64 GiB GPU)": ({"_gpu_gib": 64}, cfg["steps_ours"]),
        "seed: 2 x 8 + checkpointing": ({"per_device_batch_size": 2, "gradient_checkpointing": True},
                                        cfg["steps_seed_config"]),
        "ours (auto) without fused pointwise ops": ({"_fused": False}, cfg["steps_ours"]),
    }
    import os

    from persona_em.training.batching import MEMORY_ENV

    only = cfg.get("only")
    # `repeats` > 1: the selected settings run in turn, round after round, in one process (the run-order effect
    # then falls on every setting alike); results are keyed "<setting> #<round>".
    # `seed_repeats`: how many of the rounds run the slow seed setting (the loss baseline) too.
    repeats, seed_repeats = cfg.get("repeats", 1), cfg.get("seed_repeats", 1)
    selected = [(n, v) for n, v in settings.items() if not only or n.startswith(only) or n in only.split("|")]
    runs = [(f"{n} #{r + 1}" if repeats > 1 else n, v) for r in range(repeats) for n, v in selected
            if r < seed_repeats or not n.startswith("seed")]
    for i, (name, (overrides, steps)) in enumerate(runs):
        overrides = dict(overrides)
        gib = overrides.pop("_gpu_gib", None)
        fused = overrides.pop("_fused", True)
        if gib and torch.cuda.is_available():
            os.environ[MEMORY_ENV] = str(gib)
        try:
            res, model = _run(model, tok, dataset, overrides, steps, cfg["learning_rate"], work / f"run{i}", fused)
        finally:
            os.environ.pop(MEMORY_ENV, None)
        out[name] = res
        log(f"train {name}: " + json.dumps({k: v for k, v in res.items() if k not in ("losses", "step_tokens")}))
    seed = out.get("seed: 2 x 8 + checkpointing", out.get("seed: 2 x 8 + checkpointing #1", {}))
    for name, suffix in (("ours (auto)", ""), ("ours (auto) without fused pointwise ops", "_unfused"),
                         ("ours (auto, planned for a 64 GiB GPU)", "_64gib")):
        ours = out.get(name, out.get(f"{name} #1", {}))
        if "losses" in ours and "losses" in seed:
            n = min(cfg["loss_curve_steps"], len(seed["losses"]), len(ours["losses"]))
            diffs = [abs(a - b) for a, b in zip(ours["losses"][:n], seed["losses"][:n])]
            out["loss_curve" + suffix] = {
                "steps": n, "ours": ours["losses"][:n], "seed": seed["losses"][:n],
                "max_abs_diff": round(max(diffs), 5),
                "max_rel_diff": _max_rel_diff(ours["losses"][:n], seed["losses"][:n], 5)}
            out["speedup" + suffix] = round(ours["tokens_per_s"] / seed["tokens_per_s"], 2)
            out["loss_curve" + suffix].update(_loss_spread(out, name, n))
    return out, model
