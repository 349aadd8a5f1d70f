"""The README's Python API example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_python_api_example_runs(capsys):
    text = README.read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert "torch.Size([1, 16, 21, 8, 8])" in capsys.readouterr().out
