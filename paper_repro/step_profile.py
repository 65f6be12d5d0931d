"""Where a training step's time goes: kernels per step and how much of the step the device is busy.

Why: on an H200 a ResNet20 PGD-10 step captured as one CUDA graph ran at 7.4x the baseline, short of the
10x asked. Whether launches or the kernels themselves are what is left decides what can help: when the
device is busy for nearly the whole step, only fewer or faster kernels can; when it idles, graphs and fusion
can. ``bench --profile N`` (and gpu-check's bench part) runs N more steps of each timed loop under
``torch.profiler`` and reports, per step: the kernels (on a CPU: the outermost aten calls, backward and
optimizer included), the time the device was busy (the union of their intervals, so overlapping kernels count
once) and the wall time (profiling adds overhead: compare the busy share, not the wall time, with the timed rows).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time during which at least one of them runs."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _inside_aten(event) -> bool:
    """Whether an aten call runs inside another (an op's own sub-ops); backward and optimizer ops sit under
    autograd and Optimizer.step events, not under aten ones, and count."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def profile_steps(steps: Iterator[int], n_steps: int, device: torch.device) -> dict[str, float | int | str]:
    """Run ``n_steps`` more steps of a (warmed-up) loop under the profiler: kernels, busy and wall ms per step."""
    if n_steps < 1:
        raise ValueError(f"profile at least one step, got {n_steps}")
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            next(steps)
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    wall_us = max(e.time_range.end for e in events) - min(e.time_range.start for e in events) if events else 0.0
    if cuda:
        work = [e for e in events if e.device_type == DeviceType.CUDA]
        unit = "CUDA kernels and copies"
    else:
        work = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
                and not _inside_aten(e)]
        unit = "outermost aten operator calls"
    busy = busy_us([(e.time_range.start, e.time_range.end) for e in work])
    return {"steps": n_steps, "counted": unit, "kernels_per_step": round(len(work) / n_steps, 1),
            "busy_ms_per_step": round(busy / n_steps / 1000, 3), "wall_ms_per_step": round(wall_us / n_steps / 1000, 3),
            "busy_pct": round(100 * busy / wall_us, 1) if wall_us else 0.0}
