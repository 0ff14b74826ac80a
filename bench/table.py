"""Render bench JSON results as one markdown table: python -m bench.table results/bench/*.json"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def _f(v, fmt="{:,.0f}"):
    return "—" if v is None else fmt.format(v)


def render(results: list[dict]) -> str:
    rows = []
    for r in results:
        s = r["shape"]
        t = r.get("train")
        if t:
            seed, ours = t.get("seed: 2 x 8 + checkpointing", {}), t.get("ours (auto)", {})
            ours64 = t.get("ours (auto, planned for a 64 GiB GPU)")
            variants = [("seed: 2 x 8, checkpointing, padded", seed), ("ours: auto plan", ours)]
            if ours64:
                variants.append(("ours: auto plan as on a 64 GiB GPU", ours64))
            for label, x in variants:
                plan = x.get("plan", {})
                desc = label if not plan.get("packed") else (
                    f"{label} (packed, ≤{plan['micro_batch_tokens']} tok/micro-batch, "
                    f"checkpointing {'on' if plan['gradient_checkpointing'] else 'off'})")
                res = x.get("error") or f"{_f(x.get('tokens_per_s'))} tok/s ({_f(x.get('seconds_per_step'), '{:.2f}')} s/step)"
                ratio = (f"{x['tokens_per_s'] / seed['tokens_per_s']:.1f}×"
                         if label.startswith("ours") and "tokens_per_s" in x and "tokens_per_s" in seed else "")
                rows.append([s, "EM LoRA training", desc, res, _f(x.get("peak_gb"), "{:.1f}"), ratio])
            lc = t.get("loss_curve")
            if lc:
                rows.append([s, f"loss curve, {lc['steps']} steps", "ours vs seed, same data order",
                             f"max abs diff {lc['max_abs_diff']} (rel {lc['max_rel_diff']})", "", ""])
        smp = r.get("sample")
        if smp:
            plain = smp.get("plain batched generate (all in one call)", {}).get("seconds")
            n = smp.get("responses_per_checkpoint")
            for key, x in smp.items():
                if not isinstance(x, dict):
                    continue
                if "error" in x:
                    res = x["error"][:80]
                elif "extrapolated_seconds" in x:
                    res = f"{x['seconds_per_response']} s/response → {x['extrapolated_seconds']:,} s per {n}"
                else:
                    res = f"{x['seconds']} s per {x['responses']} ({_f(x.get('tokens_per_s'))} new tok/s)"
                ratio = f"{plain / x['seconds']:.1f}× vs plain" if plain and "seconds" in x and "extrapolated_seconds" not in x and not key.startswith("plain") else ""
                rows.append([s, f"sampling {n} × {smp['max_new_tokens']}", key, res, _f(x.get("peak_gb"), "{:.1f}"),
                             ratio])
        d = r.get("dpo")
        if d:
            for key, x in d.items():
                if not isinstance(x, dict) or "setting" not in x:
                    continue
                st = x["setting"]
                desc = (f"{key}: {st['per_device_train_batch_size']} × {st['gradient_accumulation_steps']}, "
                        f"checkpointing {'on' if st['gradient_checkpointing'] else 'off'}"
                        + (", LoRA inputs not cast to fp32" if st.get("no_lora_input_cast") else ""))
                res = x.get("error", "")[:80] or f"{x['pairs_per_s']} pairs/s ({x['seconds_per_step']} s/step of 16)"
                ratio = f"{x['pairs_per_s'] / d['naive']['pairs_per_s']:.1f}×" if key != "naive" and "pairs_per_s" in x and d["naive"].get("pairs_per_s") else ""
                rows.append([s, "DPO LoRA", desc, res, _f(x.get("peak_gb"), "{:.1f}"), ratio])
    gpus = sorted({r["gpu"] for r in results})
    table = pd.DataFrame(rows, columns=["shape", "what", "setting", "result", "peak GB", "ratio"])
    return table.to_markdown(index=False, disable_numparse=True) + f"\n\nGPU: {', '.join(gpus)}"


if __name__ == "__main__":
    print(render([json.loads(Path(p).read_text()) for p in sys.argv[1:]]))
