"""Where the time of one `auto` EM training step goes: torch.profiler over steps 4-6, top CUDA kernels.

    python -m bench.profile_train --shape qwen2.5-7b
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
    ap.add_argument("--shape", default="qwen2.5-7b")
    ap.add_argument("--override", default="{}", help="TrainConfig overrides as YAML, e.g. '{micro_batch_tokens: 2400}'")
    a = ap.parse_args()
    cfg = yaml.safe_load(Path(__file__).with_name("config.yaml").read_text())
    from transformers import TrainerCallback

    from persona_em import compose
    from persona_em.io import write_jsonl
    from persona_em.training.settings import TrainConfig
    from persona_em.chat import ChatFormat
    from persona_em.training.em import _lora_config, _trainer_class, build_dataset, choose_batch_plan, sft_args

    tok = common.tokenizer()
    model = common.build_model(cfg["shapes"][a.shape], tok)
    work = Path(tempfile.mkdtemp())
    write_jsonl(work / "t.jsonl", [{"messages": m} for m in common.em_conversations(cfg["train"])])
    dataset = build_dataset(ChatFormat(tok), work / "t.jsonl", TrainConfig())
    tcfg = TrainConfig(learning_rate=1e-4, warmup_steps=0, lr_scheduler="constant", resume_every_steps=10**9,
                       **yaml.safe_load(a.override))
    peft = compose.compose_for_training(model, "none", None, "none", _lora_config(tcfg))
    plan = choose_batch_plan(tcfg, peft, dataset)
    print(plan)
    args = sft_args(tcfg, plan, work / "o", 0)
    args.max_steps, args.save_strategy, args.disable_tqdm = 7, "no", True
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])

    marks = {}

    class P(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (3, 6):
                torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()
                (prof.start if state.global_step == 3 else prof.stop)()

    EMTrainer, _ = _trainer_class()
    EMTrainer.batch_plan = plan
    EMTrainer(model=peft, args=args, train_dataset=dataset, processing_class=tok, callbacks=[P()]).train()
    events = prof.key_averages()
    wall = (marks[6] - marks[3]) / 3
    gpu = sum(e.self_device_time_total for e in events) / 3 / 1e6
    print(f"optimizer step: {wall:.3f} s wall, {gpu:.3f} s of GPU kernels ({gpu / wall:.0%} busy)")
    print(events.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70))


if __name__ == "__main__":
    main()
