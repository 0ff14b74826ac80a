"""Sampling one checkpoint's evaluation (questions x samples x new tokens) with persona_em.sampling.sample.generate_batch:
one response per call (the users' old script), one plain batched generate, and the fast path (twice, then after
loading another checkpoint in place, as sample_cell does for every checkpoint of a cell)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from bench.common import free_memory, measured, sampling_workload


def _checkpoints(model, n: int, workdir: Path) -> list[Path]:
    """`n` EM adapters of the preset's shape with random (non-zero) weights, saved as train_em saves them."""
    from persona_em import compose
    from persona_em.training.settings import TrainConfig
    from persona_em.training.em import _lora_config, _save_em

    dirs = []
    for i in range(n):
        torch.manual_seed(100 + i)
        peft = compose.compose_for_training(model, "none", None, "none", _lora_config(TrainConfig()))
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 1e-3)
        _save_em(peft, workdir / f"step-{i}")
        dirs.append(workdir / f"step-{i}")
        model = peft.unload()
    return dirs, model


def _generate(model, tok, convs, settings, fast, result, bf16_lora=None):
    from persona_em.chat import ChatFormat
    from persona_em.sampling.sample import generate_batch

    chat = ChatFormat(tok)
    with measured(result):
        rows = generate_batch(model, chat, convs, settings, seed=0, fast=fast, bf16_lora=bf16_lora)
    result["responses"] = len(rows)
    # the sampled text: equal between two compilations that compute the same thing
    result["responses_sha256"] = hashlib.sha256(json.dumps([x["response"] for x in rows]).encode()).hexdigest()[:16]
    result["new_tokens"] = sum(r["n_new_tokens"] for r in rows)
    result["tokens_per_s"] = round(result["new_tokens"] / result["seconds"], 1)
    return result


def run(model, tok, cfg: dict, log) -> dict:
    from persona_em import compose

    convs, settings = sampling_workload(cfg)
    n = len(convs)
    dirs, model = _checkpoints(model, 2, Path(tempfile.mkdtemp(prefix="bench_sample_")))
    model = compose.use_em_adapter(model, dirs[0], compose.EM, "none", "none")
    out = {"responses_per_checkpoint": n, "max_new_tokens": cfg["max_new_tokens"]}

    def step(name, fn):
        try:
            out[name] = fn({})
        except torch.OutOfMemoryError as e:
            out[name] = {"error": f"out of memory: {str(e)[:160]}"}
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' numbers
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        free_memory()
        log(f"sample {name}: {json.dumps(out[name])}")

    k = cfg["one_at_a_time"]
    variants = cfg.get("variants", "one,plain,ours,fp32lora").split(",")

    def one_at_a_time(r):
        with measured(r):
            per = [_generate(model, tok, [c], settings, False, {}) for c in convs[:k]]
        r.update(responses=k, new_tokens=sum(p["new_tokens"] for p in per),
                 seconds_per_response=round(r["seconds"] / k, 2))
        r["extrapolated_seconds"] = round(r["seconds_per_response"] * n, 1)
        return r

    def next_checkpoint(r):
        nonlocal model
        model = compose.use_em_adapter(model, dirs[1], compose.EM, "none", "none")
        return _generate(model, tok, convs, settings, True, r)

    if "one" in variants:
        step("one response per call (users' old script)", one_at_a_time)
    if "plain" in variants:
        step("plain batched generate (all in one call)", lambda r: _generate(model, tok, convs, settings, False, r))
    if "ours" in variants:
        step("ours, first call (includes compilation)", lambda r: _generate(model, tok, convs, settings, True, r))
        step("ours, steady state", lambda r: _generate(model, tok, convs, settings, True, r))
        step("ours, next checkpoint loaded in place", next_checkpoint)
    if "kernel" in variants:  # decode attention: SDPA over the whole static cache vs the length-aware kernel
        from persona_em.sampling import decode_kernel, fast_generate

        launches = []
        launch = decode_kernel._kernel
        decode_kernel._kernel = lambda device: launches.append(1) or launch(device)  # runs while compiling/capturing

        def attention(devices, r):
            fast_generate.KERNEL_DEVICES = set(devices)  # a new object: the compiled step's guard sees the change
            launches.clear()
            r = _generate(model, tok, convs, settings, True, r)
            r["kernel_launches_traced"] = len(launches)
            return r

        for name, devices in [("SDPA decode attention (before), first call", ()),
                              ("SDPA decode attention (before), steady", ()),
                              ("length-aware kernel, first call (recompiles)", ("cuda",)),
                              ("length-aware kernel, steady", ("cuda",)),
                              ("SDPA decode attention (before), steady again", ()),
                              ("length-aware kernel, steady again", ("cuda",))]:
            step(name, lambda r, devices=devices: attention(devices, r))
        fast_generate.KERNEL_DEVICES = {"cuda"}
        decode_kernel._kernel = launch
    if "detmode" in variants:  # the cost of Inductor's deterministic mode (use_deterministic_compile), side by side
        import torch._inductor.config as inductor_config
        from persona_em.sampling import fast_generate

        keep = fast_generate.use_deterministic_compile

        def mode(det, r):
            # generate_batch calls fast_generate.use_deterministic_compile before compiling: here it sets `det`;
            # a reset makes the next call compile again (in-process Inductor caches still serve a mode seen before)
            fast_generate.use_deterministic_compile = lambda: setattr(inductor_config, "deterministic", det)
            torch._dynamo.reset()
            return _generate(model, tok, convs, settings, True, r)

        rounds = int(os.environ.get("BENCH_DETMODE_ROUNDS", 2))  # A B A B: a drift over the process shows in both
        for k, det in enumerate((False, True) * rounds):
            name = f"{'deterministic' if det else 'autotuned (Inductor default)'} #{k // 2 + 1}"
            step(f"{name}, first call (compiles)", lambda r, det=det: mode(det, r))
            for i in (1, 2):
                step(f"{name}, steady {i}", lambda r: _generate(model, tok, convs, settings, True, r))
        fast_generate.use_deterministic_compile = keep
        inductor_config.deterministic = False
    if "defer" in variants:  # the per-step host sync of generate's stop check vs fast_generate.deferred_stop_check
        from persona_em.sampling import fast_generate

        keep = fast_generate.DEFER_DEVICES
        step("ours, first call (compiles)", lambda r: _generate(model, tok, convs, settings, True, r))
        for k in (1, 2):  # in turn, on the same compiled step: only the host's waiting differs
            for name, devices in (("per-step stop check (transformers' default)", set()),
                                  ("deferred stop check", {"cuda"})):
                fast_generate.DEFER_DEVICES = devices
                step(f"{name} #{k}", lambda r: _generate(model, tok, convs, settings, True, r))
        fast_generate.DEFER_DEVICES = keep
    if "plaindefer" in variants:  # plain batched generate (the persona arm's rollouts) without and with the deferral
        from persona_em.sampling import fast_generate

        keep = fast_generate.DEFER_DEVICES
        for k in (1, 2):  # A B A B: a drift over the process shows in both
            for name, devices in (("plain generate, per-step stop check (before)", set()),
                                  ("plain generate, deferred stop check (now)", {"cuda"})):
                fast_generate.DEFER_DEVICES = devices
                step(f"{name} #{k}", lambda r: _generate(model, tok, convs, settings, False, r))
        fast_generate.DEFER_DEVICES = keep
    if "folded" in variants:  # through PEFT's LoRA layers (rounds 1-8) vs folded into the weights (sample_cell now)
        from persona_em.chat import ChatFormat
        from persona_em.sampling.sample import fold_copy_device

        longest = max(len(ChatFormat(tok).prompt_ids(c)) for c in convs) + settings["max_new_tokens"]
        folded = compose.FoldedAdapters(fold_copy_device(model, len(convs), longest))  # as sample_cell chooses
        out["fold_copy_on"] = folded.keep

        def through(kind, r, checkpoint=None):
            nonlocal model
            if checkpoint is not None:  # another checkpoint: loaded in place, then folded onto the restored base
                model = compose.use_em_adapter(model, checkpoint, compose.EM, "none", "none")
            if kind == "peft":
                return _generate(model, tok, convs, settings, True, r)
            fold = {}
            with measured(fold), folded.applied(model) as plain:  # the fold, the sampling, the exact restore
                r = _generate(plain, tok, convs, settings, True, r)
            r["seconds_with_fold_and_restore"] = fold["seconds"]
            return r

        step("through PEFT's LoRA layers, first call (compiles)", lambda r: through("peft", r))
        step("folded into the weights, first call (compiles)", lambda r: through("folded", r))
        for k in (1, 2):  # A B A B: a drift over the process shows in both
            step(f"through PEFT's LoRA layers, steady #{k}", lambda r: through("peft", r))
            step(f"folded into the weights, steady #{k}", lambda r: through("folded", r))
        step("folded, next checkpoint loaded in place", lambda r: through("folded", r, dirs[1]))
        step("folded, first checkpoint again", lambda r: through("folded", r, dirs[0]))
    if "fp32lora" in variants:  # what `ours` was before bf16 LoRA compute: PEFT's fp32 casts of LoRA inputs
        step("ours with PEFT's fp32 LoRA inputs, first call (recompiles)",
             lambda r: _generate(model, tok, convs, settings, True, r, bf16_lora=False))
        step("ours with PEFT's fp32 LoRA inputs, steady state",
             lambda r: _generate(model, tok, convs, settings, True, r, bf16_lora=False))
    model = model.unload()
    return out, model
