"""The preflight of hf-hub encoders: one line each, before anything trains, whatever the network."""
import threading

import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError

import backbones.hub as hub

UNI, HOPT = "hf-hub:MahmoodLab/UNI2-h", "hf-hub:bioptimus/H-optimus-0"


@pytest.fixture
def online(monkeypatch):
    """The Hub reachable as far as the library knows (the tests replace the calls themselves)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_cached", lambda repo, need_weights: False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)


def test_only_hub_encoders_are_checked():
    assert hub.preflight(["resnet18", "vit_small_patch16_224"], need_weights=True) == []


def test_offline_and_not_cached_says_what_to_do(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_cached", lambda repo, need_weights: False)
    (ok, line), = hub.preflight([UNI], need_weights=True)
    assert not ok and "\n" not in line
    assert "CC-BY-NC-ND-4.0" in line and "gated" in line and "HF_HUB_OFFLINE" in line
    assert "--pretrained-file" in line and HOPT in line  # the ungated alternative


def test_gated_without_token(online, monkeypatch):
    response = type("Response", (), {"headers": {}, "request": None})()  # what the error reads of one

    def gated(repo, token=None):
        raise GatedRepoError("403 gated", response=response)
    monkeypatch.setattr(huggingface_hub, "auth_check", gated)
    (ok, line), = hub.preflight([UNI], need_weights=True)
    assert not ok and "no HF_TOKEN found" in line and "HF_TOKEN=" in line


def test_cached_encoder_is_usable_without_network(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_cached", lambda repo, need_weights: True)
    (ok, line), = hub.preflight([HOPT], need_weights=True)
    assert ok and "Apache-2.0" in line and "not gated" in line


def test_a_hung_connection_is_answered_within_the_budget(online, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(huggingface_hub, "auth_check", lambda repo, token=None: release.wait(30))
    try:
        answers = hub.preflight([UNI, HOPT], need_weights=True, seconds=0.3)
    finally:
        release.set()
    assert [ok for ok, _ in answers] == [False, False]
    assert all("no answer from the Hub within" in line for _, line in answers)


def test_main_stops_before_training(tmp_path, monkeypatch, capsys):
    import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_cached", lambda repo, need_weights: False)
    code = main.main(["--dry-run", "--backbones", f"resnet10t,{UNI}", "--freeze-backbone",
                      "--output-dir", str(tmp_path / "out")])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1 and UNI in errors[0]
    assert not (tmp_path / "out" / "encoders").exists()  # nothing ran, not even the first encoder
