"""Weight trajectories of a cell's EM LoRA (rule weight_norms): update norms and rotation at every checkpoint.

A LoRA module's update is ΔW = s·B·A (B: d_out × r, A: r × d_in; s = α/r, or α/√r with rsLoRA, per module as PEFT
sets it: rank_pattern / alpha_pattern honoured; an embedding layer's lora_embedding_A / _B likewise). Every quantity here comes from r × r Gram products, never from a
d_out × d_in matrix:

    ⟨s₁B₁A₁, s₂B₂A₂⟩_F = s₁s₂ · trace((B₁ᵀB₂)(A₂A₁ᵀ)),      ||sBA||_F = √⟨sBA, sBA⟩_F

(GEMMs in float32 as the tensors are stored, traces in float64: inners). Tables, one row per (snapshot step, module) of the EM adapter, with the cell keys, `layer`
(the index in `...layers.<i>...`, -1 for a module outside the layer stack) and `module` (q_proj, ...):

weight_norms     em_norm (||s·B·A||_F of the EM update), persona_norm (the persona adapter's at that module; NaN for
                 the persona `none` or a module the persona does not adapt), em_persona_inner (⟨P, E⟩_F) and
                 em_persona_cosine, total_norm: the norm of the update the cell's model applies at that module
                 relative to the base model, ||P + E||_F = √(||P||² + ||E||² + 2⟨P, E⟩) when the persona is in the
                 model (stacked: on at every forward pass; merged: in the weights), ||E||_F otherwise (none,
                 persona_off); em_rank, em_scale, persona_rank, persona_scale, source (checkpoint | trace).
weight_rotation  for each snapshot: prev_step, inner_prev = ⟨E_prev, E_t⟩, norm_prev, local_cosine and local_angle_deg
                 between consecutive updates (NaN where one is zero, e.g. next to step 0); inner_final, norm_final,
                 final_cosine to the last snapshot's update; for a rank-1 module also b_local_angle_deg and
                 b_final_cosine on the B vector alone (the Model Organisms for EM phase-transition signal: a sudden
                 rotation of B). Inner products and norms are kept so that any group of modules (a layer group, the
                 whole adapter) has its cosine Σinner / √(Σnorm² Σnorm²) (group_cosine).

Snapshots: the cell's scheduled checkpoints (em/{cell}/checkpoints/step-NNNNNN/) and, when the cell was trained with
`checkpoints.trace_every`, the tensor-only snapshots in its trace/ folder (a scheduled checkpoint wins a shared step).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from persona_em.errors import UserError
from persona_em.training.trace import TRACE_DIR  # trace/step-NNNNNN.safetensors: EM adapter tensors only

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
KEYS = ["model", "persona", "composition", "dataset", "seed", "step", "layer", "module"]
NORM_COLUMNS = KEYS + ["em_norm", "persona_norm", "em_persona_inner", "em_persona_cosine", "total_norm", "em_rank",
                       "em_scale", "persona_rank", "persona_scale", "source"]
ROTATION_COLUMNS = KEYS + ["prev_step", "norm", "inner_prev", "norm_prev", "local_cosine", "local_angle_deg",
                           "inner_final", "norm_final", "final_cosine", "b_local_angle_deg", "b_final_cosine"]
PERSONA_IN_MODEL = {"stacked", "merged"}  # compositions whose model applies the persona (persona_em/compose.py)
_LAYER = re.compile(r"\.layers\.(\d+)\.")
# A LoRA factor's key as PEFT saves it: <module>.lora_A.weight for a linear layer, <module>.lora_embedding_A for an
# embedding layer (A: r × vocab, B: d × r; PEFT's ΔW is (s·B·A)ᵀ, which has the same norms and inner products), either
# optionally with the adapter's name before the suffix (an unstripped state dict).
_FACTOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.*)\."
                     r"(?:lora_(?P<linear>[AB])(?:\.[^.]+)?\.weight|lora_embedding_(?P<embedding>[AB])(?:\.[^.]+)?)$")
# PEFT saves an adapted embedding's frozen base weight beside its factors (save_embedding_layers): not an update.
_BASE_COPY = re.compile(r"\.base_layer\.weight$")
# adapter_config.json settings that train something besides s·B·A, which this analysis would leave out.
_NOT_PLAIN_LORA = {"use_dora": lambda v: bool(v), "lora_bias": lambda v: bool(v),
                   "bias": lambda v: v not in (None, "none"), "modules_to_save": lambda v: bool(v),
                   "trainable_token_indices": lambda v: bool(v)}


@dataclass
class Lora:
    """One adapted module: A (r × d_in), B (d_out × r) as stored, and its scale s."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the module path's end."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def lora_scale(config: dict, module: str, rank: int) -> float:
    """s of one module from an adapter_config.json: α/r, or α/√r with use_rslora (PEFT LoraLayer.update_layer)."""
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a LoRA adapter directory)")
    config = json.loads(path.read_text())
    extra = {k: config[k] for k, trains in _NOT_PLAIN_LORA.items() if trains(config.get(k))}
    if str(config.get("peft_type", "LORA")).upper() != "LORA" or extra:
        raise UserError(f"{path}: only plain LoRA adapters (updates s·B·A alone) are analysed; this one has peft_type "
                        f"{config.get('peft_type')!r}" + "".join(f", {k} {v!r}" for k, v in extra.items()))
    return config


def read_lora(weights: str | Path, config: dict) -> dict[str, Lora]:
    """module path (e.g. model.layers.3.mlp.down_proj) -> Lora, from a safetensors file of LoRA tensors."""
    from safetensors.torch import load_file

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights)).items():
        m = _FACTOR.match(key)
        if m is None:
            if _BASE_COPY.search(key):
                continue
            raise UserError(f"{weights}: tensor {key} is not a LoRA factor (lora_A / lora_B / lora_embedding_A / "
                            f"lora_embedding_B); only updates s·B·A are analysed, and leaving this one out would "
                            f"understate the adapter's update")
        pairs.setdefault(m["module"], {})[m["linear"] or m["embedding"]] = tensor
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"{weights}: module {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        out[module] = Lora(ab["A"], ab["B"], lora_scale(config, module, int(ab["A"].shape[0])))
    if not out:
        raise UserError(f"{weights}: no LoRA tensors (lora_A / lora_B) in the file")
    return out


def read_adapter(adapter_dir: str | Path) -> dict[str, Lora]:
    return read_lora(Path(adapter_dir) / ADAPTER_WEIGHTS, read_adapter_config(adapter_dir))


def inners(x: Lora, others: list[Lora]) -> list[float]:
    """⟨s_x B_x A_x, s_y B_y A_y⟩_F for every y in `others` through r × r products, s_x s_y trace((B_xᵀ B_y)(A_y A_xᵀ)):
    GEMMs in float32, as the tensors are stored (relative error ~1e-6; tests/test_weights.py compares with float64),
    the trace summed in float64."""
    xa, xb = x.A.float(), x.B.float()
    out = []
    for y in others:
        bb = (xb.T @ y.B.float()).double()  # r_x × r_y
        aa = (y.A.float() @ xa.T).double()  # r_y × r_x
        out.append(x.scale * y.scale * float((bb * aa.T).sum()))  # trace(bb @ aa) without the product
    return out


def inner(x: Lora, y: Lora) -> float:
    return inners(x, [y])[0]


def norm(x: Lora) -> float:
    return math.sqrt(max(inner(x, x), 0.0))


def _cosine(dot: float, n1: float, n2: float) -> float:
    return dot / (n1 * n2) if n1 > 0 and n2 > 0 else math.nan


def _angle(cos: float) -> float:
    return math.degrees(math.acos(min(1.0, max(-1.0, cos)))) if not math.isnan(cos) else math.nan


def layer_of(module: str) -> int:
    m = _LAYER.search("." + module + ".")
    return int(m.group(1)) if m else -1


def snapshots(checkpoints_dir: str | Path) -> list[tuple[int, str, Path, dict]]:
    """(step, source, weights file, adapter config) of every snapshot of a trained cell, in step order."""
    from persona_em.training.em import read_checkpoints, step_dir_name

    checkpoints_dir = Path(checkpoints_dir)
    _, steps = read_checkpoints(checkpoints_dir)
    config = read_adapter_config(steps[0][1])
    found = {step: ("checkpoint", d / ADAPTER_WEIGHTS, read_adapter_config(d)) for step, d in steps}
    trace = checkpoints_dir / TRACE_DIR
    if trace.is_dir():
        for f in sorted(trace.glob("step-*.safetensors")):
            step = int(f.stem.split("-")[1])
            if f.name != step_dir_name(step) + ".safetensors":
                raise UserError(f"{f}: a trace snapshot is named step-NNNNNN.safetensors")
            found.setdefault(step, ("trace", f, config))
    return [(step, *found[step]) for step in sorted(found)]


def weight_tables(checkpoints_dir: str | Path, cell_keys: dict, persona_dir: str | Path | None
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(weight_norms, weight_rotation) of one cell (module docstring). At most three snapshots are in memory."""
    snaps = snapshots(checkpoints_dir)
    persona = read_adapter(persona_dir) if persona_dir else {}
    persona_on = cell_keys["composition"] in PERSONA_IN_MODEL and bool(persona)
    final_step, _, final_file, final_cfg = snaps[-1]
    final = read_lora(final_file, final_cfg)
    final_norm = {m: norm(x) for m, x in final.items()}
    persona_norm = {m: norm(p) for m, p in persona.items()}
    norms, rotation, prev, prev_step, prev_norm = [], [], None, None, {}
    for step, source, weights, cfg in snaps:
        em = final if step == final_step else read_lora(weights, cfg)
        if set(em) != set(final):
            raise UserError(f"{weights}: adapts modules {sorted(set(em) ^ set(final))[:3]} unlike the final "
                            f"snapshot (one cell, one set of EM modules)")
        now_norm = {}
        for module in sorted(em):
            x = em[module]
            keys = {**cell_keys, "step": step, "layer": layer_of(module), "module": module.rsplit(".", 1)[-1]}
            p, f = persona.get(module), final[module]
            q = prev[module] if prev is not None else None
            others = {"x": x, "f": f, "q": q, "p": p}  # itself, final, previous, persona (those that exist)
            others = {k: y for k, y in others.items() if y is not None}
            dots = dict(zip(others, inners(x, list(others.values()))))
            e = now_norm[module] = math.sqrt(max(dots["x"], 0.0))
            pn = persona_norm.get(module, math.nan)
            pe = dots.get("p", math.nan)
            total = math.sqrt(max(pn ** 2 + e ** 2 + 2 * pe, 0.0)) if persona_on and p is not None else e
            norms.append({**keys, "em_norm": e, "persona_norm": pn, "em_persona_inner": pe,
                          "em_persona_cosine": _cosine(pe, e, pn) if p is not None else math.nan,
                          "total_norm": total, "em_rank": x.rank, "em_scale": x.scale,
                          "persona_rank": p.rank if p is not None else math.nan,
                          "persona_scale": p.scale if p is not None else math.nan, "source": source})
            row = {**keys, "prev_step": prev_step if prev is not None else math.nan, "norm": e,
                   "inner_final": dots["f"], "norm_final": final_norm[module]}
            row["final_cosine"] = _cosine(row["inner_final"], e, row["norm_final"])
            if q is not None:
                row["inner_prev"], row["norm_prev"] = dots["q"], prev_norm[module]
                row["local_cosine"] = _cosine(row["inner_prev"], row["norm_prev"], e)
                row["local_angle_deg"] = _angle(row["local_cosine"])
            if x.rank == 1:
                b, bf = x.B[:, 0].double(), f.B[:, 0].double()
                row["b_final_cosine"] = _cosine(float(b @ bf), float(b.norm()), float(bf.norm()))
                if prev is not None:
                    bp = prev[module].B[:, 0].double()
                    row["b_local_angle_deg"] = _angle(_cosine(float(bp @ b), float(bp.norm()), float(b.norm())))
            rotation.append(row)
        prev, prev_step, prev_norm = em, step, now_norm
    return (pd.DataFrame(norms, columns=NORM_COLUMNS),
            pd.DataFrame(rotation, columns=ROTATION_COLUMNS).astype({"prev_step": "Int64"}))


def group_cosine(rows: pd.DataFrame, inner_col: str, norm_a: str, norm_b: str) -> float:
    """The cosine between the concatenated updates of a group of modules (rows of weight_rotation)."""
    rows = rows.dropna(subset=[inner_col, norm_a, norm_b])
    denom = math.sqrt(float((rows[norm_a] ** 2).sum()) * float((rows[norm_b] ** 2).sum()))
    return float(rows[inner_col].sum()) / denom if denom > 0 else math.nan


def write_weight_tables(checkpoints_dir: str, cell_keys: dict, persona_dir: str | None, repo: str, config: dict,
                        outputs: dict) -> None:
    """Rule weight_norms: both tables of one cell and their provenance sidecars (`outputs`: weight_norms,
    weight_rotation, weight_norms_provenance, weight_rotation_provenance)."""
    from persona_em.io import sha256_file, write_table
    from persona_em.provenance import collect, write_sidecar

    norms, rotation = weight_tables(checkpoints_dir, cell_keys, persona_dir)
    shared = collect(repo, config, None, [norms])
    inputs = [str(w) for _, _, w, _ in snapshots(checkpoints_dir)]
    if persona_dir:
        inputs.append(str(Path(persona_dir) / ADAPTER_WEIGHTS))
    digests = {"inputs": {i: sha256_file(i) for i in inputs}}  # once for both sidecars (GBs for a 7B cell)
    for name, frame in (("weight_norms", norms), ("weight_rotation", rotation)):
        write_table(outputs[name], frame)
    for name in ("weight_norms", "weight_rotation"):
        write_sidecar(outputs[f"{name}_provenance"], name, [outputs[name]], [], shared, digests)


def local_angle_peak(rotation: pd.DataFrame, column: str = "local_angle_deg") -> int:
    """The step with the largest local angle (the phase transition's step on a rank-1 trace)."""
    return int(rotation.loc[rotation[column].idxmax(), "step"])


__all__ = ["Lora", "inner", "inners", "norm", "lora_scale", "read_lora", "read_adapter", "weight_tables", "group_cosine",
           "write_weight_tables", "snapshots", "local_angle_peak"]
