"""What a run costs, measured the same way for training and evaluation: peak memory, parameter
counts (tokens and items per second are computed by the callers).

Peak memory is measured over the task alone: on CUDA the allocator's peak since a reset; on CPU
the process's peak resident set since the kernel's high-water mark was reset (Linux
/proc/self/clear_refs), or, where that is not allowed, the peak since the process started.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> str:
    """Start a new peak; returns what will be measured: cuda_allocated, rss or rss_process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)
        return "rss"
    except OSError:
        return "rss_process"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parameters(model, trainable: int | None = None) -> dict:
    """Total parameters of the model as evaluated, and trainable ones: `trainable` when the caller
    knows what training updated (a stage's LoRA adapter, say), else those that require grad."""
    total = sum(p.numel() for p in model.parameters())
    if trainable is None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total_params": int(total), "trainable_params": int(trainable)}
