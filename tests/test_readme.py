"""The README's quick start runs as written (with fewer epochs), in a fresh interpreter as a user would run it."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_quick_start_runs(tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "epochs=30" in code
    script = tmp_path / "quick_start.py"
    script.write_text(code.replace("epochs=30", "epochs=2"))
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}  # as on a user's machine
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global sensitivity" in done.stdout and "differentially private" in done.stdout
