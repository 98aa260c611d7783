"""The README's Python API example, run as written (in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

import openslide

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(python_api_example(), "README.md", "exec"), {"__name__": "readme"})
    slide = openslide.OpenSlide(str(tmp_path / "stained.tif"))
    assert slide.dimensions == (256, 256)
    assert "stained.tif" in capsys.readouterr().out
