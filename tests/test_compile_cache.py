"""The persisted compile caches (persona_em/sampling/compile_cache.py), on CPU: a second process (another 'node': its own
empty PyTorch caches) compiles nothing that the first one saved; two processes saving at once, with readers
listing the folder meanwhile, leave only whole blobs; the key changes with what makes compiled code unusable."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# One process: fresh node-local PyTorch caches, load the shared folder, compile a small function, save, report.
WORKER = textwrap.dedent("""
    import json, sys, time
    import torch
    from torch._dynamo.utils import counters
    from persona_em.sampling.compile_cache import CompileCache

    root, out, scale = sys.argv[1], sys.argv[2], float(sys.argv[3])
    cache = CompileCache(root, "testkey")
    loaded = cache.load()

    @torch.compile(dynamic=False)
    def f(x):
        return torch.nn.functional.silu(x * scale).sum(-1) + x.mean()

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    y = f(x)
    saved = cache.save()
    print(json.dumps({"loaded": loaded, "saved": str(saved) if saved else None,
                      "hit": counters["inductor"].get("fxgraph_cache_hit", 0),
                      "miss": counters["inductor"].get("fxgraph_cache_miss", 0),
                      "value": y.tolist()}), file=open(out, "w"))
""")


def _env(tmp: Path, name: str) -> dict:
    # Each process gets its own empty inductor/Triton caches: only the shared folder can carry results over.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "TORCHINDUCTOR_CACHE_DIR": str(tmp / f"inductor-{name}"), "TRITON_CACHE_DIR": str(tmp / f"triton-{name}")}


def _start(tmp: Path, root: Path, name: str, scale: float = 2.0) -> subprocess.Popen:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), str(root), str(tmp / f"{name}.json"), str(scale)],
                            env=_env(tmp, name), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _result(tmp: Path, proc: subprocess.Popen, name: str) -> dict:
    import json

    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return json.loads((tmp / f"{name}.json").read_text())


def test_second_process_reuses_the_first_ones_compilation(tmp_path):
    root = tmp_path / "shared"
    cold = _result(tmp_path, _start(tmp_path, root, "cold"), "cold")
    assert cold["loaded"] == 0 and cold["miss"] >= 1 and cold["saved"]
    warm = _result(tmp_path, _start(tmp_path, root, "warm"), "warm")
    assert warm["loaded"] == 1
    assert warm["miss"] == 0 and warm["hit"] >= 1  # compiled nothing itself
    assert warm["saved"] is None  # nothing new: no second blob
    assert warm["value"] == pytest.approx(cold["value"])
    assert len(list((root / "testkey").glob("*.bin"))) == 1


def test_concurrent_writers_leave_only_whole_blobs(tmp_path):
    """Two jobs compiling different graphs save into one key at the same moment, a third compiles the first's
    graph; meanwhile a reader loads every blob it can list. Every listed blob loads; none is torn or temporary."""
    root = tmp_path / "shared"
    procs = {"a": _start(tmp_path, root, "a", 2.0), "b": _start(tmp_path, root, "b", 3.0),
             "c": _start(tmp_path, root, "c", 2.0)}
    seen = set()
    from persona_em.sampling.compile_cache import CompileCache

    reader = CompileCache(root, "testkey")
    while any(p.poll() is None for p in procs.values()):
        for path in reader.blobs():
            if path not in seen:
                assert torch.compiler.load_cache_artifacts(path.read_bytes()) is not None, path
                seen.add(path)
    results = {n: _result(tmp_path, p, n) for n, p in procs.items()}
    blobs = reader.blobs()
    assert {Path(r["saved"]) for r in results.values() if r["saved"]} <= set(blobs)
    assert 2 <= len(blobs) <= 3  # a and c compiled the same graph: one blob name if their bytes agree
    assert not [p for p in (root / "testkey").iterdir() if p.suffix != ".bin"]  # no temporary file left
    for path in blobs:
        assert torch.compiler.load_cache_artifacts(path.read_bytes()) is not None
    # A later job finds both graphs.
    late = _result(tmp_path, _start(tmp_path, root, "late", 3.0), "late")
    assert late["miss"] == 0 and late["loaded"] == len(blobs)


def test_a_bad_blob_costs_a_compilation_not_the_job(tmp_path):
    root = tmp_path / "shared"
    (root / "testkey").mkdir(parents=True)
    (root / "testkey" / "0000.bin").write_bytes(b"not a cache blob")
    res = _result(tmp_path, _start(tmp_path, root, "bad"), "bad")
    assert res["loaded"] == 0 and res["miss"] >= 1


def test_key_changes_with_model_and_adapters(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from persona_em.sampling.compile_cache import compile_key, compile_key_identity
    from persona_em.models import load_model

    base, _ = load_model(tiny_model_dir, device="cpu")
    k_base = compile_key(base)
    ident = compile_key_identity(base)
    assert ident["torch"] == torch.__version__ and ident["gpu"] == "cpu"
    assert "_name_or_path" not in ident["config"]  # where a model lies does not matter, its shape does
    base.config.num_attention_heads_extra = 1  # any config change moves the key
    assert compile_key(base) != k_base
    del base.config.num_attention_heads_extra
    assert compile_key(base) == k_base
    import torch._inductor.config as inductor_config

    with inductor_config.patch(deterministic=not inductor_config.deterministic):  # other kernels: another key
        assert compile_key(base) != k_base
    assert compile_key(base) == k_base
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="em")
    k4 = compile_key(peft)
    assert k4 != k_base
    base2, _ = load_model(tiny_model_dir, device="cpu")
    peft8 = get_peft_model(base2, LoraConfig(r=8, target_modules=["q_proj"]), adapter_name="em")
    assert compile_key(peft8) != k4
    # Sampling compiles the plain base (adapters folded into its weights): one key for every adapter and persona.
    from persona_em import compose

    for model in (peft, peft8):
        with compose.FoldedAdapters().applied(model) as plain:
            assert compile_key(plain) == k_base
    base3, _ = load_model(tiny_model_dir, device="cpu")
    base3.config.persona_em_merged_persona = "p"  # a persona merged into the weights: the same compiled code
    assert compile_key(base3) == k_base


KEY_SCRIPT = textwrap.dedent("""
    import sys
    from peft import LoraConfig, get_peft_model
    from persona_em.sampling.compile_cache import compile_key
    from persona_em.models import load_model
    base, _ = load_model(sys.argv[1], device="cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    print(compile_key(get_peft_model(base, LoraConfig(r=4, target_modules=targets), adapter_name="em")))
""")


def test_key_is_the_same_in_every_process(tiny_model_dir, tmp_path):
    """PEFT keeps target_modules as a set, whose order follows the string-hash seed of the process: two jobs of the
    same model must still find one key (seen on the GPU: two processes wrote under two keys)."""
    script = tmp_path / "key.py"
    script.write_text(KEY_SCRIPT)
    keys = {subprocess.run([sys.executable, str(script), str(tiny_model_dir)], check=True, capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed}
                           ).stdout.strip() for seed in ("1", "2", "3")}
    assert len(keys) == 1, keys


def test_triton_entries_copied_with_paths_rewritten_and_grp_last(tmp_path):
    """The decode kernel's Triton cache entry travels with the blob; Triton's group file holds absolute paths,
    which must point into the destination (else Triton misses and recompiles)."""
    import json

    from persona_em.sampling.compile_cache import _copy_triton_entries

    src = tmp_path / "src" / "HASH"
    src.mkdir(parents=True)
    (src / "_decode_kernel.cubin").write_bytes(b"bin")
    (src / "_decode_kernel.json").write_text("{}")
    (src / "__grp___decode_kernel.json").write_text(json.dumps(
        {"child_paths": {c: str(src / c) for c in ("_decode_kernel.cubin", "_decode_kernel.json")}}))
    (tmp_path / "src" / "OTHER").mkdir()
    (tmp_path / "src" / "OTHER" / "__grp__triton_poi_x.json").write_text("{}")
    dst = tmp_path / "dst"
    assert _copy_triton_entries(tmp_path / "src", dst) == 1
    assert _copy_triton_entries(tmp_path / "src", dst) == 0  # already there
    assert not (dst / "OTHER").exists()  # inductor's kernels are in PyTorch's blob already
    grp = json.loads((dst / "HASH" / "__grp___decode_kernel.json").read_text())["child_paths"]
    assert grp == {c: str(dst / "HASH" / c) for c in ("_decode_kernel.cubin", "_decode_kernel.json")}
    assert (dst / "HASH" / "_decode_kernel.cubin").read_bytes() == b"bin"
