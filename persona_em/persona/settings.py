"""Resolved persona-arm settings from the (schema-validated) config, with checks that need more than a schema."""
from __future__ import annotations

from persona_em.errors import UserError


def generator_settings(config: dict, stage: str) -> dict:
    """The generator of `stage` (expand | teacher) with its name. expand uses the teacher's unless it names one."""
    pt = config.get("persona_training", {})
    key = stage if (pt.get(stage) or {}).get("generator") else "teacher"
    name = (pt.get(key) or {}).get("generator")
    if not name:
        raise UserError("config persona_training.teacher.generator: needed to train personas from a constitution")
    gens = pt.get("generators") or {}
    if name not in gens:
        raise UserError(f"config persona_training.{key}.generator: unknown generator {name!r} "
                        f"(defined under persona_training.generators: {sorted(gens) or 'none'})")
    return {**gens[name], "name": name}


def check_persona_config(config: dict) -> None:
    """Fail at parse time, naming the key, for persona settings a schema cannot check."""
    personas = config.get("personas") or {}
    if not any("constitution" in p for p in personas.values()):
        return
    for stage in ("expand", "teacher"):
        gen = generator_settings(config, stage)
        if gen["backend"] == "hf" and gen["model"] not in config["models"]:
            raise UserError(f"config persona_training.generators.{gen['name']}.model: an hf generator names a model "
                            f"under 'models:' (defined: {sorted(config['models'])})")
    from persona_em.training.settings import DPOSettings, SFTSettings, resolve_settings

    for key, cls in (("dpo", DPOSettings), ("sft", SFTSettings)):
        resolve_settings(cls, config["persona_training"].get(key, {}), where=f"config persona_training.{key}")
