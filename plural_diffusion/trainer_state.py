"""The trainer's state between epochs, stored so that loading it never unpickles anything.

A checkpoint's `trainer_state.json` holds the plain data (epoch, history, the advantage
tracker's rewards, the optimizer's hyper-parameters, the fp16 loss scale) and
`trainer_state.safetensors` every tensor: the optimizer's moments and each process's random
state (its sampling generator, torch's global RNG, CUDA's RNG) and pending grouped samples
under `rank{r}.` keys. Every rank restores its own, so a resumed multi-process run draws the
same noise as an uninterrupted one. `torch.load` on a `.pt` would unpickle arbitrary objects.
"""

from __future__ import annotations

from pathlib import Path

import torch

from reward_models.errors import UserError
from reward_models.io import load_tensors, read_json, save_tensors, write_json

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"


def optimizer_to_plain(state_dict: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A torch optimizer's state dict -> (JSON-able dict, tensors named `optimizer.{i}.{key}`)."""
    tensors, state = {}, {}
    for index, entry in state_dict["state"].items():
        state[str(index)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
                state[str(index)][key] = {"tensor": f"optimizer.{index}.{key}"}
            else:
                state[str(index)][key] = value
    return {"state": state, "param_groups": state_dict["param_groups"]}, tensors


def optimizer_from_plain(plain: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The inverse of `optimizer_to_plain`."""
    state = {
        int(index): {
            key: tensors[value["tensor"]] if isinstance(value, dict) else value
            for key, value in entry.items()
        }
        for index, entry in plain["state"].items()
    }
    return {"state": state, "param_groups": plain["param_groups"]}


def gather_per_rank(accelerator, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every process's `tensors` (same names and shapes on each) -> `rank{r}.{name}` on every
    process. A collective: all ranks must call it."""
    world = accelerator.num_processes
    if world == 1:
        return {f"rank0.{name}": t.detach().cpu().clone() for name, t in tensors.items()}
    out = {}
    for name, t in tensors.items():
        if t.numel() == 0:  # all_gather of nothing; every rank holds the same empty tensor
            parts = [t] * world
        else:
            gathered = accelerator.gather(t.to(accelerator.device).reshape(1, -1))  # [world, n]
            parts = [row.reshape(t.shape).to("cpu", t.dtype).clone() for row in gathered]
        for rank, part in enumerate(parts):
            out[f"rank{rank}.{name}"] = part
    return out


def write_state(directory: Path, plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    save_tensors(directory / STATE_TENSORS, tensors)
    write_json(directory / STATE_JSON, plain)


def read_state(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not (directory / STATE_JSON).is_file():
        raise UserError(
            f"{directory}: no {STATE_JSON}; a checkpoint from an older version cannot be "
            "resumed (its policy/ still loads for generation)"
        )
    return read_json(directory / STATE_JSON), load_tensors(directory / STATE_TENSORS)


def rank_tensors(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The `rank{rank}.` entries of a state file, prefix removed."""
    prefix = f"rank{rank}."
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
