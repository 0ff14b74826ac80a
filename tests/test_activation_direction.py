"""The misalignment direction: a planted offset is recovered, shuffled labels give none, too few responses or no
held-out data are one clear error with no output."""
from __future__ import annotations

import numpy as np
import pytest

from persona_em.activations import direction as D
from persona_em.errors import UserError


def planted(n=1000, hidden=256, norm=10.0, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=hidden)
    v *= norm / np.linalg.norm(v)
    labels = np.repeat([D.MISALIGNED, D.ALIGNED], n)
    x = rng.normal(size=(2 * n, 1, hidden))
    x[labels == D.MISALIGNED, 0] += v
    folds = np.tile([0, 1], n)  # two seeds
    return x, labels, folds, v


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_planted_offset_is_recovered_and_shuffled_labels_are_not():
    x, labels, folds, v = planted()
    res = D.build_directions(x, labels, folds, [5], min_per_class=10, seed=0, where="test")
    for d in res["directions"]:
        assert _cos(d[0], v) > 0.99
    assert res["pooled_auroc"][5] > 0.99
    shuffled = np.random.default_rng(1).permutation(labels)
    res = D.build_directions(x, shuffled, folds, [5], min_per_class=10, seed=0, where="test")
    for d in res["directions"]:
        assert abs(_cos(d[0], v)) < 0.3
    assert abs(res["pooled_auroc"][5] - 0.5) < 0.1


def test_classes_are_balanced_and_layer_choice_follows_heldout_auroc():
    x, labels, folds, v = planted(n=400)
    x = np.concatenate([np.random.default_rng(2).normal(size=x.shape), x], axis=1)  # layer 0: no signal
    res = D.build_directions(x, labels, folds, [0, 3], min_per_class=10, seed=0, where="test")
    assert res["chosen_layer"] == 3
    row = next(r for r in res["rows"] if r["fold"] == "0" and r["layer"] == 3)
    assert row["n_misaligned_train"] == row["n_aligned_train"] == 200  # the responses of fold 1
    # unbalanced classes: the smaller one sets the size of both means
    rng = np.random.default_rng(0)
    mis, al = np.flatnonzero(labels == D.MISALIGNED)[:50], np.flatnonzero(labels == D.ALIGNED)
    keep = np.concatenate([mis, al])
    d, n_mis, n_al = D.mean_difference(x[keep], labels[keep], rng)
    assert (n_mis, n_al) == (50, 400)


def test_too_few_misaligned_is_one_clear_error():
    x, labels, folds, _ = planted(n=100)
    labels = labels.copy()
    labels[np.flatnonzero(labels == D.MISALIGNED)[5:]] = D.UNLABELLED
    with pytest.raises(UserError, match=r"fold 0 .* from 2 misaligned .* and 50 aligned .* at least 10 of each "
                                        r"\(analysis.activations.min_per_class\)"):
        D.build_directions(x, labels, folds, [1], min_per_class=10, seed=0, where="test")


def test_one_seed_uses_datasets_and_one_seed_one_dataset_refuses():
    assert D.fold_key([{"model": "m", "seed": 0, "dataset": "a"}, {"model": "m", "seed": 0, "dataset": "b"}]) == \
        "dataset"
    assert D.fold_key([{"model": "m", "seed": 0, "dataset": "a"}, {"model": "m", "seed": 1, "dataset": "a"}]) == "seed"
    with pytest.raises(UserError, match="two or more grid seeds .* seed \\[0\\] and dataset \\['a'\\]"):
        D.fold_key([{"model": "m", "seed": 0, "dataset": "a"}])


def test_labels_follow_the_thresholds():
    assert D.label(30, 51) == D.MISALIGNED and D.label(31, 90) == D.UNLABELLED and D.label(30, 50) == D.UNLABELLED
    assert D.label(71, 10) == D.ALIGNED and D.label(70, 99) == D.UNLABELLED and D.label(float("nan"), 99) == -1
