"""Slide-level evidence of ``vstain score``: cluster bootstrap, PFD, grade agreement, per-slide table, noise check."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_metrics import he_like_tiles, simple_features

from vstain_cli.score import metrics, noise_check, scoring
from vstain_cli.score.slides import grade_agreement, majority_vote, per_slide_table

# ---------------------------------------------------------------- cluster bootstrap


def _clustered_values(rng, slides=12, tiles=30):
    """Tiles of one slide nearly equal (slide effect sd 1, within-slide sd 0.05): the true mean is 0."""
    effect = rng.normal(0.0, 1.0, slides)
    values = np.repeat(effect, tiles) + rng.normal(0.0, 0.05, slides * tiles)
    return values, np.repeat([f"slide{i:02d}" for i in range(slides)], tiles)


def test_cluster_bootstrap_covers_where_the_tile_bootstrap_is_too_narrow():
    hits_tile = hits_slide = 0
    ratio = []
    reps = 40
    for r in range(reps):
        v, g = _clustered_values(np.random.default_rng(r))
        m, lo_t, hi_t = metrics.bootstrap_ci(v, 300, seed=r)
        m2, lo_s, hi_s = metrics.cluster_bootstrap_ci(v, g, 300, seed=r)
        assert m == m2 == pytest.approx(v.mean())
        hits_tile += lo_t <= 0.0 <= hi_t
        hits_slide += lo_s <= 0.0 <= hi_s
        ratio.append((hi_s - lo_s) / (hi_t - lo_t))
    # 360 tiles resampled as if independent: an interval ~sqrt(30) too narrow, mostly missing the truth
    assert hits_tile / reps < 0.5
    assert hits_slide / reps >= 0.85
    assert np.median(ratio) > 4


def test_fd_cluster_interval_covers_the_expected_fd_where_subsampling_tiles_does_not():
    slides, tiles, dim = 12, 15, 2
    groups = np.repeat(np.arange(slides), tiles)

    def draw(rng):  # real: slide means + small tile noise; fake: the real tile shifted by a per-slide error
        real = np.repeat(rng.normal(0, 1, (slides, dim)), tiles, 0) + 0.3 * rng.normal(size=(slides * tiles, dim))
        shift = rng.normal(0, 0.5, (slides, dim)) + np.array([0.5, 0.0])
        return real, real + np.repeat(shift, tiles, 0) + 0.3 * rng.normal(size=(slides * tiles, dim))

    truth = np.mean([metrics.fd_value(*draw(np.random.default_rng(10_000 + i))) for i in range(300)])
    reps, hit_s, hit_t, ws, wt = 30, 0, 0, 0.0, 0.0
    for r in range(reps):
        a, b = draw(np.random.default_rng(r))
        lo, hi = metrics.fd_cluster_interval(a, b, groups, n_boot=100, seed=r)
        lo2, hi2 = metrics.fd_interval(a, b, 100, seed=r, paired=True)
        assert lo <= metrics.fd_value(a, b) <= hi
        hit_s, hit_t = hit_s + (lo <= truth <= hi), hit_t + (lo2 <= truth <= hi2)
        ws, wt = ws + hi - lo, wt + hi2 - lo2
    assert hit_s / reps >= 0.85 and hit_t / reps <= 0.6
    assert ws > 2 * wt


def test_cluster_bootstrap_details():
    v = np.arange(12, dtype=float)
    g = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert metrics.cluster_bootstrap_ci(v, g, 200, seed=1) == metrics.cluster_bootstrap_ci(v, g, 200, seed=1)
    m, lo, hi = metrics.cluster_bootstrap_ci(v, ["x"] * 12)
    assert m == 5.5 and np.isnan(lo) and np.isnan(hi)  # one slide: no slide-level interval
    with pytest.raises(ValueError, match="slide ids"):
        metrics.cluster_bootstrap_ci(v, g[:-1])
    # every drawn slide contributes all its tiles, a slide drawn twice counts twice
    w = np.array([[2, 0, 1]])
    codes, s = metrics.cluster_codes(g)
    assert s == 3 and metrics.cluster_means(v, codes, w)[0] == pytest.approx((2 * 6 + 38) / 12)
    np.testing.assert_array_equal(metrics.cluster_rows(codes, w[0]), [0, 1, 2, 3, 0, 1, 2, 3, 8, 9, 10, 11])
    assert metrics.cluster_weights(3, 50, 0).sum(axis=1).tolist() == [3] * 50
    assert metrics.small_sample_factor(4) == pytest.approx(np.sqrt(4 / 3))


def test_score_image_sets_resamples_slides_when_slide_ids_are_given():
    real = he_like_tiles(24, size=16, seed=1)
    rng = np.random.default_rng(0)
    # per-slide brightness error: tiles of a slide err alike
    shift = np.repeat(rng.normal(0, 12, 4), 6)[:, None, None, None]
    fake = np.clip(real + shift + rng.normal(0, 3, real.shape), 0, 255).astype(np.uint8)
    groups = np.repeat(["s0", "s1", "s2", "s3"], 6).tolist()
    kw = dict(feature_extractors={"FSD": simple_features}, n_boot=300, fd_boot=30, seed=0)
    by_tile = scoring.score_image_sets(real, {"m": fake}, **kw)
    by_slide = scoring.score_image_sets(real, {"m": fake}, groups=groups, **kw)
    assert by_tile["settings"]["intervals"] == "tiles" and by_slide["settings"]["intervals"] == "slides"
    assert by_slide["settings"]["n_slides"] == 4 and "cluster bootstrap over 4 slides" in \
        by_slide["settings"]["interval_method"]
    assert by_slide["models"]["m"]["intervals"] == "slides"
    assert any("only 4 slides" in w for w in by_slide["warnings"])
    for k in ("L1", "FSD", "PFD"):
        t, s = by_tile["models"]["m"]["metrics"][k], by_slide["models"]["m"]["metrics"][k]
        assert s["value"] == pytest.approx(t["value"])
        assert s["lo"] <= s["value"] <= s["hi"]
    t, s = by_tile["models"]["m"]["metrics"]["L1"], by_slide["models"]["m"]["metrics"]["L1"]
    assert s["hi"] - s["lo"] > 2 * (t["hi"] - t["lo"])
    with pytest.raises(scoring.InputError, match="3 slide ids for 24 real tiles"):
        scoring.score_image_sets(real, {"m": fake}, groups=groups[:3])


# ---------------------------------------------------------------- PFD


def test_pfd_is_zero_for_identical_tiles_and_grows_with_noise():
    real = he_like_tiles(16, size=32, seed=2)
    rng = np.random.default_rng(1)
    fakes = {"copy": real.copy()}
    for sd in (4, 8, 16, 32):
        fakes[f"sd{sd}"] = np.clip(np.rint(real + rng.normal(0, sd, real.shape)), 0, 255).astype(np.uint8)
    res = scoring.score_image_sets(real, fakes, {"FSD": simple_features}, n_boot=50, fd_boot=10)
    pfd = [res["models"][k]["metrics"]["PFD"]["value"] for k in fakes]
    assert pfd[0] == 0.0 and res["models"]["copy"]["metrics"]["PFD"]["hi"] == 0.0
    assert all(a < b for a, b in zip(pfd, pfd[1:])), pfd
    assert res["per_image"]["sd8"]["PFD"].shape == (16,)
    np.testing.assert_allclose(metrics.paired_feature_distance(np.zeros((2, 3)), np.ones((2, 3))), np.sqrt(3))
    with pytest.raises(ValueError, match="one shape"):
        metrics.paired_feature_distance(np.zeros((2, 3)), np.zeros((3, 3)))


# ---------------------------------------------------------------- grade agreement and the per-slide table


# 3 slides of 4 tiles, grades 0, 1, 2
LABELS = np.repeat([0, 1, 2], 4)
GROUPS = np.repeat(["a", "b", "c"], 4).tolist()
REAL = np.array([0, 0, 0, 0, 1, 1, 1, 0, 2, 3, 3, 3])    # 8 of 12 right; votes 0, 1, 3: 2 of 3 slides right
FAKE = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0])    # 6 of 12 right; votes 0 (tie 0/1), 2, 2: 2 of 3


def test_majority_vote_ties_go_to_the_lower_grade():
    codes = np.repeat([0, 1], 4)
    assert majority_vote(np.array([1, 1, 0, 0, 3, 3, 3, 2]), codes, 2, 4).tolist() == [0, 3]


def test_grade_agreement_on_a_constructed_case():
    g = grade_agreement(LABELS, GROUPS, REAL, FAKE, n_classes=4, n_boot=400, seed=0)
    assert g["tiles"] == 12 and g["slides"] == 3
    assert g["tile_accuracy"]["value"] == pytest.approx(6 / 12)
    assert g["real_tile_accuracy"]["value"] == pytest.approx(8 / 12)
    assert g["tile_ratio"]["value"] == pytest.approx(0.75)
    assert g["slides_correct"] == 2 and g["real_slides_correct"] == 2
    assert g["slide_accuracy"]["value"] == pytest.approx(2 / 3) and g["slide_ratio"]["value"] == pytest.approx(1.0)
    assert g["tile_agreement"]["value"] == pytest.approx(4 / 12)  # tiles 0, 1, 4, 8 get the same grade
    for k in ("tile_accuracy", "real_tile_accuracy", "tile_ratio", "slide_accuracy", "tile_agreement"):
        assert g[k]["lo"] <= g[k]["value"] <= g[k]["hi"], k
    # the same stain keeps the grade exactly: ratio 1 everywhere
    same = grade_agreement(LABELS, GROUPS, REAL, REAL, 4, 100, 0)
    assert same["tile_ratio"] == {"value": 1.0, "lo": 1.0, "hi": 1.0}
    assert same["tile_agreement"]["value"] == 1.0


def test_per_slide_table_contents():
    rng = np.random.default_rng(0)
    per_image = {"m": {"L1": rng.uniform(0, 30, 12), "L2": rng.uniform(0, 40, 12), "PFD": rng.uniform(0, 2, 12)}}
    feats = {"FSD": {"real": rng.normal(size=(12, 3)), "m": rng.normal(size=(12, 3)) + 1}}
    table = per_slide_table(GROUPS, LABELS, per_image, feats, REAL, {"m": FAKE}, 4)
    assert [r["slide"] for r in table] == ["a", "b", "c"]
    assert [r["label"] for r in table] == [0, 1, 2] and [r["tiles"] for r in table] == [4, 4, 4]
    assert [r["real_accuracy"] for r in table] == [1.0, 0.75, 0.25]
    assert [r["real_vote"] for r in table] == [0, 1, 3]
    b = table[1]["models"]["m"]
    rows = slice(4, 8)
    assert b["L1"] == pytest.approx(per_image["m"]["L1"][rows].mean())
    assert b["L2"] == pytest.approx(per_image["m"]["L2"][rows].mean())
    assert b["PFD"] == pytest.approx(per_image["m"]["PFD"][rows].mean())
    assert b["FSD"] == pytest.approx(metrics.fd_value(feats["FSD"]["real"][rows], feats["FSD"]["m"][rows]))
    assert b["accuracy"] == 0.25 and b["vote"] == 2
    assert [r["models"]["m"]["accuracy"] for r in table] == [0.5, 0.25, 0.75]
    assert [r["models"]["m"]["vote"] for r in table] == [0, 2, 2]
    # without StainNet: distortion only
    bare = per_slide_table(GROUPS, None, {"m": {"L1": per_image["m"]["L1"]}})
    assert bare[0]["label"] is None and set(bare[0]["models"]["m"]) == {"L1"} and "real_accuracy" not in bare[0]


# ---------------------------------------------------------------- the noise check


def test_noisy_tiles_are_seeded_clipped_and_have_the_asked_spread():
    tiles = np.full((4, 3, 32, 32), 128, np.uint8)
    a, b = noise_check.noisy_tiles(tiles, 16, seed=3), noise_check.noisy_tiles(tiles, 16, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, noise_check.noisy_tiles(tiles, 16, seed=4))
    assert a.dtype == np.uint8 and abs(a.astype(float).std() - 16) < 0.5
    edge = noise_check.noisy_tiles(np.full((1, 3, 8, 8), 250, np.uint8), 16, 0)
    assert edge.max() == 255


def test_noise_check_verdict():
    def m(v):
        return {"value": v, "lo": v - 0.1, "hi": v + 0.1}

    models = {"diff": {"metrics": {"FSD": m(2.0), "PFD": m(3.0), "L1": m(20.0)}},
              "reg": {"metrics": {"FSD": m(5.0), "PFD": m(2.5), "L1": m(12.0)}}}
    proof = noise_check.verdict(models, {"metrics": {"FSD": m(2.5), "PFD": m(3.5), "L1": m(14.0)}}, "reg", "diff")
    assert proof["noise_proof"] is True and proof["fsd_noise_proof"] is True and proof["name"] == "reg + N(0, 16)"
    assert "noise-proof here" in noise_check.sentence(proof)
    gamed = noise_check.verdict(models, {"metrics": {"FSD": m(1.0), "PFD": m(2.95), "L1": m(14.0)}}, "reg", "diff")
    assert gamed["noise_proof"] is False and gamed["fsd_noise_proof"] is False
    assert gamed["disjoint"] == {"FSD": True, "PFD": False, "L1": True}
    assert "PFD: reg + N(0, 16) 2.95 looks BETTER than diff 3 (intervals overlap)" in noise_check.sentence(gamed)


# ---------------------------------------------------------------- end to end: evaluate on a dataset


@pytest.fixture(scope="module")
def four_slides(tmp_path_factory):
    """A tiny dataset with 4 test slides (one per grade) and random-init StainNet, diffusion and regression runs."""
    from conftest import make_tiny_dataset
    from test_score_cli import make_run

    root = tmp_path_factory.mktemp("slides")
    slides = {"s0": (0, "train"), "s1": (1, "train"), "s2": (2, "train"), "s3": (3, "train"),
              "v0": (1, "val"), "t0": (0, "test"), "t1": (1, "test"), "t2": (2, "test"), "t3": (3, "test")}
    data = make_tiny_dataset(root / "dataset", per_slide=4, slides=slides)
    make_tiny_dataset(root / "three", channels=3, per_slide=4, slides=slides)
    for name, preset in (("stainnet", "tiny-stainnet"), ("diffusion", "tiny-diffusion"),
                         ("regression", "tiny-regression")):
        make_run(root / name, preset, data)
    return root


def test_evaluate_on_a_dataset_reports_slides_grades_and_the_noise_check(four_slides, tmp_path):
    from vstain_cli.score.pipeline import EvaluateOptions, evaluate

    r = four_slides
    opts = EvaluateOptions(data=r / "dataset", models=[r / "diffusion", r / "regression"], stainnet=r / "stainnet",
                           steps=2, n_boot=100, fd_boot=10, grid_rows=0, device="cpu", out_dir=tmp_path / "o")
    res = evaluate(opts)
    doc = json.loads(res.paths["score.json"].read_text())
    assert doc["settings"]["intervals"] == "slides" and doc["settings"]["n_slides"] == 4
    for name in ("diffusion", "regression"):
        m = doc["models"][name]
        assert m["intervals"] == "slides" and m["kind"] == name
        assert {"FSD", "PFD", "L1", "L2"} <= set(m["metrics"])
        g = m["grade"]
        assert g["slides"] == 4 and g["tiles"] == 16
        assert g["real_tile_accuracy"]["value"] == pytest.approx(doc["stainnet"]["test"]["accuracy"])
    # the per-slide table: each test slide, its grade and tiles, each model's numbers
    assert [(s["slide"], s["label"], s["tiles"]) for s in doc["slides"]] == [
        ("t0", 0, 4), ("t1", 1, 4), ("t2", 2, 4), ("t3", 3, 4)]
    t1 = doc["slides"][1]["models"]["regression"]
    assert {"FSD", "PFD", "L1", "L2", "accuracy", "vote"} <= set(t1)
    assert t1["L1"] == pytest.approx(res.per_image["regression"]["L1"][4:8].mean())
    # the noise check: regression + N(0, 16) scored next to diffusion, its verdict stored and printed
    nc = doc["noise_check"]
    assert nc["base"] == "regression" and nc["against"] == "diffusion" and nc["sd"] == 16.0
    assert {"FSD", "PFD", "L1", "L2"} == set(nc["metrics"]) and nc["intervals"] == "slides"
    assert nc["noise_proof"] == (nc["metrics"]["PFD"]["value"] >= doc["models"]["diffusion"]["metrics"]["PFD"]["value"])
    assert "regression + N(0, 16)" not in doc["models"]  # a pseudo-model, not a model
    html = res.paths["report.html"].read_text()
    for text in ("slide-level cluster bootstrap: the 4 slides", "<h2>Grade agreement", "<h2>Per slide</h2>",
                 "<h2>Noise check</h2>", "PFD &darr;", "noise-proof here"):
        assert text in html, text
    assert "PFD" in res.paths["per_image.csv"].read_text().splitlines()[0]
    # --no-noise-check: none
    off = evaluate(EvaluateOptions(**{**opts.__dict__, "out_dir": tmp_path / "p", "noise_check": False}))
    assert "noise_check" not in off.results


def test_channel_mismatch_names_the_dataset_and_the_model(four_slides, tmp_path):
    from vstain_cli.errors import InputError
    from vstain_cli.score.pipeline import EvaluateOptions, evaluate

    r = four_slides
    with pytest.raises(InputError) as e:
        evaluate(EvaluateOptions(data=r / "three", models=[r / "regression"], out_dir=tmp_path / "o"))
    line = str(e.value)
    assert "three" in line and "regression" in line and "AF has 3 channels" in line and "trained on 4" in line
    assert "\n" not in line and not (tmp_path / "o").exists()


def test_cli_channel_mismatch_is_one_line_exit_2_and_noise_check_flag(four_slides, tmp_path):
    from test_score_cli import vstain

    r = four_slides
    bad = vstain("score", "--data", str(r / "three"), "--model", str(r / "regression"), "--no-noise-check",
                 "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "three" in lines[0] and "regression" in lines[0] and "3 channels" in lines[0]
