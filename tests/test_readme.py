"""The README's Python example runs as written (the shipped model and phantoms, on the CPU)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    """The first ``python`` block of the README's "In Python" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## In Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's 'In Python' section has no python block"
    return blocks[0]


def test_readme_python_example_runs(tmp_path):
    code = python_example()
    assert "gym.make_vec" in code and "card.score" in code and "agent.learn" in code
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = dict(re.findall(r"^(pretrained|aligned): ([0-9.]+)$", proc.stdout, flags=re.M))
    assert set(scores) == {"pretrained", "aligned"}, proc.stdout
    assert all(0.0 <= float(v) <= 1.0 for v in scores.values())
