"""--cuda-graphs on: a fold's training step (forward, loss, backward, clipping, optimizer update)
recorded once as a CUDA graph and replayed for every later step: one launch instead of one per
operator (an MMNet step dispatches ~2,240, a single-image step ~390; at 4-10 us a launch that is
9-22 ms of host time per step, more than the GPU work of a small encoder at 32 tuples).

What capture needs, and who sees to it:
- static shapes: with graphs the epoch draws whole batches (preprocess.dataset's tuple count
  rounded up by whole_batches()), so every step has the batch's shape; a step of another shape
  runs eagerly;
- static addresses: the step's inputs are copied into tensors made at capture; gradients are
  unset before every step (set_to_none), so the step allocates them in the graph's pool during
  capture and every replay writes the same memory; the learning rates that the schedule sets on
  the host are copied into device tensors that the captured optimizer reads (one fill per
  parameter group before a replay);
- no host synchronisation inside the step (tests/test_host_syncs.py holds every step to that);
- warm-up: the first steps run eagerly on a side stream (lazy initialisation, cuDNN autotuning,
  the optimizer's state), as torch.cuda.graph requires.
graph_blocker() names what makes capture impossible; the fold says it in one log line and trains
eagerly. A recording is dropped whenever the optimizer's state is replaced (a resume, a replayed
epoch) and made again.
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from utils.device import torch_release

GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before capture (torch's whole-network example)
TENSOR_LR_SINCE = (2, 2)  # fused AdamW's tensor learning rate (pytorch#106916, Aug 2023): older releases refused, not risked


def graph_blocker(requested: str, device: str, amp_dtype: str, accumulation: int) -> str:
    """Why the training step cannot be captured here ('' when it can, or when not asked for)."""
    reasons = [(requested != "on", ""),
               (device != "cuda", f"CUDA graphs need a CUDA device (this run: {device})"),
               (amp_dtype == "float16", "the fp16 loss scaler reads the gradients' finiteness on the host"),
               (accumulation > 1, f"a step of {accumulation} micro-batches (gradient accumulation) has no single shape"),
               (torch_release() < TENSOR_LR_SINCE, f"torch {torch.__version__} has no tensor learning rate in fused AdamW (2.2+)")]
    return next((reason for blocked, reason in reasons if blocked), "")


def evaluation_graphs(requested: str, device: str, sample_mode: str) -> bool:
    """Whether evaluation forwards are recorded: asked for, on CUDA, and of one shape per batch
    (tuples, padded batches; a MIL bag's width changes with its patient). fp16 and accumulation
    do not matter here: no loss scaler and no optimizer run in evaluation."""
    return requested == "on" and device == "cuda" and sample_mode != "bag"


def graph_bucket(count: int) -> int:
    """Tuples a predictor's recording holds for a patient of `count`: the next power of two from
    16, so a few recordings serve every patient size and padding at most doubles the work."""
    return max(16, 1 << (count - 1).bit_length())


def whole_batches(count: int, batch_size: int) -> int:
    """The epoch's tuple count rounded up to whole batches: every step has the same shape."""
    return -(-count // batch_size) * batch_size


class CudaRecorder:
    """Warm-up on a side stream, capture into a torch.cuda.CUDAGraph, replay."""

    def __init__(self):
        self.graph, self.outputs, self.side = None, None, torch.cuda.Stream()

    def eager(self, fn, inputs):
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            outputs = fn(*inputs)
        torch.cuda.current_stream().wait_stream(self.side)
        return outputs

    def capture(self, fn, inputs) -> None:
        """Records fn on the static inputs; nothing runs until replay()."""
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*inputs)

    def replay(self):
        self.graph.replay()
        return self.outputs  # the same tensors every time, overwritten by each replay


class EagerRecorder:
    """Stands in for CudaRecorder where there is no GPU (the tests): capture keeps the function and
    a replay runs it again on the same static inputs, so everything around the graph (the static
    copies, the learning-rate tensors, gradients left to backward, the shapes) runs as with CUDA."""

    def __init__(self):
        self.fn, self.inputs = None, None

    def eager(self, fn, inputs):
        return fn(*inputs)

    def capture(self, fn, inputs) -> None:
        self.fn, self.inputs = fn, inputs

    def replay(self):
        return self.fn(*self.inputs)


class GraphedStep:
    """fn(*inputs) eager for the first GRAPH_WARMUP_STEPS calls, then recorded once and replayed;
    a call of other shapes runs eagerly. With an optimizer, its learning rates reach the
    recording through device tensors refreshed before each replay."""

    def __init__(self, fn, optimizer: torch.optim.Optimizer | None, recorder):
        self.fn, self.recorder = fn, recorder
        self.groups = optimizer.param_groups if optimizer is not None else []  # the same list the schedule writes
        self.calls, self.static, self.learning_rates = 0, None, []

    def __call__(self, *inputs):
        if self.static is not None and _shapes(inputs) != _shapes(self.static):
            return self.fn(*inputs)
        if self.calls < GRAPH_WARMUP_STEPS:
            self.calls += 1
            return self.recorder.eager(self.fn, inputs)
        if self.static is None:
            self.static = [x.clone() for x in inputs]
            self.learning_rates = [torch.full((), float(g["lr"]), device=self.static[0].device) for g in self.groups]
            with self._capturable():
                self.recorder.capture(self.fn, self.static)
        else:
            for static, x in zip(self.static, inputs):
                static.copy_(x)
        for rate, group in zip(self.learning_rates, self.groups):
            rate.fill_(group["lr"])  # the schedule's rate for this step, without a host copy
        with self._capturable():  # the stand-in recorder runs the optimizer here
            return self.recorder.replay()

    @contextlib.contextmanager
    def _capturable(self):
        """The optimizer reads the device learning rates (capturable) while recorded or replayed;
        between steps its groups hold the host floats the schedule and checkpoints use."""
        saved = [(g["lr"], g.get("capturable", False)) for g in self.groups]
        for group, rate in zip(self.groups, self.learning_rates):
            group["lr"], group["capturable"] = rate, True
        try:
            yield
        finally:
            for group, (rate, capturable) in zip(self.groups, saved):
                group["lr"], group["capturable"] = rate, capturable


_EVALUATION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {input shapes: GraphedStep}
_EVALUATION_RECORDER = [None]  # a recorder factory that replaces new_recorder() (evaluation_recorder)


@contextlib.contextmanager
def evaluation_recorder(factory):
    """Evaluation recordings first made inside use factory() instead of new_recorder(): the
    benchmark counts a replay as the one launch it is on CUDA (utils.study.rates.OneLaunchRecorder)."""
    _EVALUATION_RECORDER[0] = factory
    try:
        yield
    finally:
        _EVALUATION_RECORDER[0] = None


def recorded_forward(model: torch.nn.Module, forward, inputs: tuple, variant: tuple = ()):
    """forward(model, *inputs) for evaluation (no gradients, eval mode), recorded per model and
    input shapes like the training step (eager warm-up calls, then one recording replayed).
    Weights, BatchNorm statistics and the stain reference are read from their own memory at
    every replay, so in-place updates (the optimizer, the moving average, settling, a loaded
    checkpoint) reach it. `variant` names what else makes forward record other work (test-time
    views or not, the amp dtype). The returned tensors are the recording's own outputs: read them
    before the next call with the same key. The recordings die with the model (weakly held)."""
    steps = _EVALUATION.setdefault(model, {})
    key = (tuple(_shapes(inputs)), variant)
    if key not in steps:
        owner = weakref.ref(model)  # the recording must not keep its model alive
        recorder = (_EVALUATION_RECORDER[0] or new_recorder)(inputs[0].device.type)
        steps[key] = GraphedStep(lambda *xs: forward(owner(), *xs), None, recorder)
    return steps[key](*inputs)


def _shapes(tensors) -> list:
    return [(tuple(t.shape), t.dtype) for t in tensors]


def new_recorder(device: str):
    """CudaRecorder on CUDA; the eager stand-in elsewhere (only tests ask for it off CUDA)."""
    return CudaRecorder() if device == "cuda" else EagerRecorder()
