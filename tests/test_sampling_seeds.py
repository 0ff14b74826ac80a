"""Sampling random numbers: replicate (grid) seeds are independent; cells compared within a seed share them."""
from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from persona_em import compose
from persona_em.config import Cell
from persona_em.io import read_jsonl, write_json
from persona_em.sampling.sample import batch_seed, replicate_seed, sample_cell
from persona_em.training.em import step_dir_name

from persona_helpers import QUESTIONS, random_persona
from persona_em.models import load_model

torch.set_num_threads(1)
SETTINGS = {"n_samples": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "seed": 0, "batch_size": 4}


def test_batch_seeds_differ_across_grid_seeds_steps_and_batches():
    seeds = {(g, s, b): batch_seed(0, g, s, b) for g in range(8) for s in (0, 2, 100) for b in range(4)}
    assert len(set(seeds.values())) == len(seeds)  # no two generate calls share a seed
    assert all(0 <= v < 2 ** 63 for v in seeds.values())
    assert batch_seed(0, 0, 2, 1) == batch_seed(0, 0, 2, 1) and batch_seed(1, 0, 2, 1) != batch_seed(0, 0, 2, 1)
    assert replicate_seed(0, 0) != replicate_seed(0, 1) != replicate_seed(1, 1)
    torch.manual_seed(batch_seed(0, 0, 0, 0))
    first = torch.rand(8)
    torch.manual_seed(batch_seed(0, 1, 0, 0))
    assert not torch.equal(first, torch.rand(8))  # two replicate seeds: two random streams


def test_batch_seed_is_the_same_in_every_process():
    """A stable hash, not Python's salted hash(): a resumed job on another node derives the same seeds."""
    code = "from persona_em.sampling.sample import batch_seed; print(batch_seed(3, 1, 20, 2))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2")}
    assert outs == {f"{batch_seed(3, 1, 20, 2)}\n"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """One EM checkpoint (step 0, non-zero LoRA) shared by every cell, and a persona adapter."""
    from persona_em.training.settings import TrainConfig
    from persona_em.training.em import _lora_config, _save_em

    root = tmp_path_factory.mktemp("seeds")
    base, _ = load_model(tiny_model_dir)
    torch.manual_seed(0)
    model = compose.compose_for_training(base, "none", None, "none", _lora_config(TrainConfig(lora_r=4)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    _save_em(model, root / "checkpoints" / step_dir_name(0))
    write_json(root / "checkpoints" / "checkpoints.json", {"steps": [0], "last_step": 0})
    persona = random_persona(tiny_model_dir, root / "persona")
    return root, persona


def _sample(world, tiny_model_dir, cell: Cell):
    root, persona = world
    out = root / "samples" / f"{cell.path}.jsonl"
    sample_cell(cell, str(tiny_model_dir), None if cell.persona == "none" else str(persona),
                str(root / "checkpoints"), str(QUESTIONS), SETTINGS, str(root / "journal" / f"{cell.path}.jsonl"),
                str(out))
    return read_jsonl(out)


def test_replicate_seeds_draw_independently_cells_of_one_seed_are_paired(world, tiny_model_dir):
    seed0 = _sample(world, tiny_model_dir, Cell("tiny", "none", "none", "insecure", 0))
    other_dataset = _sample(world, tiny_model_dir, Cell("tiny", "none", "none", "medical", 0))
    seed1 = _sample(world, tiny_model_dir, Cell("tiny", "none", "none", "insecure", 1))
    persona = _sample(world, tiny_model_dir, Cell("tiny", "p", "stacked", "insecure", 0))
    from persona_em.data.questions import load_questions

    assert len(seed0) == len(load_questions(QUESTIONS)) * SETTINGS["n_samples"]

    def draws(rows):
        return [(r["question_id"], r["sample_index"], r["paraphrase_index"], r["batch_seed"]) for r in rows]

    # within grid seed 0: the same random numbers for every cell (paired), whatever the dataset or persona
    assert draws(other_dataset) == draws(seed0) == draws(persona)
    assert [r["response"] for r in other_dataset] == [r["response"] for r in seed0]  # same model, same draws
    # grid seed 1: its own random numbers
    assert not {r["batch_seed"] for r in seed1} & {r["batch_seed"] for r in seed0}
    assert [r["response"] for r in seed1] != [r["response"] for r in seed0]
    different = sum(a["response"] != b["response"] for a, b in zip(seed0, seed1))
    assert different >= len(seed0) // 2, f"only {different} of {len(seed0)} responses differ between seeds"
