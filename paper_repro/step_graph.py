"""Whole-step CUDA graphs: a training step (attack, loss, backward, optimizer step) replayed as one graph.

Why: a ResNet20 PGD-10 step at batch 128 is thousands of small kernels, and on an H200 the GPU waits for
their launches. Our eager loop ran at 1.4x the reference loop there; ``torch.compile(mode="reduce-overhead")``
graphs the network's forward and backward (4.2x) but leaves the attack loop, the BR weight swaps and the
optimizer to Python. Captured whole, a step is one launch (``train.cuda_graph``).

What capture needs, and where it is met:
- fixed inputs: each batch is copied into the tensors the graph reads (``StepGraph.__call__``); a batch of
  another shape (an epoch's last, partial batch) runs eagerly;
- no host syncs and no data-dependent shapes in the step: quantizers use masks, the attack a fixed number
  of steps, the stacked noise keeps its sigma tensor (``stacked.StackedNoise``);
- every generator the step draws from registered with the graph (the attack's, each noise member's), so
  each replay draws the numbers the eager step would;
- values that change between steps live on the device: the learning rate is a tensor that the fused SGD
  reads there (``train.make_optimizer``), set in place by ``train.set_lr``. The BR phase and eta change
  between epochs only, so a graph lives one epoch (``train.train_epoch`` makes one per epoch);
- eager warm-up steps before capture, on a side stream (they make the momentum buffers, the cuDNN plans
  and the generators that noise layers create on first use).
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

#: eager steps before capture: the first makes the momentum buffers and lazily created generators, the
#: second runs with everything in place (what PyTorch's whole-network capture example does with 3, for DDP)
WARMUP_STEPS = 2

Step = Callable[[Tensor, Tensor], Any]


class StepGraph:
    """Calls ``step(x, y)``: eagerly for the first ``warmup`` calls, then captured once and replayed.

    The value returned after capture is the captured step's own return value (same tensor objects), refilled
    by each replay: read it before the next call, as a training loop does. ``generators()`` is asked at
    capture time for every non-default generator the step draws from. With ``fall_back`` a capture that fails
    is reported on stderr (``failure``) and every later call runs eagerly: training goes on at eager speed
    (nothing ran during the failed capture, and the step's Python state is restored by its own ``finally``).
    """

    def __init__(self, step: Step, generators: Callable[[], Sequence[torch.Generator]],
                 warmup: int = WARMUP_STEPS, fall_back: bool = False) -> None:
        if warmup < 1:
            raise ValueError(f"a step graph needs at least one eager warm-up step, got {warmup}")
        self.step, self.generators, self.warmup, self.fall_back = step, generators, warmup, fall_back
        self.eager_steps = 0   # warm-up steps, steps of another shape, steps after a failed capture
        self.replays = 0
        self.failure: str | None = None
        self._inputs: tuple[Tensor, Tensor] | None = None
        self._outputs: Any = None
        self._replay: Callable[[], None] | None = None
        self._side: Any = None  # the warm-up stream, one per graph: the allocator caches blocks per stream

    def __call__(self, x: Tensor, y: Tensor) -> Any:
        if self.failure is not None or (self._replay is None and self.eager_steps < self.warmup):
            self.eager_steps += 1
            return self._warm_up(x, y) if self.failure is None else self.step(x, y)
        if self._replay is None:
            self._inputs = (x.clone(memory_format=torch.preserve_format), y.clone())
            try:
                self._replay, self._outputs = self._capture(lambda: self.step(*self._inputs))
            except Exception as e:
                if not self.fall_back:
                    raise
                self.failure = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(f"warning: the CUDA graph capture of the training step failed ({self.failure}); the steps "
                      f"run eagerly", file=sys.stderr, flush=True)
                self.eager_steps += 1
                return self.step(x, y)
        elif not self._fits(x, y):
            self.eager_steps += 1
            return self.step(x, y)
        else:
            self._inputs[0].copy_(x)
            self._inputs[1].copy_(y)
        self._replay()
        self.replays += 1
        return self._outputs

    def _fits(self, x: Tensor, y: Tensor) -> bool:
        sx, sy = self._inputs
        return x.shape == sx.shape and x.stride() == sx.stride() and x.dtype == sx.dtype and y.shape == sy.shape

    def _warm_up(self, x: Tensor, y: Tensor) -> Any:
        """One eager step on a side stream, as capture wants its warm-up."""
        if self._side is None:
            self._side = torch.cuda.Stream(device=x.device)
        self._side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(self._side):
            out = self.step(x, y)
        torch.cuda.current_stream(x.device).wait_stream(self._side)
        return out

    def _capture(self, run: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        """(replay, outputs): ``run`` captured, not executed; replay executes it on the current stream."""
        graph = torch.cuda.CUDAGraph()
        default = {id(torch.cuda.default_generators[i]) for i in range(torch.cuda.device_count())}
        seen: set[int] = set()
        for g in self.generators():
            if id(g) not in seen and id(g) not in default:
                seen.add(id(g))
                with warnings.catch_warnings():  # newer torch registers lazily: the call is a deprecated no-op there
                    warnings.simplefilter("ignore", category=FutureWarning)
                    warnings.simplefilter("ignore", category=DeprecationWarning)
                    graph.register_generator_state(g)
        with torch.cuda.graph(graph):
            outputs = run()
        return graph.replay, outputs


def step_generators(model: torch.nn.Module, *extra: torch.Generator | None) -> list[torch.Generator]:
    """The generators a training step draws from: ``extra`` (the attack's) and the model's noise generators."""
    return [g for g in extra if g is not None] + list(model.noise_generators())
