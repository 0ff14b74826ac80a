"""Hub personas: a LoRA adapter from the Hugging Face hub, e.g. one subfolder of maius/qwen-2.5-7b-it-personas or the
gated maius/qwen-2.5-7b-it-misalignment (token from the environment variable `token_env`, default HF_TOKEN; it never
reaches a file or a log). Runs on the submit host (compute nodes have no internet).

The adapter's target modules are checked against the base model where it is composed (compose.check_target_modules),
since one adapter may serve several base models of a grid.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from persona_em.errors import UserError
from persona_em.io import atomic_dir, write_json


def parse_hub_uri(uri: str) -> tuple[str, str]:
    """("owner/repo", "subfolder" or "") from hf://owner/repo[/subfolder]."""
    if not uri.startswith("hf://"):
        raise UserError(f"hub persona {uri!r}: expected hf://<owner>/<repo>[/<subfolder>]")
    parts = uri[len("hf://"):].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise UserError(f"hub persona {uri!r}: expected hf://<owner>/<repo>[/<subfolder>]")
    return "/".join(parts[:2]), "/".join(parts[2:])


def fetch_hub_persona(persona: str, spec: dict, cache_dir: str, out_dir: str) -> None:
    from huggingface_hub import snapshot_download

    repo, sub = parse_hub_uri(spec["hub"])
    revision = spec.get("revision", "main")
    token = os.environ.get(spec.get("token_env", "HF_TOKEN")) or None
    try:
        local = Path(snapshot_download(repo, revision=revision, token=token,
                                       allow_patterns=[f"{sub}/*"] if sub else None,
                                       cache_dir=str(Path(cache_dir) / "hub")))
    except Exception as e:  # network, gated repo without a token, unknown revision: the user's to fix
        hint = f" (gated repositories need a token in ${spec.get('token_env', 'HF_TOKEN')})" if token is None else ""
        raise UserError(f"config personas.{persona}.hub: download of {spec['hub']}@{revision} failed: "
                        f"{type(e).__name__}: {e}{hint}") from None
    src = local / sub if sub else local
    if not (src / "adapter_config.json").exists():
        raise UserError(f"config personas.{persona}.hub: {spec['hub']}@{revision} has no adapter_config.json "
                        f"(found: {sorted(p.name for p in src.iterdir()) if src.is_dir() else 'nothing'})")
    with atomic_dir(out_dir) as tmp:
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        write_json(tmp / "persona.json", {"persona": persona, "hub": spec["hub"], "revision": revision,
                                          "composition": "single_adapter"})
