"""The model inside a DDP or torch.compile wrapper.

accelerate's `extract_model_from_parallel` also looks for compiled regions by walking every
submodule, which cost ~7 ms per UNet call on the toy UNet (7% of a DDPO epoch); the trainer
calls this on every UNet call, so it only peels the wrappers this project can meet.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel


def unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
