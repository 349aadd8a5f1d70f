"""The README's Python API example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_python_api_example_runs(capsys):
    text = README.read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.split("\n")
    assert printed[:3] == ["torch.Size([1, 16, 21, 8, 8])", "torch.Size([1, 16, 20, 8, 8])",
                           "torch.Size([1, 16, 9, 8, 8])"], printed
