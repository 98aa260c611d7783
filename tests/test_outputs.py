"""io/outputs: FileOutput and FolderOutput refuse without --force, never replace another kind, leave nothing on failure."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from vstain_cli.errors import InputError, OutputExistsError
from vstain_cli.io.outputs import FileOutput, FolderOutput, output_format


def _strips(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("failed mid-slide")
        yield np.full((8, 16, 3), 40 * i, np.uint8)


def test_output_format_from_suffix_or_explicit_format(tmp_path):
    assert output_format(tmp_path / "a.tif") == "tiff" and output_format(tmp_path / "a.ome.tiff") == "tiff"
    assert output_format(tmp_path / "a.zarr") == "zarr"
    assert output_format(tmp_path / "stained", "zarr") == "zarr"  # no suffix: --format names it as it is
    with pytest.raises(InputError, match="neither a TIFF"):
        output_format(tmp_path / "y.png")
    with pytest.raises(InputError, match="neither a TIFF"):
        output_format(tmp_path / "stained")
    with pytest.raises(InputError, match="contradicts"):
        output_format(tmp_path / "a.tif", "zarr")


@pytest.mark.parametrize("name", ["slide.tif", "slide.zarr"])
def test_file_output_refuses_without_force_and_a_failure_leaves_the_old_output(tmp_path, name):
    target = FileOutput(tmp_path / name)
    target.check()
    target.write(_strips(2), 16, 16, 3, np.uint8)
    assert target.path.exists()
    with pytest.raises(OutputExistsError, match="--force"):
        FileOutput(tmp_path / name).check()
    again = FileOutput(tmp_path / name, force=True)
    again.check()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RuntimeError):
        again.write(_strips(2, fail_at=1), 16, 16, 3, np.uint8)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp left, the old output kept
    if name.endswith(".tif"):
        assert tifffile.imread(target.path).max() == 40


def test_file_output_never_replaces_a_folder_of_another_kind(tmp_path):
    (tmp_path / "slide.zarr").mkdir()
    (tmp_path / "slide.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an OME-Zarr"):
        FileOutput(tmp_path / "slide.zarr", force=True).check()
    with pytest.raises(InputError, match="is the input"):
        FileOutput(tmp_path / "in.tif").check([tmp_path / "in.tif"])


def test_folder_output_refuses_without_force_replaces_only_its_kind_and_leaves_nothing_on_failure(tmp_path):
    out = FolderOutput(tmp_path / "maps", marker="maps.json")
    out.check()
    with out.publish() as tmp:
        (tmp / "maps.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="--force"):
        FolderOutput(tmp_path / "maps", marker="maps.json").check()
    with pytest.raises(RuntimeError), FolderOutput(tmp_path / "maps", force=True, marker="maps.json").publish() as tmp:
        (tmp / "half.tif").write_bytes(b"x")
        raise RuntimeError("failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps"]  # no temporary folder left
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["maps.json"]  # the old output kept
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.docx").write_text("precious")
    with pytest.raises(InputError, match="holds no maps.json"):
        FolderOutput(tmp_path / "other", force=True, marker="maps.json").check()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        FolderOutput(tmp_path / "file", force=True).check()
