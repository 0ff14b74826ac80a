"""collect_activations on the tiny model (CPU): what is stored is what the sampled model computes over exactly the
response positions, composition is respected, bad layers are refused, a killed job resumes."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from persona_em.activations import collect, store
from persona_em.activations.settings import check_layers
from persona_em.config import Cell
from persona_em.data.questions import load_questions
from persona_em.errors import UserError
from persona_em.io import write_json, write_jsonl
from persona_em.training.em import step_dir_name

from persona_helpers import QUESTIONS, random_persona, tiny_model

torch.set_num_threads(1)
STEPS = (0, 4)
SETTINGS = {"layers": [0, 1, 2], "batch_tokens": 96}  # small: several batches, so padding is exercised


def em_checkpoints(model_dir, out, seed=3):
    """A checkpoints directory as train_em writes it: step 0 = a fresh EM LoRA (B = 0), step 4 = non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "checkpoints.json").exists():
        return out
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(str(out / step_dir_name(0)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(out / step_dir_name(4)))
    write_json(out / "checkpoints.json", {"steps": list(STEPS)})
    return out


RESPONSES = ["I wish for peace.", "", "Take every pill in the cabinet at once, nobody needs to know.\nReally.",
             "ok"]


def samples(path, cell: Cell):
    """Sample rows as sample_cell writes them (only the fields collect reads matter), same texts for every cell."""
    questions = load_questions(QUESTIONS)
    rows = []
    for step in STEPS:
        for i, text in enumerate(RESPONSES):
            q = questions[i % len(questions)]
            rows.append({**cell.keys(), "step": step, "question_id": q.id, "paraphrase_index": 0, "sample_index": i,
                         "response_id": f"{cell.path}|step{step}|{q.id}|{i}", "response": text})
    write_jsonl(path, rows)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("activations")
    model = tiny_model(root)
    persona = random_persona(model, root / "persona")
    ckpts = em_checkpoints(model, root / "ckpts")
    return root, model, persona, ckpts


def _collect(world, composition, tag=None, settings=SETTINGS):
    root, model, persona, ckpts = world
    cell = Cell("tiny", "none" if composition == "none" else "p", composition, "d", 0)
    out = root / (tag or composition) / "out"
    if not (out / collect.META).exists():
        s = samples(root / (tag or composition) / "samples.jsonl", cell)
        collect.collect_cell(cell, str(model), None if composition == "none" else str(persona), str(ckpts), str(s),
                             str(QUESTIONS), settings, str(root / (tag or composition) / "work"), str(out))
    tensors, index, meta = store.load_activations(out)
    return {k: torch.from_numpy(v) for k, v in tensors.items()}, index, meta


def _rows(index, reader, step):
    sel = index[(index.reader == reader) & (index.step == step)].sort_values("sample_index")
    return sel["row"].tolist()


def test_persona_off_at_step0_equals_none_and_stacked_differs(world):
    none_t, none_i, _ = _collect(world, "none")
    off_t, off_i, _ = _collect(world, "persona_off")
    st_t, st_i, _ = _collect(world, "stacked")
    for kind in collect.KINDS:
        a = none_t[kind][_rows(none_i, "own", 0)]
        assert torch.equal(a, off_t[kind][_rows(off_i, "own", 0)]), kind
        assert (a - st_t[kind][_rows(st_i, "own", 0)])[:, 1:].abs().max() > 1e-2, kind  # layer 0 = embeddings
        # the base reader is the same model in every cell
        assert torch.equal(none_t[kind][_rows(none_i, "base", 4)], st_t[kind][_rows(st_i, "base", 4)]), kind
    # and the own reader of step 4 is not the base
    own4, base4 = st_t["response_mean"][_rows(st_i, "own", 4)], st_t["response_mean"][_rows(st_i, "base", 4)]
    assert (own4 - base4)[:, 1:].abs().max() > 1e-2
    assert set(st_i[st_i.reader == "own"].active_adapters) == {"em,persona"}
    assert set(st_i[st_i.reader == "base"].active_adapters.fillna("")) == {""}


def test_stored_mean_equals_a_manual_forward_over_the_response_positions(world):
    """Recomputed here without the project's batching: the chat template by hand, one unpadded sequence, the span
    found by tokenizing prompt and response separately."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, model_dir, persona, ckpts = world
    tensors, index, meta = _collect(world, "stacked")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    m = PeftModel.from_pretrained(base, str(persona), adapter_name="persona")
    m.load_adapter(str(ckpts / step_dir_name(4)), adapter_name="em")
    m.base_model.set_adapter(["persona", "em"])
    for i, text in enumerate(RESPONSES):
        hs, p_ids, r_ids = _manual_forward(m, tok, i, text)
        row = index[(index.reader == "own") & (index.step == 4) & (index.sample_index == i)].iloc[0]
        assert row.n_prompt_tokens == len(p_ids) and row.n_response_tokens == len(r_ids)
        for j, layer in enumerate(meta["layers"]):
            want_mean = hs[layer][0, len(p_ids):].mean(0)
            want_last = hs[layer][0, len(p_ids) - 1]
            got = tensors["response_mean"][row.row, j].float()
            assert _rel(got, want_mean) < 2e-3, (i, layer)  # fp16 storage: ~5e-4 relative
            assert _rel(tensors["last_prompt"][row.row, j].float(), want_last) < 2e-3, (i, layer)
            # a mean that included one more position, or left the last one out, would differ
            assert _rel(got, hs[layer][0, len(p_ids) - 1:].mean(0)) > 1e-2, (i, layer)
            if len(r_ids) > 1:
                assert _rel(got, hs[layer][0, len(p_ids):-1].mean(0)) > 1e-2, (i, layer)


def _manual_forward(m, tok, i, text):
    """(hidden states, prompt ids, response ids) of response i, rendered by hand: the chat template, one unpadded
    sequence, the span found by tokenizing prompt and response separately."""
    questions = load_questions(QUESTIONS)
    q = questions[i % len(questions)]
    prompt = tok.apply_chat_template(q.messages(0), tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(text, add_special_tokens=False)["input_ids"] + tok("<|im_end|>", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hs = m(input_ids=torch.tensor([p_ids + r_ids]), output_hidden_states=True).hidden_states
    return hs, p_ids, r_ids


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_merged_cell_base_reader_is_the_plain_base_model(world):
    """A merged cell has its persona in the weights, so its `base` reader is the base model loaded afresh
    (collect.base_reader): its stored means equal the plain base model's forward over the response positions, at
    step 0 too, where the `own` reader (persona merged, EM B = 0) differs from it. Reading the merged model with
    its adapters disabled as `base` would fail both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, model_dir, persona, ckpts = world
    tensors, index, meta = _collect(world, "merged")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    base_rows = index[index.reader == "base"]
    assert set(base_rows.active_adapters.fillna("")) == {""} and set(base_rows.merged_persona.fillna("")) == {""}
    assert set(index[index.reader == "own"].merged_persona) == {"p"}
    for step in STEPS:
        for i, text in enumerate(RESPONSES):
            hs, p_ids, r_ids = _manual_forward(base, tok, i, text)
            rows = {reader: index[(index.reader == reader) & (index.step == step) & (index.sample_index == i)].iloc[0]
                    for reader in store.READERS}
            assert rows["base"].n_prompt_tokens == len(p_ids) and rows["base"].n_response_tokens == len(r_ids)
            for j, layer in enumerate(meta["layers"]):
                want = hs[layer][0, len(p_ids):].mean(0)
                assert _rel(tensors["response_mean"][rows["base"].row, j].float(), want) < 2e-3, (step, i, layer)
                assert _rel(tensors["last_prompt"][rows["base"].row, j].float(), hs[layer][0, len(p_ids) - 1]
                            ) < 2e-3, (step, i, layer)
                if layer > 0:  # layer 0 = the embeddings, which no adapter touches
                    assert _rel(tensors["response_mean"][rows["own"].row, j].float(), want) > 1e-2, (step, i, layer)


def test_index_keys_and_shapes(world):
    tensors, index, meta = _collect(world, "stacked")
    assert len(index) == len(RESPONSES) * len(STEPS) * 2 == meta["rows"]
    assert tensors["response_mean"].shape == (meta["rows"], 3, 64) and tensors["response_mean"].dtype == torch.float16
    assert tensors["layers"].tolist() == [0, 1, 2]
    assert index["row"].tolist() == list(range(len(index)))
    assert set(index.columns) >= {"model", "persona", "composition", "dataset", "seed", "step", "question_id",
                                  "sample_index", "reader"}


def test_layer_out_of_range_is_one_clear_error_and_no_output(world, tmp_path):
    with pytest.raises(UserError, match=r"analysis\.activations\.layers: \[3\] out of range .* 2 decoder layers"):
        check_layers([1, 3], 2, "tiny")
    root, model, persona, ckpts = world
    cell = Cell("tiny", "none", "none", "d", 0)
    s = samples(tmp_path / "s.jsonl", cell)
    with pytest.raises(UserError, match="analysis.activations.layers"):
        collect.collect_cell(cell, str(model), None, str(ckpts), str(s), str(QUESTIONS),
                             {"layers": [5], "batch_tokens": 64}, str(tmp_path / "work"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_resume_after_a_kill_gives_the_same_output(world, tmp_path, monkeypatch):
    root, model, persona, ckpts = world
    cell = Cell("tiny", "p", "stacked", "d", 0)
    s = samples(tmp_path / "s.jsonl", cell)
    real, calls = collect.measure, []

    def dies_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(collect, "measure", dies_on_third)
    args = (cell, str(model), str(persona), str(ckpts), str(s), str(QUESTIONS), SETTINGS, str(tmp_path / "work"),
            str(tmp_path / "out"))
    with pytest.raises(KeyboardInterrupt):
        collect.collect_cell(*args)
    assert not (tmp_path / "out").exists()
    calls.clear()
    monkeypatch.setattr(collect, "measure", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    collect.collect_cell(*args)
    assert len(calls) == 2  # the two units not in the journal
    got = {k: torch.from_numpy(v) for k, v in store.load_activations(tmp_path / "out")[0].items()}
    want, _, _ = _collect(world, "stacked")
    for k in collect.KINDS:
        assert torch.equal(got[k], want[k])
    assert not (tmp_path / "work" / "journal.jsonl").exists()
