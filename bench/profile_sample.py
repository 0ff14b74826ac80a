"""Where the time of one fast-path decode step goes: torch.profiler over decode steps 200-210 of a steady-state
(already compiled) 400 x 600 sampling call; top CUDA kernels and the wall time per step.

    python -m bench.profile_sample --shape llama-3.1-8b
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench import common


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--first", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    cfg = yaml.safe_load(Path(__file__).with_name("config.yaml").read_text())
    scfg = cfg["sampling"]
    from transformers import LogitsProcessor, LogitsProcessorList

    from bench.sample import _checkpoints
    from persona_em import compose
    from persona_em.sampling import fast_generate, sample

    tok = common.tokenizer()
    model = common.build_model(cfg["shapes"][a.shape], tok)
    dirs, model = _checkpoints(model, 1, Path(tempfile.mkdtemp()))
    model = compose.use_em_adapter(model, dirs[0], compose.EM, "none", "none")
    convs, settings = common.sampling_workload(scfg)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA])
    marks = {}

    class Window(LogitsProcessor):
        """Called once per decode step (eagerly, outside the compiled forward): starts/stops the profiler."""

        def __init__(self, active):
            self.step, self.active = 0, active

        def __call__(self, input_ids, scores):
            self.step += 1
            if self.active and self.step in (a.first, a.first + a.steps):
                torch.cuda.synchronize()
                marks[self.step] = time.perf_counter()
                (prof.start if self.step == a.first else prof.stop)()
            return scores

    fast_generate.use_gqa_decode_attention(model)
    from persona_em.chat import ChatFormat

    chat = ChatFormat(tok)
    enc = sample.left_pad([chat.prompt_ids(c) for c in convs], tok.pad_token_id, model.device)
    for active in (False, True):  # the first call compiles
        extra = {**fast_generate.fast_generate_kwargs(), "logits_processor": LogitsProcessorList([Window(active)])}
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.inference_mode(), fast_generate.bf16_lora_compute(model):
            sample._generate(model, enc, settings, chat, extra)
        torch.cuda.synchronize()
        print(f"generate {'(profiled window)' if active else '(compiles)'}: {time.perf_counter() - t0:.1f} s")
    wall = (marks[a.first + a.steps] - marks[a.first]) / a.steps
    events = prof.key_averages()
    # kernels only: the CUDA graph's kernels also count under the compiled graph's annotation (a CPU-side event),
    # so a sum over every event counts them twice (round 7's first profiles printed 34.4 ms for 17.2 ms)
    gpu_us = sum(e.self_device_time_total for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA) / a.steps
    print(f"decode step: {wall * 1e3:.1f} ms wall, {gpu_us / 1e3:.1f} ms of GPU kernels "
          f"(batch {len(convs)}, prompt {enc['input_ids'].shape[1]} tokens)")
    print(events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90))
    print(events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90))


if __name__ == "__main__":
    main()
