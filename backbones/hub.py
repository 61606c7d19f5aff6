"""Preflight of `hf-hub:` encoders: before anything trains, whether each one's weights can be had
(cached, downloadable with the token found, or gated without access), one line per encoder.

Gated pathology encoders take weeks of manual approval; a study that learns of it after the
analysis and the cache has lost the pod's hour. Answers come within PREFLIGHT_SECONDS even with
no network (each check runs in its own thread; a check without an answer says so).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

PREFLIGHT_SECONDS = 20.0
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class HubEncoder:
    licence: str
    gated: bool


# Pathology encoders that timm loads from the Hugging Face Hub (model cards, 2026).
KNOWN_ENCODERS = {
    "bioptimus/H-optimus-0": HubEncoder("Apache-2.0", False),
    "bioptimus/H-optimus-1": HubEncoder("academic research terms of the model card", True),
    "MahmoodLab/UNI2-h": HubEncoder("CC-BY-NC-ND-4.0", True),
    "paige-ai/Virchow2": HubEncoder("CC-BY-NC-ND-4.0", True),
    "prov-gigapath/prov-gigapath": HubEncoder("Apache-2.0", True),
}
UNGATED = "hf-hub:bioptimus/H-optimus-0"  # the ungated alternative a line suggests


def hub_repo(name: str) -> str | None:
    for prefix in ("hf-hub:", "hf_hub:"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def _facts(repo: str) -> str:
    known = KNOWN_ENCODERS.get(repo)
    if known is None:
        return "licence: see its model card"
    return f"licence {known.licence}, {'gated' if known.gated else 'not gated'}"


def _cached(repo: str, need_weights: bool) -> bool:
    from huggingface_hub import try_to_load_from_cache

    def has(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(repo, filename), str)
    return has("config.json") and (not need_weights or any(has(f) for f in WEIGHT_FILES))


def _remedy(repo: str) -> str:
    known = KNOWN_ENCODERS.get(repo)
    if known is not None and not known.gated:
        return "pass --pretrained-file PATH (its weights as a timm state dict)"
    alternative = "" if f"hf-hub:{repo}" == UNGATED else f", or the ungated --backbone {UNGATED}"
    return (f"request access at https://huggingface.co/{repo} and export HF_TOKEN=<token with access>, "
            f"or pass --pretrained-file PATH{alternative}")


def access(name: str, need_weights: bool) -> tuple[bool, str]:
    """(usable, one line) for one hf-hub encoder."""
    from huggingface_hub import auth_check, constants, get_token
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    repo = hub_repo(name)
    head = f"{name} ({_facts(repo)})"
    if _cached(repo, need_weights):
        return True, f"{head}: in the local Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        return False, f"{head}: not cached and HF_HUB_OFFLINE is set: run once online to cache it, or {_remedy(repo)}"
    token = get_token()
    try:
        auth_check(repo, token=token or False)
    except GatedRepoError:
        found = "the token found has no access" if token else "no HF_TOKEN found"
        return False, f"{head}: gated and {found}: {_remedy(repo)}"
    except RepositoryNotFoundError:
        return False, f"{head}: no such repository (or private): check the name"
    except Exception as exc:  # DNS, proxy, timeouts: the Hub is not reachable from here
        return False, f"{head}: the Hub is not reachable ({type(exc).__name__}): run once online, or {_remedy(repo)}"
    return True, f"{head}: downloadable{' with the token found' if token else ''}"


def preflight(names, need_weights: bool, seconds: float = PREFLIGHT_SECONDS) -> list[tuple[bool, str]]:
    """access() of every hf-hub encoder among `names`, all within `seconds`."""
    names = [n for n in dict.fromkeys(names) if hub_repo(n)]
    if not names:
        return []
    pool = ThreadPoolExecutor(max_workers=len(names))
    futures = [pool.submit(access, n, need_weights) for n in names]
    wait(futures, timeout=seconds)
    pool.shutdown(wait=False, cancel_futures=True)  # a hung connection does not hold the run
    return [f.result() if f.done() else (False, f"{n}: no answer from the Hub within {seconds:.0f} s "
                                                f"({os.environ.get('HF_ENDPOINT', 'huggingface.co')}): check the "
                                                f"network, or pass --pretrained-file PATH")
            for n, f in zip(names, futures)]
