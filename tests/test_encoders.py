"""Any timm encoder as MMNet branches and baselines: a CNN, a vision transformer (tokens) and
an NHWC model, at a rectangular frame; Grad-CAM from a transformer branch; hf-hub names."""
import subprocess
import sys

import pytest
import torch

from backbones import build_model, list_models
from backbones.encoder import feature_map, map_channels
from backbones.our.gradcam import cam_maps
from tests.conftest import ROOT, tiny_config

ENCODERS = ("test_resnet", "test_vit", "test_mambaout")  # NCHW maps, tokens, NHWC maps
FRAME = (48, 73)  # frame_shape(48): the 700x460 aspect, not a multiple of the ViT patch


def _model(backbone: str, name: str):
    mags = (40,) if name == "single" else (40, 100, 200, 400)
    torch.manual_seed(0)
    return build_model(tiny_config(".", backbone=backbone, model=name, image_size=FRAME[0], magnifications=mags))


@pytest.mark.parametrize("backbone", ENCODERS)
def test_every_encoder_gives_nchw_maps(backbone):
    model = _model(backbone, "single")
    maps = feature_map(model.backbone, torch.randn(2, 3, *FRAME))
    assert maps.ndim == 4 and maps.shape[:2] == (2, map_channels(model.backbone))
    assert maps.shape[2] >= 1 and maps.shape[3] > maps.shape[2]  # a landscape frame gives a landscape map


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("backbone", ENCODERS)
def test_models_train_on_every_encoder(backbone, name):
    model = _model(backbone, name)
    for module in model.modules():  # timm zero-inits the last BN gamma of residual blocks: a
        if isinstance(module, torch.nn.BatchNorm2d):  # connectivity check needs them non-zero
            torch.nn.init.ones_(module.weight)
    slots = len(model.magnifications)
    x, mask = torch.randn(3, slots, 3, *FRAME), torch.ones(3, slots)
    out = model(x, mask)
    assert out.logits.shape == (3,) and torch.isfinite(out.logits).all()
    (out.logits.sum() + out.subtype_logits.sum()).backward()
    silent = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not silent, silent
    if slots > 1:  # what a masked slot holds cannot change the output
        model.eval()
        mask[:, 2] = 0
        other = x.clone()
        other[:, 2] = torch.randn_like(other[:, 2]) * 5
        with torch.no_grad():
            assert torch.allclose(model(x, mask).logits, model(other, mask).logits, atol=1e-5)


def test_gradcam_of_a_transformer_branch_lies_in_unit_range():
    model = _model("test_vit", "mmnet")
    x, mask = torch.randn(1, 4, 3, *FRAME), torch.ones(1, 4)
    maps = cam_maps(model, x, mask, "gradcam", target=1)
    assert maps.shape == (4, *FRAME) and maps.min() >= 0 and maps.max() <= 1 and maps.max() > 0


def test_hf_hub_name_offline_is_one_line_naming_the_weights_file(tmp_path):
    result = subprocess.run([sys.executable, "main.py", "--dry-run", "--backbone", "hf-hub:org/name",
                             "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--pretrained-file" in lines[0]
