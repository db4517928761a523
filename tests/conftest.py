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


def _split_cpu_for_distribution_tests():
    """Two logical CPU devices for the MirroredStrategy tests (tests/test_distribute.py).

    Logical devices must be set before TensorFlow initialises its devices, so
    this runs when pytest loads this file, before any test module.
    """
    from lipdp import distribute

    distribute.split_cpu(2)


_split_cpu_for_distribution_tests()
