"""The README's quick start runs as written (with fewer epochs)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_quick_start_runs(capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "epochs=30" in code
    exec(compile(code.replace("epochs=30", "epochs=2"), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "global sensitivity" in printed and "differentially private" in printed
