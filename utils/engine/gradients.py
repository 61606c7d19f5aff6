"""A step's gradients as loss.backward() leaves them, with fewer dispatched operators.

loss.backward() ends every parameter's path in an AccumulateGrad node, which dispatches a detach
for each gradient it stores (62 of a resnet18 step) and, under accumulation, one add_ per
parameter and micro-batch. In a launch-bound step every dispatched operator costs host time, so
the loop asks torch.autograd.grad for the gradients, sums micro-batches with one foreach add and
stores the sums on the parameters itself, keeping AccumulateGrad's two safeguards: a gradient
whose strides differ from its parameter's is copied into the parameter's layout (the fused
optimizer and clipping read them as the parameter), and a gradient that shares memory with
another is copied (clipping and unscaling scale gradients in place, and must not do it twice).
The values are those of backward(): the same graph, the same sums in the same order.
"""
from __future__ import annotations

import torch


class GradientSum:
    """Gradients of the parameters that require them, summed over a step's micro-batches."""

    def __init__(self, parameters):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.sums: list[torch.Tensor | None] = [None] * len(self.parameters)

    def add(self, loss: torch.Tensor) -> None:
        """loss's gradients added to the sums (a parameter loss does not reach keeps its sum)."""
        if not self.parameters:  # nothing to learn (backward() would have nothing to store)
            return
        grads = torch.autograd.grad(loss, self.parameters, allow_unused=True)
        both = [i for i, g in enumerate(grads) if g is not None and self.sums[i] is not None]
        if both:  # one operator for every parameter, instead of one add_ each
            added = torch._foreach_add([self.sums[i] for i in both], [grads[i] for i in both])
            for i, total in zip(both, added):
                self.sums[i] = total
        for i, g in enumerate(grads):
            if g is not None and self.sums[i] is None:
                self.sums[i] = g

    def store(self) -> None:
        """The sums become the parameters' .grad (a parameter without one keeps None)."""
        seen: set[int] = set()
        for param, total in zip(self.parameters, self.sums):
            if total is None:
                continue
            if not _owns_layout(total, param, seen):
                total = torch.empty_like(param).copy_(total)
            seen.add(total.data_ptr())
            param.grad = total


def _owns_layout(grad: torch.Tensor, param: torch.Tensor, seen: set[int]) -> bool:
    """grad can be the parameter's .grad as it is: the parameter's layout, and memory no
    other stored gradient starts at (an empty tensor has no memory to share)."""
    shared = grad.numel() > 0 and grad.data_ptr() in seen
    return same_layout(grad, param) and not shared and grad.dtype == param.dtype


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same strides wherever a dimension has more than one element (a size-1 dimension's
    stride addresses nothing, so AccumulateGrad's layout check ignores it too)."""
    return a.shape == b.shape and all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n > 1)
