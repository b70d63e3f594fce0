"""The LDS suite (tools.bench_lds, issue 29): the metric against a brute-force definition, the subsets, the
bootstrap, and the suite end to end on the tiny offline model (a resumed run trains nothing)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tools import bench_lds as bl


def avg_ranks(xs):
    """0-based ranks, ties sharing the mean of their positions (pure Python)."""
    return [sum(1 for y in xs if y < x) + (sum(1 for y in xs if y == x) - 1) / 2 for x in xs]


def spearmanr(a, b):
    ra, rb = avg_ranks(a), avg_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def brute_lds(scores, subsets, losses):
    """LDS by the definition, one loop per validation sample and subset (no matrix algebra)."""
    out = []
    for v in range(len(scores)):
        pred = [sum(scores[v][i] for i in s) for s in subsets]
        out.append(spearmanr(pred, [-losses[j][v] for j in range(len(subsets))]))
    return np.array(out)


def test_lds_matches_the_brute_force_definition():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(5, 12))
    masks = bl.subset_masks(12, 9, 0.5, seed=1)
    losses = rng.normal(size=(9, 5))
    losses[:, 0] = np.round(losses[:, 0], 0)  # ties in the measured side: average ranks on both sides
    subsets = [np.flatnonzero(m).tolist() for m in masks]
    got = bl.lds_per_sample(scores, masks, losses)
    assert got == pytest.approx(brute_lds(scores, subsets, losses), abs=1e-12)


def test_lds_sign_a_method_that_knows_the_effects_scores_one_its_negation_minus_one():
    rng = np.random.default_rng(0)
    effect = rng.normal(size=(3, 40))  # training sample i lowers validation loss v by effect[v, i]
    masks = bl.subset_masks(40, 30, 0.5, seed=0)
    losses = 5.0 - masks.astype(float) @ effect.T  # (m, n_val): more helpful samples in S_j = lower loss
    assert bl.lds_per_sample(effect, masks, losses) == pytest.approx([1.0, 1.0, 1.0])
    assert bl.lds_per_sample(-effect, masks, losses) == pytest.approx([-1.0, -1.0, -1.0])
    noise = bl.lds_per_sample(rng.normal(size=(3, 40)), masks, losses)
    assert np.all(np.abs(noise) < 0.9)
    # a constant score predicts nothing: NaN, left out of the mean
    assert np.isnan(bl.lds_per_sample(np.ones((3, 40)), masks, losses)).all()


def test_subsets_are_seeded_halves_and_a_prefix_of_a_larger_draw():
    a = bl.subset_masks(11, 6, 0.5, seed=4)
    assert a.shape == (6, 11) and (a.sum(axis=1) == 6).all()  # round(5.5) = 6
    assert np.array_equal(a, bl.subset_masks(11, 6, 0.5, seed=4))
    assert not np.array_equal(a, bl.subset_masks(11, 6, 0.5, seed=5))
    assert np.array_equal(bl.subset_masks(11, 10, 0.5, seed=4)[:6], a)  # more subsets keep the cached ones


def test_bootstrap_interval_holds_the_mean_and_drops_nan():
    vals = np.array([0.1, 0.3, np.nan, 0.5, 0.2, 0.4])
    mean, lo, hi = bl.bootstrap_interval(vals, 2000, seed=0)
    assert mean == pytest.approx(0.3)
    assert lo < mean < hi and 0.1 <= lo and hi <= 0.5
    assert np.isnan(bl.bootstrap_interval(np.array([np.nan]), 10)[0])


def test_suite_end_to_end_on_the_tiny_model_and_a_rerun_trains_nothing(tiny_model_dir, tmp_path):
    args = ["--workdir", str(tmp_path / "w"), "--model", str(tiny_model_dir), "--quick"]
    args += ["--classes", "2", "--per-class", "2", "--subsets", "4", "--out", str(tmp_path / "lds.md")]
    args += ["--json", str(tmp_path / "lds.json")]
    assert bl.main(args) == 0
    first_text = (tmp_path / "lds.json").read_text()
    first = json.loads(first_text)
    assert set(first["lds"]) == set(bl.METHODS)
    for per in first["lds"].values():
        assert len(per) == 6  # 3 tasks x 2 classes x 1 validation sample
        assert all(v is None or np.isnan(v) or -1.0 <= v <= 1.0 for v in per)
    text = (tmp_path / "lds.md").read_text()
    assert "| forvalue-cos |" in text and "M = 4" in text
    assert "Fine-tunes run now 4" in text
    caches = sorted((tmp_path / "w" / "cache").glob("ft-*.json"))
    assert len(caches) == 4
    assert bl.main(args) == 0  # resumed: every fine-tune and score matrix from the work folder
    assert "Fine-tunes run now 0" in (tmp_path / "lds.md").read_text()
    assert (tmp_path / "lds.json").read_text() == first_text
    # extending M: the first 4 subsets are a prefix of the larger draw, so only the 2 new ones train; --reverse
    # (a second process filling the cache from the other end) trains them last to first
    more = args[: args.index("--subsets")] + ["--subsets", "6"] + args[args.index("--subsets") + 2 :]
    assert bl.main(more + ["--reverse", "--methods", "bm25"]) == 0
    assert "Fine-tunes run now 2" in (tmp_path / "lds.md").read_text()
    assert len(list((tmp_path / "w" / "cache").glob("ft-*.json"))) == 6
    assert not list((tmp_path / "w").rglob("*.tmp*"))  # atomic writes leave no temporary behind


@pytest.mark.parametrize("flag", ["--subsets", "--val-per-class", "--epochs", "--classes", "--per-class"])
def test_non_positive_sizes_are_refused_with_status_2(tmp_path, flag):
    with pytest.raises(SystemExit) as e:
        bl.main(["--workdir", str(tmp_path / "w"), flag, "0"])
    assert e.value.code == 2
    assert not (tmp_path / "w").exists()
