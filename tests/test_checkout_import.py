"""Importing graphrunner from a source checkout that has no built native core says so (CPU only)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_checkout_without_a_built_core_names_it_and_the_two_fixes():
    if any((ROOT / "graphrunner").glob("_C*.so")):
        pytest.skip("this checkout holds a native core built in place (build_ext --inplace): the source tree imports")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    proc = subprocess.run([sys.executable, "-c", "import graphrunner"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: graphrunner was imported from its source checkout "
                              f"{ROOT}, which holds no built native core"), proc.stderr
    assert "run from another directory, or with `python -P`" in message
    assert f"`python setup.py build_ext --inplace` in {ROOT}" in message
    assert "did not load with torch" not in message  # not the broken-install diagnosis
