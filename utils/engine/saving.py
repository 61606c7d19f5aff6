"""What a fold writes while it trains: checkpoint files (atomic, on a background thread, so the
loop never waits on disk) and, with --tensorboard, per-epoch scalars."""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from utils.files import atomic_write_bytes


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


def scalar_writer(cfg, experiment: str, fold: int):
    """TensorBoard's writer for one experiment x fold, or None without --tensorboard."""
    if not cfg.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter  # optional package: imported only when asked for

    return SummaryWriter(log_dir=str(Path(cfg.output_dir) / "tensorboard" / experiment / f"fold{fold}"))
