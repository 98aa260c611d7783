"""Atomic outputs, fingerprints, provenance records."""

from __future__ import annotations

import pytest

from vstain_cli.errors import InputError, OutputExistsError
from vstain_cli.provenance import atomic_output, check_output_file, fingerprint, record, write_json


def test_atomic_output_renames_on_success_and_cleans_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"abc")
        assert not target.exists()
    assert target.read_bytes() == b"abc"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError
    assert target.read_bytes() == b"abc" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_fingerprint_changes_with_content(tmp_path):
    f = tmp_path / "a"
    f.write_bytes(b"x" * 3_000_000)
    a = fingerprint(f)
    f.write_bytes(b"x" * 2_999_999 + b"y")
    assert fingerprint(f)["sha256_head_tail"] != a["sha256_head_tail"]
    with pytest.raises(InputError, match="cannot read"):
        fingerprint(tmp_path / "missing")


def test_output_checks(tmp_path):
    src = tmp_path / "in.tif"
    src.write_bytes(b"1")
    with pytest.raises(InputError, match="is the input"):
        check_output_file(src, force=True, inputs=[src])
    out = tmp_path / "o.tif"
    out.write_bytes(b"")
    with pytest.raises(OutputExistsError, match="--force"):
        check_output_file(out, force=False)
    assert check_output_file(out, force=True) == out


def test_record_has_config_and_software(tmp_path):
    r = record({"a": 1}, {"x": {"bytes": 1}})
    assert r["config"] == {"a": 1} and r["software"]["vstain"] and r["inputs"]["x"]["bytes"] == 1
    write_json(tmp_path / "r.json", r)
    assert (tmp_path / "r.json").read_text().startswith("{")
