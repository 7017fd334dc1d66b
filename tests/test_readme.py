"""The README's example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_layer_example_runs(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(b for b in blocks if "MoEConfig" in b)
    exec(compile(example, "README.md", "exec"), {})
    assert "torch.Size([2, 16, 512])" in capsys.readouterr().out
