"""How exactly sampling's folded adapters (compose.FoldedAdapters) compute the adapted model, in bf16 on the GPU.

A random-weight model of a real shape with an EM adapter of the preset's structure (bench.sample._checkpoints), its
lora_B scaled to each --b-std in turn. On one batch of random prompts, the next-token logits of the last positions:

  peft     through PEFT's LoRA layers with the LoRA products in bf16 under autocast (how sampling ran in rounds 1-8)
  folded   the adapter folded into the bf16 weights (how sample_cell samples now)
  base     the adapter switched off (bf16): the size of the adapter's effect, for scale

each against an fp32 reference of the same weights (the bf16 weights cast up, the adapter applied in fp32).
Reported: relative logit error ||x - ref|| / ||ref||, mean KL(ref || x) of the next-token distributions, and the
error in the adapter's effect, ||(x - base_bf16) - (ref - ref_base)|| / ||ref - ref_base||.

    python3 -m bench.fold_accuracy --shape qwen2.5-7b --out bench/results/fold_accuracy.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from bench import common


def _logits(model, ids, last: int) -> torch.Tensor:
    return model(input_ids=ids).logits[:, -last:].float()


def _metrics(x, ref, x_base, ref_base) -> dict:
    kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - x.log_softmax(-1))).sum(-1).mean()
    effect, ref_effect = x - x_base, ref - ref_base
    return {"rel_logit_error": float((x - ref).norm() / ref.norm()), "mean_kl": float(kl),
            "effect_error": float((effect - ref_effect).norm() / ref_effect.norm()) if ref_effect.norm() > 0 else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(Path(__file__).with_name("config.yaml")))
    ap.add_argument("--shape", default="qwen2.5-7b")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--b-std", default="1e-3,1e-2", help="lora_B's standard deviation, one measurement each")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--last", type=int, default=32, help="positions whose logits are compared (from the end)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(a.config).read_text())
    shape = cfg["quick"]["shape"] if a.quick else dict(cfg["shapes"][a.shape])

    from persona_em import compose
    from persona_em.sampling.fast_generate import bf16_lora_compute
    from bench.sample import _checkpoints

    tok = common.tokenizer()
    model = common.build_model(shape, tok).to(torch.bfloat16)
    dirs, model = _checkpoints(model, 1, Path(tempfile.mkdtemp(prefix="bench_fold_")))
    model = compose.use_em_adapter(model, dirs[0], compose.EM, "none", "none")
    ref = copy.deepcopy(model).float()  # the same (bf16) weights in fp32, the adapter applied in fp32
    ids = torch.randint(0, shape["vocab_size"], (a.batch, a.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    out = {"shape": a.shape, "gpu": common.gpu_name(), "torch": torch.__version__, "batch": a.batch,
           "tokens": a.tokens, "positions_compared": a.last}
    folded = compose.FoldedAdapters()
    base_std = 1e-3  # what _checkpoints draws
    with torch.inference_mode():
        with model.disable_adapter():
            x_base = _logits(model, ids, a.last)
        with ref.disable_adapter():
            ref_base = _logits(ref, ids, a.last)
        for std in [float(s) for s in a.b_std.split(",")]:
            for m in (model, ref):
                for name, p in m.named_parameters():
                    if "lora_B" in name:
                        p.mul_(std / base_std)
            base_std = std
            want = _logits(ref, ids, a.last)
            with bf16_lora_compute(model, active=torch.cuda.is_available()):
                peft = _logits(model, ids, a.last)
            with folded.applied(model) as plain:
                fold = _logits(plain, ids, a.last)
            r = {"peft": _metrics(peft, want, x_base, ref_base), "folded": _metrics(fold, want, x_base, ref_base),
                 "base": _metrics(x_base, want, x_base, ref_base),
                 "adapter_effect_rel": float((want - ref_base).norm() / ref_base.norm())}
            out[f"b_std={std:g}"] = r
            print(f"b_std={std:g}: {json.dumps(r)}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
