"""Partial reruns on CPU with the tiny model: stages killed mid-way and rerun end exactly where an uninterrupted
run ends. Each stage runs in its own process through its public function (tests/partial_worker.py)."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("partial_worker.py")
pytestmark = pytest.mark.slow

CELL = {"model": "tiny", "persona": "none", "composition": "none", "dataset": "insecure_demo", "seed": 0}


ITEM_SECONDS = 0.05  # sampling/judging items stretched to this, so kills land at chosen points


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PARTIAL_WORKER_ITEM_SECONDS": str(ITEM_SECONDS)}


def start(stage: str, args: dict, root: Path, tag: str, **env) -> tuple[subprocess.Popen, Path]:
    args_path, log = root / f"{stage}-{tag}.json", root / f"{stage}-{tag}.log"
    args_path.write_text(json.dumps(args))
    proc = subprocess.Popen([sys.executable, str(WORKER), stage, str(args_path), str(log)], env={**_env(), **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, log


def finish(stage, args, root, tag) -> str:
    proc, log = start(stage, args, root, tag)
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:  # pytest.fail, unlike an assert message, is not cut short
        pytest.fail(f"{stage} {tag}: exit {proc.returncode}\n--- stderr ---\n{err[-4000:]}\n--- log ---\n"
                    f"{log.read_text()[-4000:]}")
    return log.read_text()


def kill_when(proc: subprocess.Popen, ready, sig: int, timeout: float = 300) -> bool:
    """Send `sig` as soon as `ready()` holds; False if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(sig)
            proc.wait(timeout=60)
            return True
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("kill point never reached")


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from persona_em.demo import build_tiny_model, write_demo_dataset
    from persona_em.training.settings import resolve_train_config

    root = tmp_path_factory.mktemp("partial")
    build_tiny_model(root / "model")
    write_demo_dataset("insecure", root / "train.jsonl", n_rows=48, seed=0)  # 48 rows / batch 8 = 6 steps
    settings = resolve_train_config({"preset": "betley", "learning_rate": 1e-3, "effective_batch_size": 8,
                                     "per_device_batch_size": 4, "max_length": 256, "resume_every_steps": 2},
                                    where="test").to_dict()
    return root, settings


def train_args(root: Path, settings: dict, name: str, **over) -> dict:
    return {"cell": CELL, "model_dir": str(root / "model"), "train": str(root / "train.jsonl"),
            "settings": {**settings, **over}, "schedule": {"steps": [0, 2, "final"]},
            "work": str(root / name / "work"), "out": str(root / name / "checkpoints"),
            "log_table": str(root / name / "train_log.tsv")}


def final_adapter(out: Path):
    from safetensors.torch import load_file

    manifest = json.loads((out / "checkpoints.json").read_text())
    last = max(manifest["steps"])
    return manifest["last_step"], load_file(str(out / f"step-{last:06d}" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(setup):
    root, settings = setup
    args = train_args(root, settings, "ref")
    finish("train", args, root, "ref")
    return args


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_training_killed_and_rerun_equals_uninterrupted(setup, reference, sig):
    root, settings = setup
    name = f"killed-{sig.name}"
    # Slowed (1 s per step) so the kill lands between the step-2 checkpoint and the end (step 6).
    args = train_args(root, settings, name, slow_down_seconds=1.0)
    proc, _ = start("train", args, root, f"{name}-1")
    ckpt = Path(args["work"]) / "trainer/checkpoint-2/trainer_state.json"
    assert kill_when(proc, ckpt.exists, sig), "training ended before the kill"
    assert proc.returncode != 0
    assert not Path(args["out"]).exists(), "a killed run must leave no declared output"
    if sig == signal.SIGKILL:  # as if the kill landed after the step-2 checkpoint but before its export
        shutil.rmtree(Path(args["work"]) / "adapters" / "step-000002", ignore_errors=True)

    log = finish("train", {**args, "settings": {**args["settings"], "slow_down_seconds": 0.0}}, root, f"{name}-2")
    resumed = [int(l.split("resumed from step ")[1].split()[0]) for l in log.splitlines() if "resumed from step" in l]
    assert resumed and 2 <= resumed[0] < 6, log[-2000:]
    if sig == signal.SIGTERM:  # SIGTERM is caught: a checkpoint at the end of the step in flight, then exit 143
        assert proc.returncode == 128 + 15 and resumed[0] > 2, (proc.returncode, resumed)

    ref_steps, ref = final_adapter(Path(reference["out"]))
    steps, got = final_adapter(Path(args["out"]))
    ref2, got2 = (load_file(str(Path(a["out"]) / "step-000002" / "adapter_model.safetensors")) for a in (reference, args))
    assert max(float((ref2[k] - got2[k]).abs().max()) for k in ref2) <= 1e-6
    assert steps == ref_steps == 6
    state = json.loads(max((Path(args["work"]) / "trainer").glob("checkpoint-*/trainer_state.json"),
                           key=lambda p: int(p.parent.name.split("-")[1])).read_text())
    assert state["global_step"] == 6
    assert ref.keys() == got.keys()
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) <= 1e-6
    logged = [l for l in Path(args["log_table"]).read_text().splitlines()[1:]]
    assert len(logged) == 6, "one training-log row per optimizer step, none twice"


PERSONA_TRAINING = {  # 6 optimizer steps each, periodic checkpoints every 2
    "dpo": {"lora_r": 4, "lora_alpha": 8, "effective_batch_size": 2, "per_device_batch_size": 2,
            "learning_rate": 1e-3, "resume_every_steps": 2, "epochs": 2, "max_length": 64},  # 6 pairs
    "sft": {"lora_r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "learning_rate": 1e-2, "epochs": 3,
            "effective_batch_size": 2, "per_device_batch_size": 2, "max_length": 64, "resume_every_steps": 2,
            "seed": 0},  # 4 conversations
}


@pytest.fixture(scope="module")
def persona_inputs(setup):
    """DPO pairs; and for SFT a DPO persona adapter and introspection conversations."""
    from persona_em.io import write_jsonl
    from persona_helpers import random_persona

    root, _ = setup
    write_jsonl(root / "pairs.jsonl", [
        {"prompt": [{"role": "user", "content": f"question {i}?"}],
         "chosen": [{"role": "assistant", "content": "I am kind and candid."}],
         "rejected": [{"role": "assistant", "content": "no."}]} for i in range(6)])
    dpo = random_persona(root / "model", root / "dpo_persona", targets=("q_proj", "v_proj"))
    (dpo / "persona.json").write_text(json.dumps({"stage": "dpo"}))
    write_jsonl(root / "introspection.jsonl", [
        {"kind": "reflection", "messages": [{"role": "user", "content": f"Who are you, {i}?"},
                                            {"role": "assistant", "content": "A careful and honest helper."}]}
        for i in range(4)])
    return {"pairs": str(root / "pairs.jsonl"), "dpo": str(dpo), "data": str(root / "introspection.jsonl")}


def persona_args(root: Path, inputs: dict, stage: str, name: str) -> dict:
    return {"model_dir": str(root / "model"), **inputs, "settings": PERSONA_TRAINING[stage],
            "work": str(root / name / "work"), "out": str(root / name / "adapter")}


@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_sigterm_during_persona_training_saves_the_step_in_flight(setup, persona_inputs, stage):
    """As for EM training: SIGTERM (SLURM at the time limit) checkpoints the optimizer step in flight and exits 143;
    the retry resumes from that step and ends where an uninterrupted run ends."""
    from safetensors.torch import load_file

    root, _ = setup
    ref = persona_args(root, persona_inputs, stage, f"{stage}-ref")
    finish(stage, ref, root, f"{stage}-ref")
    args = persona_args(root, persona_inputs, stage, f"{stage}-term")
    proc, _ = start(stage, args, root, f"{stage}-term-1", PARTIAL_WORKER_STEP_SECONDS="1")
    trainer = Path(args["work"]) / "trainer"
    assert kill_when(proc, (trainer / "checkpoint-2" / "trainer_state.json").exists, signal.SIGTERM), \
        "training ended before the SIGTERM"
    assert proc.returncode == 128 + 15
    assert not Path(args["out"]).exists(), "a stopped run must leave no declared output"
    saved = max(int(p.parent.name.split("-")[1]) for p in trainer.glob("checkpoint-*/trainer_state.json"))
    assert saved % 2 == 1, f"checkpoint-{saved} is a periodic one, not the step in flight"
    log = finish(stage, args, root, f"{stage}-term-2")
    assert f"resumed from {trainer / f'checkpoint-{saved}'}" in log, log[-2000:]
    a, b = (load_file(str(Path(x["out"]) / "adapter_model.safetensors")) for x in (ref, args))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_training_killed_mid_save_leaves_no_temporary_after_the_rerun(setup, reference):
    """SIGKILL while the trainer writes checkpoint-4's adapter: the rerun resumes from checkpoint-2, ends where an
    uninterrupted run ends, and no temporary (`*.tmp*`) is left anywhere under the run's folders."""
    root, settings = setup
    name = "killed-mid-save"
    args = train_args(root, settings, name)
    proc, _ = start("train", args, root, f"{name}-1", PARTIAL_WORKER_SAVE_SECONDS="1.5")
    work = Path(args["work"])
    assert kill_when(proc, lambda: any(work.glob("trainer/checkpoint-4/.em.*.tmp")), signal.SIGKILL), \
        "training ended before the kill"
    assert list((root / name).rglob("*.tmp*")), "the kill should have left the adapter's temporary"
    log = finish("train", args, root, f"{name}-2")
    assert "resumed from step 2" in log and "removed incomplete checkpoint" in log, log[-2000:]
    assert not list((root / name).rglob("*.tmp*"))
    (ref_steps, ref), (steps, got) = final_adapter(Path(reference["out"])), final_adapter(Path(args["out"]))
    assert steps == ref_steps and max(float((ref[k] - got[k]).abs().max()) for k in ref) <= 1e-6


def _same(a, b, rel: float) -> bool:
    """Equal, numbers within `rel` (relative) when rel > 0; everything else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, rel) for x, y in zip(a, b))
    if rel and isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return a == pytest.approx(b, rel=rel, abs=1e-12)
    return a == b


def check_jsonl(path: Path, key: str, expected: list[dict], rel: float = 0.0) -> None:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    rows = [json.loads(l) for l in raw.decode().splitlines()]  # a torn line would not parse
    keys = [r[key] for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    assert keys == [r[key] for r in expected], "missing or reordered rows"
    bad = [r[key] for r, e in zip(rows, expected) if not _same(r, e, rel)]
    assert not bad, f"{len(bad)} rows differ, e.g. {bad[:3]}"


def kill_repeatedly(stage, args, root, journal: Path, total: int, seed: int) -> list[int]:
    """SIGKILL the stage at several random points (one during start-up, the others after a random number of
    journal lines), then let it finish. Returns the journal sizes seen at the kills."""
    rng = random.Random(seed)
    points = sorted(rng.sample(range(1, total - 3), 3))
    seen = []
    proc, _ = start(stage, args, root, "startup")
    time.sleep(rng.uniform(0.5, 3.0))
    proc.kill()
    proc.wait()
    for i, n in enumerate(points):
        proc, _ = start(stage, args, root, f"kill{i}")
        extra = rng.uniform(0, ITEM_SECONDS)  # anywhere within the next item, its write included
        assert kill_when(proc, lambda: lines(journal) >= n and not time.sleep(extra), signal.SIGKILL), \
            f"{stage} ended before line {n}"
        seen.append(lines(journal))
    log = finish(stage, args, root, "final")
    assert "resumed" in log
    return seen


@pytest.fixture(scope="module")
def samples_ref(setup, reference):
    root, _ = setup
    args = {"cell": CELL, "model_dir": str(root / "model"), "checkpoints": reference["out"],
            "questions": str(REPO / "config/demo/questions.yaml"),
            "settings": {"n_samples": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 16, "seed": 0,
                         "batch_size": 1},
            "journal": str(root / "sref/journal.jsonl"), "out": str(root / "sref/samples.jsonl")}
    finish("sample", args, root, "sref")
    return args


def test_sampling_killed_at_random_points(setup, samples_ref):
    root, _ = setup
    expected = [json.loads(l) for l in Path(samples_ref["out"]).read_text().splitlines()]
    args = {**samples_ref, "journal": str(root / "skill/journal.jsonl"), "out": str(root / "skill/samples.jsonl")}
    seen = kill_repeatedly("sample", args, root, Path(args["journal"]), len(expected), seed=11)
    assert seen == sorted(seen) and seen[-1] < len(expected)
    check_jsonl(Path(args["out"]), "response_id", expected)
    assert not Path(args["journal"]).exists()


def test_judging_killed_at_random_points(setup, samples_ref):
    root, _ = setup
    from conftest import demo_config, judge_key_of

    demo = demo_config(root)
    key = judge_key_of(demo, "tiny_judge")  # the demo's judge, as the judge rule runs it
    base = {"samples": samples_ref["out"], "questions": samples_ref["questions"], "name": "tiny_judge",
            "judge": demo["judges"]["tiny_judge"], "judge_key": key, "model_dir": str(root / "model")}
    ref = {**base, "journal": str(root / "jref/journal.jsonl"), "out": str(root / "jref/judged.jsonl")}
    finish("judge", ref, root, "jref")
    expected = [json.loads(l) for l in Path(ref["out"]).read_text().splitlines()]
    assert {r["judge_key"] for r in expected} == {key}
    args = {**base, "journal": str(root / "jkill/journal.jsonl"), "out": str(root / "jkill/judged.jsonl")}
    kill_repeatedly("judge", args, root, Path(args["journal"]), len(expected), seed=12)
    # The local judge scores many prompts per forward pass; after a resume a batch holds other prompts, and its
    # padding changes the float rounding of the same judgment (~1e-6 relative): equal up to that, the rest exactly.
    check_jsonl(Path(args["out"]), "key", expected, rel=1e-4)


def test_a_torn_checkpoint_is_skipped_on_resume(tmp_path):
    """SIGKILL while transformers writes trainer_state.json (the last file of a checkpoint) leaves it cut off."""
    from persona_em.io import latest_trainer_checkpoint

    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st'), (6, None), (10, "")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert latest_trainer_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    # the incomplete ones are gone (nothing resumes from them; the rerun writes them again), the whole one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert latest_trainer_checkpoint(tmp_path / "none") is None
