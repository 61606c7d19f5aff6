"""The stages read one way: no import cycle, and the report never loads torch or a model."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT

STRUCTURE = ROOT.parent / "shared" / "tools" / "structure.py"


def test_report_stage_never_imports_torch():
    code = ("import sys; import utils.report.build, utils.report.tables, utils.report.plottings, utils.metrics, config; "
            "print(sorted(m for m in ('torch', 'timm', 'backbones') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_analysis_and_config_start_without_torch():
    code = "import sys; import preprocess.analyze, config, utils.env; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


def test_no_import_cycle_and_small_functions():
    if not STRUCTURE.is_file():
        pytest.skip("../shared/tools/structure.py not available")
    result = subprocess.run([sys.executable, str(STRUCTURE)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "import cycles 0" in result.stdout, result.stdout
    assert result.returncode == 0, result.stdout
