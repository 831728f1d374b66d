"""Taste-routed LoRA experts: one low-rank update per taste cluster, mixed per image by its taste.

With one LoRA shared by every taste, the tastes pull on the same weights and a steep, large
taste captures a small neighbour (measured: images asked for the 10% *vivid* cluster scored
higher with *sunny*'s head than with vivid's own). Here the LoRA of rank E * r is read as E
experts of rank r, and each image's update is gated per expert:

    W x + B · diag(g(z) ⊗ 1_r) · A x          g(z) [E] = softmax(-|z - c_e|² / τ)

c_e are the taste clusters' centroids (in the taste space the policy reads) and τ is a quarter
of the median squared distance between centroids, so a cluster's own taste routes ~98% of its
update to its own expert while a rater, a latent posterior or a new user's fitted taste between
two clusters mixes their experts continuously. A taste changes only its own expert's weights
(its gradient through the other experts is scaled by their near-zero gates).

Both halves of classifier-free guidance are routed by the image's taste (the unconditional half
too), so for a fixed taste the update is an ordinary LoRA with A's rows scaled by the gate:
`bake_gate` writes that LoRA, which plain diffusers loads.

The gate reaches peft's LoRA layers through forward hooks on each `lora_A` module, which scale
its output [B, ..., E * r] by the current gate [B, E * r]. `set_gate` is called by
`conditioning.unet_forward` before each UNet call and the gate is left in place afterwards, so
gradient checkpointing, which re-runs the forward during backward, sees the same gate.
"""

from __future__ import annotations

import torch
from torch import nn

from plural_diffusion.unwrap import unwrap

ADAPTER = "default"  # peft's adapter name (as in backbone.ADAPTER)


def routing_temperature(centroids: torch.Tensor) -> torch.Tensor:
    """τ for `expert_gates`: a quarter of the median squared distance between centroids [E, d]."""
    d2 = torch.cdist(centroids.float(), centroids.float()).pow(2)
    off = d2[~torch.eye(len(centroids), dtype=torch.bool)]
    return (off.median() / 4).clamp(min=1e-6)


def expert_gates(z: torch.Tensor, centroids: torch.Tensor, temperature: torch.Tensor):
    """Soft assignment of tastes z [B, d] to the experts' centroids [E, d] -> gates [B, E]."""
    d2 = torch.cdist(z.float(), centroids.float()).pow(2)  # [B, E]
    return torch.softmax(-d2 / temperature, dim=1)


class _GateHolder:
    """The gate [B, E * r] the hooks read; one per UNet."""

    def __init__(self, rank: int):
        self.rank = rank  # per expert
        self.value: torch.Tensor | None = None


def _lora_a_modules(unet) -> list[nn.Module]:
    return [
        m.lora_A[ADAPTER] for m in unet.modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A
    ]


def _hook(holder: _GateHolder):
    def scale(module, inputs, out):
        gate = holder.value
        assert gate is not None, "expert gate not set; call the UNet through unet_forward"
        assert gate.shape[0] == out.shape[0], (gate.shape, out.shape)
        shape = (gate.shape[0],) + (1,) * (out.ndim - 2) + (gate.shape[1],)
        return out * gate.view(shape).to(out.dtype)

    return scale


def install_experts(unet, n_experts: int) -> None:
    """Hook the UNet's LoRA so its rank splits into `n_experts` gated blocks (idempotent)."""
    inner = unwrap(unet)
    remove_experts(inner)
    modules = _lora_a_modules(inner)
    assert modules, "install_experts needs a UNet with a LoRA adapter"
    total = modules[0].out_features
    assert total % n_experts == 0, (total, n_experts)
    holder = _GateHolder(total // n_experts)
    inner._taste_expert_holder = holder
    inner._taste_expert_hooks = [m.register_forward_hook(_hook(holder)) for m in modules]


def remove_experts(unet) -> None:
    inner = unwrap(unet)
    for handle in getattr(inner, "_taste_expert_hooks", []):
        handle.remove()
    inner._taste_expert_hooks = []
    inner._taste_expert_holder = None


def has_experts(unet) -> bool:
    inner = unwrap(unet)
    return getattr(inner, "_taste_expert_holder", None) is not None


def set_gate(unet, gates: torch.Tensor) -> None:
    """Route the next UNet calls: gates [B, E] (rows of the UNet's batch)."""
    inner = unwrap(unet)
    holder = inner._taste_expert_holder
    holder.value = gates.repeat_interleave(holder.rank, dim=1)  # [B, E * r]


@torch.no_grad()
def bake_gate(lora_state: dict[str, torch.Tensor], gates: torch.Tensor, rank: int) -> dict:
    """A peft LoRA state dict for one fixed taste: each `lora_A` weight [E * r, in] with its rows
    scaled by that taste's gates [E]. Loaded as a plain LoRA it computes exactly what the routed
    experts compute for that taste."""
    row_scale = gates.float().repeat_interleave(rank)  # [E * r]
    out = {}
    for key, value in lora_state.items():
        if ".lora_A." in key:
            assert value.shape[0] == row_scale.numel(), (key, value.shape)
            value = value * row_scale.view(-1, *([1] * (value.ndim - 1))).to(value)
        out[key] = value
    return out
