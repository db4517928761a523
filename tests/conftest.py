import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_terminal_summary(terminalreporter):
    """Prints what the bound fuzzer tried (tests/test_fuzz.py), so a run shows its coverage."""
    fuzz = sys.modules.get("test_fuzz")
    for name, tally in (getattr(fuzz, "SUMMARY", None) or {}).items():
        terminalreporter.write_line(
            f"{name}: {tally.architectures} random architectures, {tally.samples} samples checked against true "
            f"per-sample gradients, worst true/bound ratio {tally.max_ratio:.6f}"
        )
