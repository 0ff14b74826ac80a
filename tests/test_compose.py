"""Persona composition is real: proven on the tiny model in training, at step 0, and in sampling.

(1) merged/stacked: persona parameters are unchanged by EM training, EM parameters change.
(2) step 0: logits equal base+persona and differ from the base alone.
(3) stacked and merged give the same logits (step 0 and after training).
(4) sampling composes like training; every row carries persona, composition and the adapters read from the layers.
(5) a resumed stacked training keeps the persona on (and ends exactly where an uninterrupted run ends).
(6) the seed alone fixes the EM adapter's initialisation: the same in every composition, different across seeds.
(7) persona_off is the no-persona cell at step 0; posthoc trains as the no-persona cell and samples with the persona.
(8) sampling's folded adapters compute what the LoRA layers apply, and the base weights come back bit for bit;
    layers that cannot fold (tied weights, DoRA) stay LoRA layers.
"""
from __future__ import annotations

import os
import shutil

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from safetensors.torch import load_file

from persona_em import compose
from persona_em.config import NO_PERSONA, Cell
from persona_em.errors import UserError
from persona_em.io import read_jsonl, read_table
from persona_em.sampling.sample import sample_cell
from persona_em.training.em import step_dir_name, train_em

from persona_helpers import QUESTIONS, chat_data, load_json, logits, random_persona, tiny_model, train_settings
from persona_em.models import load_model

torch.set_num_threads(1)
SCHEDULE = {"steps": [0, 2, "final"]}  # 16 rows / batch 4 = 4 steps


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    model = tiny_model(root)
    persona = random_persona(model, root / "persona")
    data = chat_data(root / "train.jsonl")
    return root, model, persona, data


def _train(world, composition, tag=None, seed=0):
    root, model, persona, data = world
    no_persona = composition == NO_PERSONA
    cell = Cell("tiny", NO_PERSONA if no_persona else "p", composition, "d", seed)
    out = root / (tag or composition)
    if not (out / "checkpoints" / "checkpoints.json").exists():
        train_em(cell, str(model), None if no_persona else str(persona), str(data), train_settings(), SCHEDULE,
                 str(out / "work"), str(out / "checkpoints"), str(out / "train_log.tsv"))
    return cell, out


@pytest.fixture(scope="module")
def trained(world):
    return {c: _train(world, c) for c in ("stacked", "merged", "persona_off", "posthoc", "none")}


def _sampling_model(world, composition, step_dir, name="em_x"):
    root, model, persona, _ = world
    base, chat_format = load_model(model)
    tok = chat_format.tokenizer
    m = compose.compose_for_sampling(base, "p", persona, composition)
    return compose.use_em_adapter(m, step_dir, name, composition, "p"), tok


def _reference(world):
    """Base alone and base + persona (persona merged by PEFT itself, no code of ours)."""
    from peft import PeftModel

    _, model, persona, _ = world
    base, chat_format = load_model(model)
    tok = chat_format.tokenizer
    ref_base = logits(base, tok)
    with_persona = PeftModel.from_pretrained(base, str(persona))
    return ref_base, logits(with_persona, tok), tok


def test_only_em_trains_and_persona_parameters_stay_fixed(world):
    """(1) A real EMTrainer run: persona weights (stacked) / merged base weights (merged) unchanged, EM changed."""
    from trl import SFTConfig

    from persona_em.chat import ChatFormat
    from persona_em.training.em import _lora_config, _trainer_class, build_dataset
    from persona_em.training.settings import TrainConfig

    root, model, persona, data = world
    cfg = TrainConfig(**train_settings())
    for composition in ("stacked", "merged"):
        base, chat_format = load_model(model)
        tok = chat_format.tokenizer
        m = compose.compose_for_training(base, "p", persona, composition, _lora_config(cfg))
        frozen = {n: p.detach().clone() for n, p in m.named_parameters() if f".{compose.EM}." not in n}
        em = {n: p.detach().clone() for n, p in m.named_parameters() if f".{compose.EM}." in n}
        assert any(".persona." in n for n in frozen) == (composition == "stacked")
        EMTrainer, _ = _trainer_class()
        EMTrainer.composition, EMTrainer.persona = composition, "p"
        args = SFTConfig(output_dir=str(root / f"t1_{composition}"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                         dataloader_num_workers=0, disable_tqdm=True, bf16=False)
        trainer = EMTrainer(model=m, args=args, train_dataset=build_dataset(ChatFormat(tok), data, cfg), processing_class=tok)
        trainer.train()
        after = dict(trainer.model.named_parameters())
        for n, p in frozen.items():
            assert torch.equal(p, after[n].detach()), f"{composition}: {n} changed"
        assert any(not torch.equal(p, after[n].detach()) for n, p in em.items()), f"{composition}: EM did not move"
        compose.check_composition(trainer.model, composition, "p", training=True)


@pytest.mark.parametrize("composition", ["stacked", "merged", "posthoc"])
def test_step0_equals_base_plus_persona(world, trained, composition):
    """(2) The step-0 checkpoint (fresh EM, B = 0) is exactly base + persona, not the base (posthoc: the persona
    switched on at sampling)."""
    ref_base, ref_persona, _ = _reference(world)
    _, out = trained[composition]
    m, tok = _sampling_model(world, composition, out / "checkpoints" / step_dir_name(0))
    got = logits(m, tok)
    assert torch.allclose(got, ref_persona, atol=1e-5)
    assert not torch.allclose(got, ref_base, atol=1e-3)


def test_persona_off_step0_is_the_base(world, trained):
    """The named control: persona loaded but off, so step 0 is the base model."""
    ref_base, ref_persona, _ = _reference(world)
    _, out = trained["persona_off"]
    m, tok = _sampling_model(world, "persona_off", out / "checkpoints" / step_dir_name(0))
    assert torch.allclose(logits(m, tok), ref_base, atol=1e-5)
    assert compose.active_adapters(m) == ["em_x"]


def test_stacked_and_merged_give_the_same_logits(world, trained):
    """(3) Same EM adapter on persona-stacked and persona-merged models: same logits (step 0 and trained)."""
    _, out = trained["stacked"]
    for step_dir in sorted((out / "checkpoints").glob("step-*")):
        stacked, tok = _sampling_model(world, "stacked", step_dir)
        merged, _ = _sampling_model(world, "merged", step_dir)
        assert torch.allclose(logits(stacked, tok), logits(merged, tok), atol=1e-4), step_dir.name
    last = load_file(str(sorted((out / "checkpoints").glob("step-*"))[-1] / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in last.items() if "lora_B" in k)  # the trained EM is not a no-op


@pytest.mark.parametrize("composition", ["stacked", "merged", "persona_off", "posthoc"])
def test_sampling_rows_carry_the_composition_actually_run(world, trained, composition, tmp_path):
    """(4) Rows record persona, composition and the active adapters read from the LoRA layers; they match training
    (but for posthoc, whose persona is switched on only at sampling)."""
    _, model, persona, _ = world
    cell, out = trained[composition]
    manifest = load_json(out / "checkpoints" / "checkpoints.json")
    settings = {"n_samples": 2, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4, "seed": 0, "batch_size": 8}
    samples = tmp_path / "s.jsonl"
    sample_cell(cell, str(model), str(persona), str(out / "checkpoints"), str(QUESTIONS), settings,
                str(tmp_path / "j.jsonl"), str(samples))
    rows = read_jsonl(samples)
    assert {r["step"] for r in rows} == set(manifest["steps"])
    def roles(adapters):  # the EM adapter's name differs between training and sampling; the persona's does not
        return sorted(a if a == compose.PERSONA else "EM" for a in adapters)

    trained_set = roles(manifest["active_adapters_in_training"])
    assert trained_set == (["EM", "persona"] if composition == "stacked" else ["EM"])
    for r in rows:
        assert r["persona"] == "p" and r["composition"] == composition
        assert roles(r["active_adapters"]) == (["EM", "persona"] if composition == "posthoc" else trained_set)
        assert r["merged_persona"] == manifest["merged_persona"] == ("p" if composition == "merged" else None)
    assert ("persona" in rows[0]["active_adapters"]) == (composition in ("stacked", "posthoc"))


def _adapter(out, step) -> dict:
    return load_file(str(out / "checkpoints" / step_dir_name(step) / "adapter_model.safetensors"))


def test_em_init_depends_only_on_the_seed(world, trained):
    """(6) Same seed: identical EM init tensors whatever the persona and composition (loading a persona draws random
    numbers, so seeding before it would not do); another seed: another init."""
    reference = _adapter(trained["none"][1], 0)
    assert any("lora_A" in k and v.abs().max() > 0 for k, v in reference.items())
    for composition in ("persona_off", "posthoc", "stacked", "merged"):
        got = _adapter(trained[composition][1], 0)
        assert got.keys() == reference.keys(), composition
        for k in reference:
            assert torch.equal(got[k], reference[k]), f"{composition}: {k}"
    _, other_seed = _train(world, "none", tag="none_seed1", seed=1)
    other = _adapter(other_seed, 0)
    assert any(not torch.equal(other[k], reference[k]) for k in reference if "lora_A" in k)


def test_persona_off_equals_none_at_step0(world, trained, tmp_path):
    """(7) persona_off at step 0 is the no-persona cell at step 0: same logits and, with the same grid seed, the same
    samples."""
    _, model, persona, _ = world
    none_m, tok = _sampling_model(world, "none", trained["none"][1] / "checkpoints" / step_dir_name(0))
    off_m, _ = _sampling_model(world, "persona_off", trained["persona_off"][1] / "checkpoints" / step_dir_name(0))
    assert torch.allclose(logits(none_m, tok), logits(off_m, tok), atol=1e-6)
    settings = {"n_samples": 2, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "seed": 0, "batch_size": 8}
    texts = {}
    for composition in ("none", "persona_off"):
        cell, out = trained[composition]
        samples = tmp_path / f"{composition}.jsonl"
        sample_cell(cell, str(model), None if composition == "none" else str(persona), str(out / "checkpoints"),
                    str(QUESTIONS), settings, str(tmp_path / f"{composition}.journal.jsonl"), str(samples))
        rows = [r for r in read_jsonl(samples) if r["step"] == 0]
        texts[composition] = sorted((r["question_id"], r["paraphrase_index"], r["sample_index"], r["response"])
                                    for r in rows)
    assert texts["none"] and texts["none"] == texts["persona_off"]


def test_posthoc_trains_as_the_no_persona_cell(world, trained):
    """(7) posthoc trains with no persona active: its trained EM adapter is the no-persona cell's (same seed), and
    not the stacked cell's, whose persona was on in training."""
    _, posthoc = trained["posthoc"]
    manifest = load_json(posthoc / "checkpoints" / "checkpoints.json")
    assert manifest["active_adapters_in_training"] == [compose.EM] and manifest["merged_persona"] is None
    last = manifest["last_step"]
    got, none, stacked = _adapter(posthoc, last), _adapter(trained["none"][1], last), _adapter(trained["stacked"][1], last)
    for k in none:
        assert torch.allclose(got[k], none[k], atol=1e-6), k
    assert any(not torch.allclose(got[k], stacked[k], atol=1e-4) for k in got if "lora_B" in k)


def test_expected_adapters_per_stage():
    assert compose.expected_active("posthoc", training=True) == [compose.EM]
    assert compose.expected_active("posthoc", training=False) == [compose.EM, compose.PERSONA]
    assert compose.expected_active("stacked", training=True) == [compose.EM, compose.PERSONA]
    for composition in ("none", "merged", "persona_off"):
        assert compose.expected_active(composition, training=True) == compose.expected_active(
            composition, training=False) == [compose.EM]


def interrupted_copy(full, part) -> int:
    """`part`: the work dir of the finished run `full` as if killed before its last step; returns that step."""
    shutil.copytree(full / "work", part / "work")
    last = load_json(full / "checkpoints" / "checkpoints.json")["last_step"]
    shutil.rmtree(part / "work" / "trainer" / f"checkpoint-{last}")
    shutil.rmtree(part / "work" / "adapters" / step_dir_name(last))
    journal = part / "work" / "train_log.jsonl"  # the per-step log as it was when the run died: no last step
    journal.write_text("".join(l + "\n" for l in journal.read_text().splitlines() if f'"step": {last},' not in l))
    return last


def test_resumed_stacked_training_keeps_the_persona_on(world, trained):
    """(5) Kill after checkpoint-2, rerun: it resumes, the persona stays active, and it ends where the full run did.

    transformers' own PEFT resume calls set_adapter(<first active>), switching the persona off; the EM gradients
    of the resumed steps would then differ and the final EM weights with them.
    """
    root, model, persona, data = world
    cell, full = trained["stacked"]
    part = root / "resumed"
    last = interrupted_copy(full, part)
    assert (part / "work" / "trainer" / "checkpoint-2").exists()
    train_em(cell, str(model), str(persona), str(data), train_settings(), SCHEDULE, str(part / "work"),
             str(part / "checkpoints"), str(part / "train_log.tsv"))
    a = load_file(str(full / "checkpoints" / step_dir_name(last) / "adapter_model.safetensors"))
    b = load_file(str(part / "checkpoints" / step_dir_name(last) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert load_json(part / "checkpoints" / "checkpoints.json")["active_adapters_in_training"] == ["em", "persona"]
    # the per-step log reads as the uninterrupted run's: TRL's token counter restarts at 0 in the resumed process,
    # so the first step after the resume must not subtract the tokens counted before it
    full_log, part_log = read_table(full / "train_log.tsv"), read_table(part / "train_log.tsv")
    assert part_log["step"].tolist() == full_log["step"].tolist() == list(range(1, last + 1))
    assert part_log["tokens"].tolist() == full_log["tokens"].tolist() and (full_log["tokens"] > 0).all()
    assert part_log["loss"].to_numpy() == pytest.approx(full_log["loss"].to_numpy(), rel=1e-5)


def test_resume_with_persona_switched_off_would_differ(world, trained):
    """The check above can fail: resuming with only the EM adapter active ends elsewhere."""
    from persona_em.training import em as train_em_module

    root, model, persona, data = world
    cell, full = trained["stacked"]
    part = root / "resumed_off"
    interrupted_copy(full, part)
    real = compose.reactivate

    def buggy(model_, composition, persona_, em_name=compose.EM):  # what transformers' resume does
        model_.set_adapter(em_name)

    compose.reactivate = buggy
    try:
        with pytest.raises(RuntimeError, match="composition 'stacked' needs active adapters"):
            train_em_module.train_em(cell, str(model), str(persona), str(data), train_settings(), SCHEDULE,
                                     str(part / "work"), str(part / "checkpoints"), str(part / "train_log.tsv"))
    finally:
        compose.reactivate = real
    assert not (part / "checkpoints").exists()  # nothing partial


def test_adapter_incompatible_with_the_base_is_a_clear_error(world, tmp_path):
    """A persona targeting a module the base lacks fails by name, before anything is trained."""
    import json as _json

    _, model, persona, _ = world
    bad = tmp_path / "bad"
    shutil.copytree(persona, bad)
    cfg = _json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]  # GPT-2's name: Qwen2 has no c_attn
    (bad / "adapter_config.json").write_text(_json.dumps(cfg))
    base, _ = load_model(model)
    with pytest.raises(UserError, match=r"targets modules \['c_attn'\]"):
        compose.compose_for_sampling(base, "bad", bad, "stacked")


@pytest.mark.parametrize("composition", ["stacked", "merged", "persona_off", "posthoc", "none"])
def test_folded_adapters_compute_what_the_lora_layers_apply(world, trained, composition):
    """(8) Sampling folds the active adapters into the base weights (compose.FoldedAdapters): the plain model's
    logits are the PeftModel's, for two checkpoints in turn through one FoldedAdapters (the second folds onto the
    restored base, not onto the first's weights); on exit the LoRA layers are back and every weight is bit for bit
    what it was, also when the sampling inside fails."""
    from peft.tuners.lora import LoraLayer

    _, out = trained[composition]
    steps = sorted((out / "checkpoints").glob("step-*"))
    m, tok = _sampling_model(world, composition, steps[-1])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    folded = compose.FoldedAdapters()
    for step_dir in (steps[-1], steps[0], steps[-1]):
        m = compose.use_em_adapter(m, step_dir, "em_x", composition, "p")
        want = logits(m, tok)
        with folded.applied(m) as plain:
            assert not any(isinstance(x, LoraLayer) for x in plain.modules())
            got = logits(plain, tok)
        assert torch.allclose(got, want, atol=1e-5), step_dir.name
        assert torch.equal(logits(m, tok), want)
    base_ref, persona_ref, _ = _reference(world)
    with folded.applied(m) as plain:  # the last, trained checkpoint: not the base, and the persona as composed
        got = logits(plain, tok)
    assert not torch.allclose(got, base_ref, atol=1e-3) and not torch.allclose(got, persona_ref, atol=1e-3)
    with pytest.raises(ValueError, match="inside"):
        with folded.applied(m):
            raise ValueError("inside")
    after = dict(m.named_parameters())
    assert before.keys() == after.keys()
    changed = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert changed == [] or all(".em_x." in n for n in changed)  # only the EM slot moves (checkpoints loaded)
    assert sum(isinstance(x, LoraLayer) for x in m.modules()) > 0
    compose.check_composition(m, composition, "p", em_name="em_x", training=False)


def test_folding_refuses_layers_peft_has_merged(world, trained):
    """A layer whose adapters PEFT merged into its weight would get them twice."""
    _, out = trained["stacked"]
    m, _ = _sampling_model(world, "stacked", sorted((out / "checkpoints").glob("step-*"))[-1])
    m.base_model.merge_adapter()
    with pytest.raises(RuntimeError, match="merged by PEFT"):
        with compose.FoldedAdapters().applied(m):
            pass


@pytest.mark.parametrize("kind", ["tied", "dora"])
def test_layers_that_cannot_fold_stay_lora_layers(world, trained, tmp_path, kind):
    """(8) A persona adapter on the tiny model's tied input embeddings and lm_head (one weight: folding an adapter of
    either into it would change both), or a DoRA persona, stays a LoRA layer that PEFT applies; the other layers
    fold; the logits are the PeftModel's and every weight comes back bit for bit."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    _, model, _, _ = world
    targets = ["q_proj", "embed_tokens", "lm_head"] if kind == "tied" else ["q_proj", "v_proj"]
    base = AutoModelForCausalLM.from_pretrained(str(model))
    assert base.config.tie_word_embeddings and base.lm_head.weight is base.model.embed_tokens.weight
    torch.manual_seed(2)
    persona = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=kind == "dora",
                                              init_lora_weights=False))
    persona.save_pretrained(str(tmp_path / "persona"))
    _, out = trained["stacked"]
    base, chat_format = load_model(model)
    tok = chat_format.tokenizer
    m = compose.compose_for_sampling(base, "p", tmp_path / "persona", "stacked")
    m = compose.use_em_adapter(m, sorted((out / "checkpoints").glob("step-*"))[-1], "em_x", "stacked", "p")
    want = logits(m, tok)
    before = {n: t.detach().clone() for n, t in m.named_parameters()}
    folded = compose.FoldedAdapters()
    with folded.applied(m) as plain:
        got = logits(plain, tok)
        left = {n for n, x in plain.named_modules() if isinstance(x, LoraLayer)}
    assert left == set(folded.unfolded)
    if kind == "tied":
        assert left == {"model.embed_tokens", "lm_head"}
        assert all("tied" in why for why in folded.unfolded.values())
    else:
        assert left == {n for n, x in m.get_base_model().named_modules()
                        if isinstance(x, LoraLayer) and n.endswith(("q_proj", "v_proj"))}
        assert all("DoRA" in why for why in folded.unfolded.values())
    assert not any(n.endswith("up_proj") for n in left)  # the EM adapter's other layers fold
    assert torch.allclose(got, want, atol=1e-5)
    assert all(torch.equal(before[n], t.detach()) for n, t in m.named_parameters())


def test_merging_a_persona_on_tied_weights_is_a_clear_error(world, tmp_path):
    """PEFT's merge_and_unload only warns when an adapter sits on tied weights, and then changes both modules (the
    tiny model's logits moved by hundreds): the merged composition refuses such a persona, naming its layers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, model, _, _ = world
    torch.manual_seed(2)
    persona = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model)),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    persona.save_pretrained(str(tmp_path / "persona"))
    base, _ = load_model(model)
    with pytest.raises(UserError, match=r"persona 'p' .* ties to another module \(lm_head\)"):
        compose.compose_for_sampling(base, "p", tmp_path / "persona", "merged")


def test_an_adapter_on_untied_embeddings_folds(world, tmp_path):
    """(8) PEFT keeps an embedding layer's adapters in lora_embedding_A, not lora_A: with untied embeddings such a
    layer folds like any other (before, it was swapped for its base layer with the adapter left out), and the
    layers report it as applied."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, model, _, _ = world
    base = AutoModelForCausalLM.from_pretrained(str(model), tie_word_embeddings=False)  # lm_head: its own weight
    assert base.lm_head.weight is not base.model.embed_tokens.weight
    torch.manual_seed(2)
    m = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                        init_lora_weights=False)).eval()
    assert compose.active_adapters(m) == ["default"]
    x = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        want = m(x).logits
        before = {n: t.clone() for n, t in m.named_parameters()}
        folded = compose.FoldedAdapters()
        with folded.applied(m) as plain:
            got = plain(x).logits
        m.base_model.disable_adapter_layers()
        base_logits = m(x).logits
        m.base_model.enable_adapter_layers()
    assert folded.unfolded == {}
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base_logits, atol=1e-3)
    assert all(torch.equal(before[n], t) for n, t in m.named_parameters())


def test_a_persona_trained_on_the_vision_language_gemma3_applies_to_its_language_model(tmp_path):
    """(9) A persona adapter trained on the full Gemma 3 4B+ model (keys model.language_model.*, LoRA also on the
    vision tower) composed onto the text-only model load_model gives: the full model's logits with the persona,
    not PEFT's silent fallback (its tensors under no module name, the adapter left at its initialisation)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from persona_helpers import tiny_gemma3

    path = tiny_gemma3(4, out=tmp_path / "gemma3", vision=True)
    torch.manual_seed(0)
    full = get_peft_model(AutoModelForCausalLM.from_pretrained(str(path)),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                     init_lora_weights=False)).eval()
    full.save_pretrained(str(tmp_path / "persona"))
    assert any("vision_tower" in k for k in load_file(str(tmp_path / "persona" / "adapter_model.safetensors")))
    x = torch.randint(0, 500, (2, 15))
    with torch.no_grad():
        want = full(input_ids=x).logits
        base, _ = load_model(path, device="cpu")
        without = base(x).logits
        got = compose.compose_for_sampling(base, "p", tmp_path / "persona", "stacked")(x).logits
    assert not torch.allclose(want, without, atol=1e-3)  # the persona changes the logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_adapter_that_does_not_fit_the_model_is_a_clear_error(world, tmp_path):
    """(10) PEFT only warns when an adapter's tensors fit no module (here: saved for a model with more layers, or
    renamed) and leaves the adapter at its initialisation, i.e. the persona silently off; loading it is an error
    naming the adapter and the tensors, as is a file that lacks some of the adapter's tensors."""
    from safetensors.torch import save_file

    _, model, persona, _ = world
    tensors = load_file(str(persona / "adapter_model.safetensors"))
    for case, change in (("renamed", lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}),
                         ("partial", lambda t: {k: v for k, v in t.items() if "layers.1." not in k})):
        bad = tmp_path / case
        shutil.copytree(persona, bad)
        save_file(change(tensors), str(bad / "adapter_model.safetensors"))
        base, _ = load_model(model)
        message = (r"tensors matching no module \['base_model\.model\.model\.layers\.7\." if case == "renamed"
                   else r"adapter tensors not in the file \['base_model\.model\.model\.layers\.1\.")
        with pytest.raises(UserError, match=rf"persona adapter 'p' at {bad} does not fit the model's modules: .*"
                                            + message):
            compose.compose_for_sampling(base, "p", bad, "stacked")
