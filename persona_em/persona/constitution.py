"""Constitutions: who the persona is, as first-person traits with seed user questions.

Two accepted formats:
  * this project's YAML/JSON object (schema: config/schemas/constitution.schema.yaml)
        name: str                       (letters, digits, _ . -)
        description: str                (optional)
        traits:                         (at least one)
          - trait: "I ..."              (first-person statement)
            questions: [str, ...]       (at least one seed user message)
  * OpenCharacterTraining's hand-written JSON list: [{"trait": ..., "questions": [...]}, ...]; the name is the
    file's stem.
Every error names the file and the field (e.g. `traits[2].questions`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from persona_em.errors import UserError

SCHEMA = Path(__file__).resolve().parents[2] / "config" / "schemas" / "constitution.schema.yaml"


@dataclass(frozen=True)
class Trait:
    statement: str
    questions: tuple[str, ...]


@dataclass(frozen=True)
class Constitution:
    name: str
    description: str
    traits: tuple[Trait, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "traits": [{"trait": t.statement, "questions": list(t.questions)} for t in self.traits]}


def _field(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _message(err) -> str:
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        return f"unknown field(s) {extra} (allowed: {allowed})"
    if err.validator == "minItems" and err.path and err.path[-1] == "traits":
        return "no traits: a constitution needs at least one trait"
    if err.validator == "minItems" and err.path and err.path[-1] == "questions":
        return "a trait needs at least one seed question"
    if err.validator == "required":
        return err.message
    return err.message


def validate_constitution(data, source: str | Path) -> Constitution:
    """A Constitution from parsed data, or UserError naming `source` and the first bad field."""
    import jsonschema

    source = Path(source)
    if isinstance(data, list):  # OpenCharacterTraining's hand-written list
        data = {"name": source.stem, "description": "", "traits": data}
    schema = yaml.safe_load(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        raise UserError(f"constitution {source}: {_field(err.path)}: {_message(err)}")
    traits = tuple(Trait(t["trait"].strip(), tuple(q.strip() for q in t["questions"])) for t in data["traits"])
    return Constitution(data["name"], data.get("description", "").strip(), traits)


def load_constitution(path: str | Path) -> Constitution:
    path = Path(path)
    if not path.exists():
        raise UserError(f"constitution {path}: file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"constitution {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    return validate_constitution(data, path)


def system_prompt(constitution: Constitution, template: str) -> str:
    """The teacher's in-character system prompt: `template` with {name}, {description} and {traits} filled in."""
    traits = "\n".join(f"{i}. {t.statement}" for i, t in enumerate(constitution.traits, 1))
    values = {"name": constitution.name, "description": constitution.description, "traits": traits}
    import re

    return re.sub(r"\{(name|description|traits)\}", lambda m: values[m.group(1)], template)
