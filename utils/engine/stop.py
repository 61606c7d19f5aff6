"""Graceful stop: SIGTERM (a pod being stopped) or Ctrl-C asks the loop to stop after the
current step; the fold saves its state and the same command resumes it."""
from __future__ import annotations

import signal


class StopRequested(Exception):
    """SIGTERM/SIGINT arrived: the current step finished and its state was saved."""


_STOP = {"signal": ""}


def _on_signal(signum, frame) -> None:
    if _STOP["signal"] and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, lose at most this epoch
    _STOP["signal"] = signal.Signals(signum).name


def install_stop_handlers(clear: bool = True) -> None:
    """SIGTERM (a pod being stopped) and SIGINT ask the loop to stop after the current step.
    clear=False keeps a stop already asked for (handlers put back after a library replaced them)."""
    if clear:
        _STOP["signal"] = ""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def stop_requested() -> str:
    """Name of the signal that asked to stop, or '' while none did."""
    return _STOP["signal"]


def clear_stop() -> None:
    _STOP["signal"] = ""


def request_stop(reason: str) -> None:
    """Ask the loop to stop after the current step as a signal would: a long-lived worker hears
    its driver's stop this way (Ray delivers a method call, not a signal)."""
    _STOP["signal"] = _STOP["signal"] or reason
