"""The pod the user rents: the torch its image ships (served from 2.1, refused below in one
line by setup.sh before pip), the old torch names served, the optimizer the torch has, the
weights --pretrained auto wants on each device, the start-up checks of main, and the GPU check
script on a machine without a GPU."""
import dataclasses
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from config import Config
from tests.conftest import ROOT


def _fake_tool(folder, name, script):
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_setup_stops_when_a_gpu_is_there_but_torch_cannot_use_it(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "nvidia-smi", 'case "$1" in --query-gpu*) echo 470.57.02;; *) echo "| CUDA Version: 11.4 |";; esac\n')
    calls = tmp_path / "python_calls.txt"
    python = _fake_tool(bin_dir, "python-spy", f'echo "$@" >> {calls}\nexec {sys.executable} "$@"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(python)}
    result = subprocess.run(["bash", "setup.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if torch.cuda.is_available():
        pytest.skip("this machine's torch can use a GPU")
    assert result.returncode != 0
    assert "driver 470.57.02" in result.stderr and "CUDA 11.4" in result.stderr and "nothing was installed" in result.stderr
    assert "pip" not in calls.read_text()


def _main(*argv, env=None):
    return subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_wanted_weights_offline_stop_the_run_with_one_line(tmp_path):
    result = _main("--dry-run", "--pretrained", "on", "--output-dir", str(tmp_path / "out"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
    assert "--pretrained-file" in lines[0] and "--pretrained off" in lines[0]
    assert not (tmp_path / "out" / "runs").exists()


def test_a_full_study_without_a_gpu_stops_at_start(tmp_path, demo_tree):
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a GPU")
    # A data folder that holds images: a missing one is named first (tests/test_first_run.py).
    # A small backbone: the estimate is measured the same way, in seconds instead of half a minute.
    result = _main("--data-dir", str(demo_tree), "--output-dir", str(tmp_path / "out"), "--backbone", "test_resnet",
                   "--image-size", "48")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "--device cpu" in lines[0] and "--dry-run" in lines[0] and " min " in lines[0]


def test_an_old_torch_without_the_new_names_is_served(monkeypatch):
    """torch before 2.4 has no torch.OutOfMemoryError and before 2.3 no torch.amp.GradScaler:
    the back-off and the scaler use torch.cuda's classes there."""
    from utils import device

    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    monkeypatch.delattr(torch.amp, "GradScaler", raising=False)
    assert device.out_of_memory_error() is torch.cuda.OutOfMemoryError
    assert device.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not device.is_out_of_memory(ValueError("out of memory"))
    scaler = device.grad_scaler("cpu", enabled=True)
    assert isinstance(scaler, torch.cuda.amp.GradScaler) and not scaler.is_enabled()


def test_the_optimizer_is_fused_where_torch_has_the_kernel_and_multi_tensor_where_not(monkeypatch):
    """torch < 2.4 has no fused AdamW on the CPU (< 2.5 on MPS): the constructor refuses it,
    and the optimizer falls back to the multi-tensor update with the same settings."""
    from utils.engine.optimizer import has_fused_adamw, make_optimizer

    cfg = Config(lr=2e-3, weight_decay=0.05)
    model = torch.nn.Linear(3, 2)
    assert bool(make_optimizer(model, cfg).defaults["fused"]) == has_fused_adamw("cpu")  # torch >= 2.4
    real = torch.optim.AdamW

    def old_adamw(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", old_adamw)
    optimizer = make_optimizer(model, cfg)
    assert optimizer.defaults["foreach"] and not optimizer.defaults["fused"]
    assert optimizer.param_groups[0]["lr"] == 2e-3 and optimizer.defaults["weight_decay"] == 0.05
    monkeypatch.setattr(torch.optim, "AdamW", real)
    monkeypatch.setattr(torch, "__version__", "2.1.2+cu121")  # accepts fused=True on the CPU, fails at step()
    optimizer = make_optimizer(model, cfg)
    assert not optimizer.defaults["fused"]
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()


def _stub_torch(tmp_path, version: str) -> dict:
    """A PYTHON that sees a stub torch reporting `version`, and records pip instead of running it."""
    stub = tmp_path / "stub"
    for name in ("torch", "torchvision"):
        (stub / name).mkdir(parents=True)
        (stub / name / "__init__.py").write_text(
            f"__version__ = '{version}+cu121'\nclass cuda:\n    @staticmethod\n    def is_available():\n        return False\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "pip_calls.txt"
    python = _fake_tool(bin_dir, "python-stub", f'case "$*" in *"-m pip"*) echo "$@" >> {calls}; exit 0;; esac\n'
                                                f'PYTHONPATH={stub} exec {sys.executable} "$@"\n')
    return {"env": {**os.environ, "PYTHON": str(python), "PATH": f"{bin_dir}:{os.environ['PATH']}"}, "calls": calls}


def test_setup_refuses_a_torch_below_the_floor_in_one_line_before_pip(tmp_path):
    stub = _stub_torch(tmp_path, "2.0.1")
    result = subprocess.run(["bash", "setup.sh"], cwd=ROOT, env=stub["env"], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "torch 2.0.1 found" in lines[0] and "floor torch 2.1" in lines[0] and "nothing was installed" in lines[0]
    assert not stub["calls"].exists()  # pip never ran


def test_setup_installs_a_torch_2_2_image_with_the_numpy1_pins(tmp_path):
    stub = _stub_torch(tmp_path, "2.2.0")
    result = subprocess.run(["bash", "setup.sh"], cwd=ROOT, env=stub["env"], capture_output=True, text=True, timeout=120)
    pip = stub["calls"].read_text()
    assert "-r requirements.runpod" in pip and "-c constraints-numpy1.txt" in pip, result.stdout + result.stderr
    assert "numpy<2" in (ROOT / "constraints-numpy1.txt").read_text()
    newer = _stub_torch(tmp_path / "newer", "2.8.0")
    subprocess.run(["bash", "setup.sh"], cwd=ROOT, env=newer["env"], capture_output=True, text=True, timeout=120)
    assert "constraints" not in newer["calls"].read_text()  # torch 2.3+: NumPy 2 is fine


@pytest.mark.parametrize("device, expected", [("cuda", "on"), ("mps", "on"), ("cpu", "off")])
def test_pretrained_auto_wants_imagenet_weights_wherever_the_full_study_trains(device, expected):
    """The same command on a pod (CUDA) and on a Mac (MPS) runs the same study; the run header
    names the weights."""
    from utils.device import detect_env, resolved_config
    from utils.study.pipeline import weights_text

    env = dataclasses.replace(detect_env(Config(device="cpu")), device=device)
    cfg = resolved_config(Config(pretrained="auto"), env)
    assert cfg.pretrained == expected
    assert weights_text(cfg) == ("ImageNet (timm hub)" if expected == "on" else "random init (--pretrained off)")
    assert resolved_config(Config(pretrained="off"), env).pretrained == "off"
    assert weights_text(resolved_config(Config(pretrained_file="w.pth"), env)) == "ImageNet from w.pth"


HIDE_GRAD_CAM = """
import importlib.abc, os, sys
class Hide(importlib.abc.MetaPathFinder):  # grad-cam is not installed here, unless in the check's deps
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pytorch_grad_cam" and not any(
                os.path.isdir(os.path.join(p, "pytorch_grad_cam")) for p in sys.path if p.endswith("deps")):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
"""


def _wheel(folder, name: str, version: str, module: str, text: str):
    """A pure-Python wheel made by hand: what `pip download` puts in the wheel folder."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {f"{module}/__init__.py": text, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as wheel:
        for path, content in files.items():
            wheel.writestr(path, content)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run for minutes")
def test_the_gpu_check_installs_what_is_missing_offline_then_stops_without_a_gpu(tmp_path):
    """A rehearsal of the offline GPU machine: grad-cam missing, pip's index an empty folder; the
    check installs grad-cam from the wheel folder (into its own deps), reaches its CUDA test and
    exits non-zero without a GPU."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_GRAD_CAM)
    _wheel(tmp_path / "wheels", "grad-cam", "1.5.7", "pytorch_grad_cam", "SOURCE = 'the wheel folder'\n")
    (tmp_path / "empty_index").mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PIP_INDEX_URL": (tmp_path / "empty_index").as_uri()}
    result = subprocess.run(["bash", str(ROOT / "tests" / "gpu_check.sh"), str(tmp_path / "out"), str(tmp_path / "wheels")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 2, result.stdout + result.stderr
    assert "installing from" in lines[0] and "grad-cam==1.5.7" in lines[0] and "no CUDA GPU" in lines[1]
    assert "the wheel folder" in (tmp_path / "out" / "deps" / "pytorch_grad_cam" / "__init__.py").read_text()
    checked = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert checked["gpu"] is False and checked["deps"]["installed"] == "grad-cam==1.5.7"


def test_the_gpu_check_without_torch_stops_in_one_line(tmp_path):
    import venv

    venv.create(tmp_path / "bare", with_pip=False)  # a Python without torch
    bare = {**os.environ, "PYTHON": str(tmp_path / "bare" / "bin" / "python")}
    result = subprocess.run(["bash", str(ROOT / "tests" / "gpu_check.sh"), str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=bare)
    assert result.returncode == 2 and len(result.stdout.strip().splitlines()) == 1
    assert "torch is not importable" in result.stdout
