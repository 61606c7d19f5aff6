"""Seeding, checkpoint files written atomically (on a background thread), graceful stop."""
from __future__ import annotations

import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from utils.files import atomic_write_bytes


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and every GPU) from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def derived_seed(*parts: int) -> int:
    """A stable 63-bit seed from several integers (seed, fold, epoch...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
               .astype(np.uint64).dot([1, 2**32]) % (2**63 - 1))


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """torch.save of tensors and plain values only, so weights_only=True can read it back."""
    return atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def snapshot(obj):
    """Deep copy with every tensor cloned to the CPU: safe to serialise while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class BackgroundWriter:
    """Writes checkpoints on one background thread so the training loop never waits on disk.

    Writes happen in order (a new one first waits for the previous one); call wait() before
    relying on the files. An error in the writer is raised by the next submit() or wait().
    `save` is the function that writes one file (save_checkpoint unless a test swaps it).
    """

    def __init__(self, save=None):
        self._thread = None
        self._error = None
        self._save = save or save_checkpoint

    def submit(self, items: list) -> None:
        """items: [(state, path), ...], written in that order on the background thread."""
        self.wait()
        frozen = [(snapshot(state), path) for state, path in items]
        self._thread = threading.Thread(target=self._write, args=(frozen,), daemon=False)
        self._thread.start()

    def _write(self, items: list) -> None:
        for state, path in items:
            try:
                self._save(state, path)
            except Exception as exc:  # a full disk surfaces as OSError or as torch's RuntimeError
                self._error = OSError(f"could not write {path} ({type(exc).__name__}: {str(exc)[:120]}); "
                                      f"free disk space there or pass another --output-dir, then rerun "
                                      f"the same command to resume")
                return

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


# ---------------------------------------------------------------- graceful stop
class StopRequested(Exception):
    """SIGTERM/SIGINT arrived: the current step finished and its state was saved."""


_STOP = {"signal": ""}


def _on_signal(signum, frame) -> None:
    if _STOP["signal"] and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, lose at most this epoch
    _STOP["signal"] = signal.Signals(signum).name


def install_stop_handlers() -> None:
    """SIGTERM (a pod being stopped) and SIGINT ask the loop to stop after the current step."""
    _STOP["signal"] = ""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def stop_requested() -> str:
    """Name of the signal that asked to stop, or '' while none did."""
    return _STOP["signal"]


def clear_stop() -> None:
    _STOP["signal"] = ""


def scalar_writer(cfg, experiment: str, fold: int):
    """TensorBoard's writer for one experiment x fold, or None without --tensorboard."""
    if not cfg.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter  # optional package: imported only when asked for

    return SummaryWriter(log_dir=str(Path(cfg.output_dir) / "tensorboard" / experiment / f"fold{fold}"))
