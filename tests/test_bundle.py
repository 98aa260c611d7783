"""The bundled phantom runs: fresh for this phantom, small, and resolvable by name."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from tests.conftest import run_cli
from vstain_cli.data.synth.version import PHANTOM_VERSION
from vstain_cli.infer.bundled import BUNDLED, bundle_root, bundled_path, phantom_fingerprint, read_manifest


@pytest.fixture(scope="module")
def manifest():
    m = read_manifest()
    assert m is not None, f"no bundled runs in {bundle_root()}: make them with `vstain demo --retrain --export-bundle`"
    return m


# bundle.json format 1 was written before the equal-budget recipe (40 slides, 3000 steps each, best-val
# weights); `vstain demo --retrain --export-bundle models/runs` writes format 2 (with split sizes and stage log).
stale_format = pytest.mark.skipif(
    (read_manifest() or {}).get("format_version", 1) < 2,
    reason="models/runs predates the current demo recipe: rebuild with "
           "`vstain demo DIR --retrain --export-bundle models/runs --device cpu`")


@stale_format
def test_bundle_is_fresh_for_this_phantom(manifest):
    # a change to `vstain synth` that changes its pixels makes the bundled runs stale: retrain them
    assert manifest["phantom_version"] == PHANTOM_VERSION
    assert manifest["phantom_fingerprint"] == phantom_fingerprint(), (
        "the phantom's pixels changed since the bundled runs were trained: "
        "run `vstain demo --retrain --export-bundle models/runs` and commit models/runs")


@stale_format
def test_bundle_matches_the_demo_defaults(manifest):
    from vstain_cli.demo import DemoOptions, bundle_mismatch

    assert manifest["recipe"] == DemoOptions().recipe()
    assert bundle_mismatch(DemoOptions()) is None
    assert "other settings" in bundle_mismatch(DemoOptions(tile=64))


def test_bundled_runs_are_small_and_complete(manifest):
    # a format-1 bundle predates the demo's distill stage: it ships the runs its manifest lists
    names = BUNDLED.values() if manifest.get("format_version", 1) >= 2 else manifest["runs"].values()
    for name in names:
        path = bundled_path(name)
        assert path is not None, name
        assert (path / "weights.safetensors").stat().st_size < 8 * 2**20
        assert not (path / "state.pt").exists()
    assert (bundled_path("phantom-diffusion") / "calibration.json").exists()


def test_a_bundled_run_stains_by_name(tmp_path):
    from vstain_cli.data.synth.render import SlideSpec, write_pair

    af, he = tmp_path / "s.af.ome.tif", tmp_path / "s.he.tif"
    write_pair(SlideSpec.random("s", 1, 128, 128, 26, 1.0, 7), af, he, workers=1)
    out = tmp_path / "s.regression.tif"
    proc = run_cli("stain", str(af), "--model", "phantom-regression", "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    img = tifffile.imread(out)
    assert img.shape == (128, 128, 3) and np.asarray(img).std() > 0


def test_a_folder_of_the_same_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "phantom-diffusion").mkdir()
    assert bundled_path("phantom-diffusion") is None


def test_calibrate_never_writes_into_a_bundled_run(tmp_path):
    proc = run_cli("calibrate", "--model", "phantom-diffusion", "--data", str(tmp_path), "--device", "cpu")
    assert proc.returncode == 2 and "bundled run" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_bundle_check_compares_split_sizes_and_the_tilers_output(tmp_path):
    """The check of a bundle against the dataset a demo regenerates (a bundle written here, not the shipped one)."""
    import json

    from tests.conftest import make_tiny_dataset
    from vstain_cli.demo import DemoOptions, bundle_mismatch, split_sizes, tiler_fingerprint

    trained_on = make_tiny_dataset(tmp_path / "a")
    root = tmp_path / "bundle"
    for name in BUNDLED.values():
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text("{}")
    o = DemoOptions(slides=8, size=(256, 256), channels=4)
    manifest = {"format_version": 2, "recipe": o.recipe(), "phantom_seed": 0,
                "phantom_fingerprint": phantom_fingerprint(),
                "dataset": {"splits": split_sizes(trained_on), "index_sha256": tiler_fingerprint(trained_on)}}
    (root / "bundle.json").write_text(json.dumps(manifest))
    assert split_sizes(trained_on)["val"] == {"slides": 2, "patches": 12}
    assert bundle_mismatch(o, trained_on, root) is None
    # the same phantom seed regenerated into other patches: refused in one line naming both
    other = make_tiny_dataset(tmp_path / "b", per_slide=5)
    why = bundle_mismatch(o, other, root)
    assert "differs from the one the bundled runs were trained on" in why and "\n" not in why
    assert "train 4:24" in why and "train 4:20" in why
    # the same split sizes but other patches: the tiler's fingerprint tells
    shuffled = make_tiny_dataset(tmp_path / "c", seed=1)
    assert split_sizes(shuffled) == split_sizes(trained_on)
    (shuffled / "index.csv").write_text((trained_on / "index.csv").read_text().replace(",0,", ",1,", 1))
    assert "index.csv" in bundle_mismatch(o, shuffled, root)
    # a phantom of another seed: its slides are new to the runs, so only the recipe must match
    fresh = DemoOptions(slides=8, size=(256, 256), channels=4, phantom_seed=7)
    assert bundle_mismatch(fresh, other, root) is None
    assert "other settings" in bundle_mismatch(DemoOptions(slides=8, size=(256, 256), channels=4, tile=64,
                                                           phantom_seed=7), other, root)


def test_the_demo_calibrates_unless_told_to_reuse_the_bundled_calibration(tmp_path):
    from vstain_cli.demo import DemoOptions, copy_bundled_runs
    from vstain_cli.errors import InputError

    root = tmp_path / "bundle"
    for name in BUNDLED.values():
        (root / name).mkdir(parents=True)
        for f in ("config.json", "weights.safetensors", "metrics.jsonl"):
            (root / name / f).write_text(f"{name} {f}")
    (root / "phantom-diffusion" / "calibration.json").write_text("{}")
    copy_bundled_runs(tmp_path / "a" / "runs", root=root)
    assert (tmp_path / "a" / "runs" / "stainnet" / "metrics.jsonl").read_text() == "phantom-stainnet metrics.jsonl"
    assert not (tmp_path / "a" / "runs" / "diffusion" / "calibration.json").exists()  # the demo calibrates
    copy_bundled_runs(tmp_path / "b" / "runs", calibration=True, root=root)
    assert (tmp_path / "b" / "runs" / "diffusion" / "calibration.json").read_text() == "{}"
    with pytest.raises(InputError, match="--reuse-bundled-calibration needs the bundled runs"):
        DemoOptions(retrain=True, reuse_bundled_calibration=True).check()
