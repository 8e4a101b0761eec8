"""Generation one step at a time: a cache of a module's states and the `step` call that reads
and returns it (CellModule.step, Stack.step).

A step is the module's call on a sequence of one step, from the cache's states: the same
numbers as the full sequence, and on backend cpp the low-latency path (a few rows without
gradients run the kernel's whole-step entry point).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Cache:
    """The states after `steps` steps: {state: [B, ...]} (a Stack's: [layers * directions, B,
    ...], its batch axis 1)."""

    states: dict
    steps: int = 0
    batch_axis: int = 0

    def reorder(self, index: torch.Tensor) -> "Cache":
        """The cache of the batch rows `index` (beam search: each beam's parent row)."""
        return Cache({k: v.index_select(self.batch_axis, index) for k, v in self.states.items()},
                     self.steps, self.batch_axis)

    def detach(self) -> "Cache":
        """The same states cut from the graph (truncated backpropagation through time)."""
        return Cache({k: v.detach() for k, v in self.states.items()}, self.steps,
                     self.batch_axis)


def step(module, inputs, kwargs, cache, batch_axis=0, time_axis=1):
    """module(...) on one step: `inputs` without a time axis ([B, *heads, *decl]; `time_axis`:
    where the module's calls have it); returns (outputs without a time axis, the next Cache)."""
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(f"cache must be the Cache a previous step returned (or None), got "
                        f"{type(cache).__name__}")
    for x in (*inputs, *kwargs.values()):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"step() takes tensors [B, *heads, *decl], got {type(x).__name__}")
    seq = [x.unsqueeze(time_axis) for x in inputs]
    named = {k: v.unsqueeze(time_axis) for k, v in kwargs.items()}
    y, final = module(*seq, **named, initial_state=None if cache is None else cache.states)
    y = (tuple(v.squeeze(time_axis) for v in y) if isinstance(y, tuple) else
         y.squeeze(time_axis))
    return y, Cache(final, (0 if cache is None else cache.steps) + 1, batch_axis)
