"""The one rule that turns every script's --device (auto, cpu, cuda, cuda:N) into a torch.device.

A module of its own, importing nothing of the project, so that macenko_gpu.py (kept free of the project's other
modules by design) follows the same rule as train.py, evaluate.py, bench.py and patch_cache.py, which call it through
common.resolve_device (that turns the ValueError into the scripts' DataError).

    device = devices.resolve_device("auto")            # cuda when available, else cpu
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for the annotation: torch is imported where a device is resolved (below)
    import torch


def resolve_device(name=None, local_rank: int = 0) -> torch.device:
    """None or auto (cuda when available, else cpu), cpu, cuda (cuda:LOCAL_RANK, the process's GPU under torchrun)
    or cuda:N; a torch.device passes through the same checks. A bad name is a ValueError naming --device."""
    # torch is imported here, not at the top: common imports this module, and the audit and the launcher's split-flag
    # read (common, splits, no tensors) would otherwise pay torch's import, ~4 s per process, at every job start.
    import torch
    name = "auto" if name is None else str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
