"""score/table1.py: Table 1's shape holds only with disjoint intervals."""

from vstain_cli.score.table1 import find_roles, table1_shape


def _m(v, half):
    return {"value": v, "lo": v - half, "hi": v + half}


def _score(fsd, l1, half=0.1):
    names = ("diffusion", "regression", "pix2pix")
    return {"models": {n: {"metrics": {"FSD": _m(f, half), "L1": _m(a, half), "L2": _m(a + 5, half)}}
                       for n, f, a in zip(names, fsd, l1)}}


def test_the_papers_order_is_reproduced():
    shape = table1_shape(_score(fsd=(1.0, 9.0, 4.0), l1=(30.0, 20.0, 25.0)))
    assert shape["reproduced"] and all(c["holds"] for c in shape["claims"])


def test_overlapping_intervals_do_not_count():
    shape = table1_shape(_score(fsd=(1.0, 9.0, 1.05), l1=(30.0, 20.0, 25.0)))
    assert not shape["reproduced"]
    failed = [c["claim"] for c in shape["claims"] if not c["holds"]]
    assert failed == ["diffusion best on FSD (vs pix2pix)"]


def test_the_opposite_order_fails_every_fsd_claim():
    shape = table1_shape(_score(fsd=(9.0, 1.0, 4.0), l1=(30.0, 20.0, 25.0)))
    assert [c["holds"] for c in shape["claims"][:2]] == [False, False]


def test_roles_by_kind_then_name_and_none_without_all_three():
    models = {"runs/diffusion-b": {"kind": "diffusion"}, "unet": {"kind": "regression"}, "gan-pix2pix": {}}
    assert find_roles(models) == {"diffusion": "runs/diffusion-b", "regression": "unet", "pix2pix": "gan-pix2pix"}
    assert table1_shape({"models": {"diffusion": {"metrics": {}}}}) is None


def test_evidence_beyond_table1_and_missing_intervals():
    score = _score(fsd=(1.0, 9.0, 4.0), l1=(30.0, 20.0, 25.0))
    score["settings"] = {"intervals": "slides"}
    models = score["models"]
    for name, pfd in zip(("diffusion", "regression", "pix2pix"), (1.0, 3.0, 2.0)):
        models[name]["metrics"]["PFD"] = _m(pfd, 0.1)
    models["diffusion"]["grade"] = {"tile_accuracy": {"value": 0.45}, "real_tile_accuracy": {"value": 0.5},
                                    "tile_ratio": {"value": 0.9, "lo": 0.82, "hi": 0.97}}
    shape = table1_shape(score)
    assert shape["reproduced"] and shape["intervals"] == "slides"
    assert [c["holds"] for c in shape["evidence"]] == [True, True, True]
    models["diffusion"]["grade"]["tile_ratio"]["lo"] = 0.7  # the lower end decides
    assert table1_shape(score)["evidence"][2]["holds"] is False
    models["pix2pix"]["metrics"]["FSD"] = {"value": 4.0, "lo": None, "hi": None}  # no interval (one slide)
    shape = table1_shape(score)
    assert not shape["reproduced"] and "pix2pix 4 [?, ?]" in shape["claims"][0]["numbers"]
