"""Taste conditioning: a small module that tells the denoiser *whose* taste to please.

A taste vector z [B, taste_dim] (a rater embedding, a cluster centroid, a posterior mean) goes
through an MLP whose OUTPUT projection is zero-initialised, so at step 0 the conditioned UNet is
the base UNet exactly and the projection still receives a gradient (a zero scalar gate times a
random embedding would leave the embedding without one). Two ways into the UNet:

"tokens": `n_tokens` taste tokens [B, n, C] appended to the text states, [B, L, C] -> [B, L+n, C].
    Appending even all-zero tokens to a cross-attention is NOT a no-op: the softmax moves mass to
    them and shrinks the text's share. So `attach` gives every cross-attention a
    `TasteAttnProcessor` that attends to the taste tokens in a separate softmax and adds the result
    (IP-Adapter's decoupled cross-attention, reusing the layer's own to_k/to_v, so no new
    per-layer weights and LoRA on to_k/to_v applies to both):

        out = to_out( Attn(q, K_text, V_text) + Attn(q, K_taste, V_taste - V_null) )

    V_null is to_v of a zero token. Zero tokens give V_taste = V_null, the second term is exactly 0
    and the layer computes what diffusers' `AttnProcessor2_0` computes. The processors hold no
    weights, so the UNet's state dict (and its LoRA) is unchanged. They use PyTorch SDPA; enabling
    xformers or calling `set_attn_processor` after `attach` removes them (`unet_forward` checks).
    Once attached, the UNet reads the last `n_tokens` encoder states as taste: call it through
    `unet_forward` (or `detach_taste` first), not directly with plain text states.

"timestep": one vector [B, D] added to the UNet's timestep embedding, which every ResNet block
    reads. A pretrained UNet has `class_embedding = None`; `attach` installs a weightless
    `TasteEmbeddingSlot` there and `unet_forward` passes the conditioner's output as
    `class_labels`. With `class_embed_type=None` diffusers applies no sinusoidal projection, so
    `UNet2DConditionModel.forward` computes `emb = time_embedding(t) + class_labels` (its
    `get_class_embed` path). The conditioner's weights stay outside the UNet's state dict.
    Once attached, the UNet requires `class_labels`: call it through `unet_forward`.

z = None means "no preference": a learned null taste vector, also used for classifier-free-
guidance-style taste dropout (`drop_taste`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from plural_diffusion.experts import (
    expert_gates,
    install_experts,
    remove_experts,
    routing_temperature,
    set_gate,
)
from plural_diffusion.unwrap import unwrap
from reward_models.config import from_dict, to_dict
from reward_models.errors import UserError
from reward_models.io import atomic_dir, load_tensors, read_json, save_tensors, write_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "taste_conditioner.safetensors"


@dataclass
class TasteConditioningConfig:
    """How a taste vector enters the denoiser."""

    mode: Literal["tokens", "timestep"] = "tokens"
    taste_dim: int = 16  # size of z
    n_tokens: int = 4  # taste tokens per image ("tokens" mode)
    hidden: int = 256  # MLP width
    # Width of the UNet input the taste lands in: cross_attention_dim ("tokens") or the timestep
    # embedding width ("timestep"). None = read from the UNet by `TasteConditioner.for_unet`.
    out_dim: int | None = None
    # share of training images asked for the null taste ("no preference") and scored for the
    # taste they were drawn for: trains the null taste as the taste-marginal that CFG's
    # unconditional half and `--taste mean` use (see Trainer.draw_batch)
    taste_dropout: float = 0.0
    # LoRA experts routed by the taste (`plural_diffusion.experts`): the LoRA's rank splits
    # into one block per taste cluster, gated by the taste's soft cluster assignment. 0 = one
    # LoRA shared by every taste.
    experts: int = 0
    # one more block of the LoRA that every taste uses (gate 1): what the tastes share, next to
    # what each cluster's own expert adds
    shared_expert: bool = False
    # each taste cluster's own taste module (MLP and output projection), mixed by the same gates
    # as the LoRA experts: no taste's update moves another cluster's tokens (needs `experts`).
    # None, in a training config: on with LoRA experts (see benchmarks/RESULTS.md); a built
    # conditioner has True or False
    expert_tokens: bool | None = None
    # with `expert_tokens`: each module reads the taste relative to its routed centroid (z minus
    # the gate-weighted centroids) and the null taste as it is, so a module copied from one
    # cluster's slot into another's (`restart_experts`) reads for the new cluster's taste what it
    # read for its own, and draws what it drew. None, in a training config: on with
    # `expert_tokens`; a built conditioner has True or False (False: a conditioner saved before
    # the option, whose modules read z itself)
    centred_experts: bool | None = None


class TasteEmbeddingSlot(nn.Module):
    """Weightless `unet.class_embedding`: passes the taste embedding given as `class_labels`."""

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        return class_labels


class TasteAttnProcessor:
    """Cross-attention over text tokens plus a separate softmax over the last `n_tokens` tokens.

    Follows `AttnProcessor2_0` line by line for the text path; see the module docstring.
    """

    def __init__(self, n_tokens: int):
        self.n_tokens = n_tokens

    def _heads(self, attn: Attention, x: torch.Tensor, batch: int) -> torch.Tensor:
        return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert encoder_hidden_states is not None, "TasteAttnProcessor is for cross-attention only"
        text = encoder_hidden_states[:, : -self.n_tokens]  # [B, L, C]
        taste = encoder_hidden_states[:, -self.n_tokens :]  # [B, n, C]

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = text.shape[0]
        if attention_mask is not None:  # a text mask covers the text tokens only
            attention_mask = attn.prepare_attention_mask(attention_mask, text.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        null = torch.zeros_like(taste[:, :1])  # [B, 1, C]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
            taste = attn.norm_encoder_hidden_states(taste)
            null = attn.norm_encoder_hidden_states(null)
        query = self._heads(attn, attn.to_q(hidden_states), batch)
        key = self._heads(attn, attn.to_k(text), batch)
        value = self._heads(attn, attn.to_v(text), batch)
        taste_key = self._heads(attn, attn.to_k(taste), batch)
        taste_value = self._heads(attn, attn.to_v(taste) - attn.to_v(null), batch)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
            taste_key = attn.norm_k(taste_key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states + F.scaled_dot_product_attention(
            query, taste_key, taste_value, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(
            batch, -1, attn.heads * query.shape[-1]
        )
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _cross_attentions(unet: UNet2DConditionModel) -> list[Attention]:
    # Cached on the UNet: `unet_forward` asks on every call, and walking all of SD 1.5's UNet
    # modules each time is pure host overhead (see benchmarks/host_overhead_toy.py). The
    # Attention modules never change after construction (peft and set_processor replace what
    # is inside them), so the list stays valid.
    cached = unet.__dict__.get("_taste_cross_attentions")
    if cached is None:
        cached = [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
        unet.__dict__["_taste_cross_attentions"] = cached
    return cached


def _time_embed_dim(unet: UNet2DConditionModel) -> int:
    return unet.time_embedding.linear_2.out_features


class TasteConditioner(nn.Module):
    """z [B, taste_dim] -> taste tokens [B, n_tokens, C] or timestep offset [B, D]; see module doc."""

    def __init__(self, config: TasteConditioningConfig):
        super().__init__()
        if config.out_dim is None:
            raise UserError(
                "TasteConditioningConfig.out_dim is unset; build with TasteConditioner.for_unet"
            )
        if config.mode not in ("tokens", "timestep"):
            raise UserError(f"taste conditioning mode={config.mode!r}: expected tokens or timestep")
        for key in ("taste_dim", "n_tokens", "hidden", "out_dim"):
            if getattr(config, key) < 1:
                raise UserError(f"taste conditioning {key}={getattr(config, key)}: must be >= 1")
        self.config = config
        n_out = config.out_dim * (config.n_tokens if config.mode == "tokens" else 1)
        # The origin is where a posterior over z starts (the prior mean): a natural "no
        # preference"; it is learned from there.
        self.null = nn.Parameter(torch.zeros(config.taste_dim))
        self.mlp = nn.Sequential(
            nn.Linear(config.taste_dim, config.hidden),
            nn.SiLU(),
            nn.Linear(config.hidden, config.hidden),
            nn.SiLU(),
        )
        self.proj_out = nn.Linear(config.hidden, n_out)
        nn.init.zeros_(self.proj_out.weight)  # identity at init, see module docstring
        nn.init.zeros_(self.proj_out.bias)
        if config.expert_tokens:
            if config.experts < 2:
                raise UserError(
                    "conditioning.expert_tokens=true gives each taste cluster its own taste "
                    "module, so it needs lora.experts=true and taste.source=clusters or latents; "
                    "set conditioning.expert_tokens=false"
                )
            # the shared MLP and projection above become expert 0's; experts 1.. are copies
            # of their initialisation (zero projection: identity at init)
            self.expert_modules = nn.ModuleList(
                copy.deepcopy(nn.Sequential(self.mlp, self.proj_out))
                for _ in range(config.experts - 1)
            )
        if config.centred_experts and not config.expert_tokens:
            raise UserError(
                "conditioning.centred_experts=true centres the input of each taste cluster's own "
                "taste module, so it needs conditioning.expert_tokens=true; set "
                "conditioning.centred_experts=false"
            )
        if config.experts:  # filled by `set_experts`; saved with the conditioner's weights
            self.register_buffer("expert_centroids", torch.zeros(config.experts, config.taste_dim))
            self.register_buffer("expert_temperature", torch.ones(()))

    def expert_module(self, k: int) -> nn.Module:
        """Cluster k's own taste module (`expert_tokens`): MLP and output projection."""
        if not self.config.expert_tokens:
            raise ValueError("expert_module needs conditioning.expert_tokens=true")
        return nn.Sequential(self.mlp, self.proj_out) if k == 0 else self.expert_modules[k - 1]

    def set_experts(self, centroids: torch.Tensor) -> None:
        """Route LoRA experts by the taste clusters' centroids [E, taste_dim]."""
        if tuple(centroids.shape) != (self.config.experts, self.config.taste_dim):
            raise UserError(
                f"taste experts: {tuple(centroids.shape)} centroids for {self.config.experts} "
                f"experts of taste_dim {self.config.taste_dim}; set conditioning.experts to the "
                "number of taste clusters"
            )
        self.expert_centroids.copy_(centroids)
        self.expert_temperature.copy_(routing_temperature(centroids))

    def gates(self, z: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Each image's weight on each LoRA block, [B, E] (+ a column of ones for the shared
        block), z None: the null taste."""
        z = self.null_taste(batch) if z is None else z
        gates = expert_gates(z, self.expert_centroids, self.expert_temperature)
        if self.config.shared_expert:
            gates = torch.cat([gates, gates.new_ones(gates.shape[0], 1)], dim=1)
        return gates

    @classmethod
    def for_unet(
        cls, config: TasteConditioningConfig, unet: UNet2DConditionModel
    ) -> TasteConditioner:
        """A conditioner whose `out_dim` is read from `unet` (and checked against it if set)."""
        width = (
            unet.config.cross_attention_dim if config.mode == "tokens" else _time_embed_dim(unet)
        )
        if config.out_dim not in (None, width):
            raise UserError(
                f"taste conditioning out_dim={config.out_dim} but the UNet's {config.mode} width is "
                f"{width}; remove out_dim from the config or use a matching base model"
            )
        return cls(TasteConditioningConfig(**{**to_dict(config), "out_dim": width}))

    def null_taste(self, batch: int) -> torch.Tensor:
        """[batch, taste_dim] the learned "no preference" taste."""
        return self.null.unsqueeze(0).expand(batch, -1)

    def is_null(self, z: torch.Tensor) -> torch.Tensor:
        """[B, 1]: which rows of z [B, taste_dim] are the null taste. Every null row is a copy
        of the `null` parameter (`null_taste`, `drop_taste`), compared in z's dtype, so it is
        recognised exactly; a taste equal to it in every element is the null taste."""
        return (z == self.null.to(z.dtype)).all(-1, keepdim=True)

    def drop_taste(
        self, z: torch.Tensor, p: float | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z [B, d] with each row replaced by the null taste with probability p (config default)."""
        p = self.config.taste_dropout if p is None else p
        # drawn where the generator lives (a CPU generator cannot draw on CUDA), then moved
        where = generator.device if generator is not None else z.device
        drop = (torch.rand(z.shape[0], generator=generator, device=where) < p).to(z.device)
        return torch.where(drop[:, None], self.null_taste(z.shape[0]).to(z.dtype), z)

    def forward(self, z: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, taste_dim] -> [B, n_tokens, out_dim] ("tokens") or [B, out_dim] ("timestep").
        route [B, taste_dim]: with `expert_tokens`, the tastes whose modules make each row's
        tokens (default z), as for the LoRA experts: CFG's unconditional half is the null taste
        routed through the asked taste's module, so no other cluster's module moves it."""
        if z.ndim != 2 or z.shape[1] != self.config.taste_dim:
            raise UserError(
                f"taste vectors have shape {tuple(z.shape)}; expected [B, {self.config.taste_dim}]"
            )
        h = z.to(self.null.dtype)
        if self.config.expert_tokens:
            route = z if route is None else route
            gates = expert_gates(route, self.expert_centroids, self.expert_temperature)
            if self.config.centred_experts:
                h = torch.where(self.is_null(z), h, h - gates.to(h.dtype) @ self.expert_centroids)
            modules = [self.expert_module(k) for k in range(self.config.experts)]
            per_expert = torch.stack([m(h) for m in modules], dim=1)  # [B, E, n_out]
            out = (gates.to(per_expert.dtype)[..., None] * per_expert).sum(1)
        else:
            out = self.proj_out(self.mlp(h))
        if self.config.mode == "tokens":
            return out.view(z.shape[0], self.config.n_tokens, self.config.out_dim)
        return out

    def attach(self, unet: UNet2DConditionModel) -> None:
        """Prepare `unet` to read this conditioner's output (idempotent; adds no UNet weights)."""
        cfg = self.config
        if cfg.mode == "tokens":
            if cfg.out_dim != unet.config.cross_attention_dim:
                raise UserError(
                    f"taste tokens have width {cfg.out_dim} but the UNet's cross_attention_dim is "
                    f"{unet.config.cross_attention_dim}; the conditioner was built for another base model"
                )
            for attn in _cross_attentions(unet):
                attn.set_processor(TasteAttnProcessor(cfg.n_tokens))
            self._attach_experts(unet)
            return
        if cfg.out_dim != _time_embed_dim(unet):
            raise UserError(
                f"taste embedding has width {cfg.out_dim} but the UNet's timestep embedding is "
                f"{_time_embed_dim(unet)}; the conditioner was built for another base model"
            )
        if unet.class_embedding is not None and not isinstance(
            unet.class_embedding, TasteEmbeddingSlot
        ):
            raise UserError(
                "this UNet already uses class embeddings; use taste conditioning mode=tokens"
            )
        if unet.config.class_embeddings_concat:
            raise UserError(
                "UNet has class_embeddings_concat=True; use taste conditioning mode=tokens"
            )
        unet.class_embedding = TasteEmbeddingSlot()
        self._attach_experts(unet)

    def _attach_experts(self, unet: UNet2DConditionModel) -> None:
        if not self.config.experts:
            remove_experts(unet)
            return
        if self.config.experts < 2:
            raise UserError(
                "conditioning.experts=1 routes nothing; use 0 (one shared LoRA) or the number "
                "of taste clusters"
            )
        install_experts(unet, self.config.experts + int(self.config.shared_expert))


def detach_taste(unet: UNet2DConditionModel) -> None:
    """Undo `attach`: plain SDPA cross-attention processors and no class embedding slot."""
    for attn in _cross_attentions(unet):
        if isinstance(attn.processor, TasteAttnProcessor):
            attn.set_processor(AttnProcessor2_0())
    if isinstance(unet.class_embedding, TasteEmbeddingSlot):
        unet.class_embedding = None
    remove_experts(unet)


def _attached_tokens(unet: UNet2DConditionModel) -> int | None:
    """n_tokens of the installed taste processors, None if none; asserts they all agree."""
    counts = {getattr(a.processor, "n_tokens", None) for a in _cross_attentions(unet)}
    if counts == {None}:
        return None
    if len(counts) != 1:
        raise RuntimeError(
            "only some cross-attentions have taste processors (set_attn_processor or xformers "
            "after attach?); call conditioner.attach(unet) again"
        )
    return counts.pop()


def unet_forward(
    unet: UNet2DConditionModel,
    conditioner: TasteConditioner | None,
    latents: torch.Tensor,
    t: torch.Tensor | int,
    encoder_hidden_states: torch.Tensor,
    z: torch.Tensor | None,
    route: torch.Tensor | None = None,
) -> torch.Tensor:
    """The UNet's prediction for `latents` [B, C, H, W] at `t`, given text states [B, L, C'] and
    taste z [B, taste_dim] (None = the null taste). Returns [B, C, H, W] in the UNet's dtype.
    route [B, taste_dim]: the tastes that pick each row's LoRA experts (default z); see
    `plural_diffusion.experts`.

    `conditioner=None` runs the base UNet: if taste is attached it feeds the exact-identity
    inputs (zero tokens / zero embedding), e.g. for a KL-to-base reference with LoRA disabled.
    `unet` may be wrapped (DDP, torch.compile): the wrapper is called, the model inside inspected.
    """
    inner = unwrap(unet)
    batch = latents.shape[0]
    n_tokens = _attached_tokens(inner)
    has_slot = isinstance(inner.class_embedding, TasteEmbeddingSlot)
    class_labels = None
    if conditioner is None:
        if n_tokens is not None:
            zeros = encoder_hidden_states.new_zeros(
                batch, n_tokens, encoder_hidden_states.shape[-1]
            )
            encoder_hidden_states = torch.cat([encoder_hidden_states, zeros], dim=1)
        if has_slot:
            class_labels = latents.new_zeros(batch, _time_embed_dim(inner))
    else:
        cfg = conditioner.config
        if (cfg.mode == "tokens" and n_tokens != cfg.n_tokens) or (
            cfg.mode == "timestep" and not has_slot
        ):
            raise RuntimeError(
                "the UNet is not prepared for this conditioner; call conditioner.attach(unet)"
            )
        if cfg.experts:
            set_gate(inner, conditioner.gates(z if route is None else route, batch))
        taste = conditioner(conditioner.null_taste(batch) if z is None else z, route=route)
        if cfg.mode == "tokens":
            taste = taste.to(encoder_hidden_states.dtype)  # [B, n, C]
            encoder_hidden_states = torch.cat([encoder_hidden_states, taste], dim=1)
        else:
            class_labels = taste.to(latents.dtype)  # [B, D]
    dtype = inner.dtype  # a bf16/fp16 UNet outside autocast needs its inputs in its dtype
    if class_labels is not None:
        class_labels = class_labels.to(dtype)
    return unet(
        latents.to(dtype),
        t,
        encoder_hidden_states=encoder_hidden_states.to(dtype),
        class_labels=class_labels,
    ).sample


def save_taste_conditioner(conditioner: TasteConditioner, directory: str | os.PathLike) -> Path:
    """Write `config.json` + `taste_conditioner.safetensors` into `directory`, atomically."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        write_json(tmp / CONFIG_NAME, to_dict(conditioner.config))
        save_tensors(tmp / WEIGHTS_NAME, conditioner.state_dict())
    return directory


def load_taste_conditioner(directory: str | os.PathLike) -> TasteConditioner:
    """Read a conditioner written by `save_taste_conditioner` (float32, on the CPU)."""
    directory = Path(directory)
    config = from_dict(TasteConditioningConfig, read_json(directory / CONFIG_NAME))
    conditioner = TasteConditioner(config)
    state = load_tensors(directory / WEIGHTS_NAME)
    expected = conditioner.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise UserError(
                f"{directory / WEIGHTS_NAME}: tensor '{key}' missing; the file is damaged"
            )
        if state[key].shape != value.shape:
            raise UserError(
                f"{directory / WEIGHTS_NAME}: '{key}' has shape {tuple(state[key].shape)} but "
                f"{CONFIG_NAME} implies {tuple(value.shape)}; config and weights do not belong together"
            )
    if extra := sorted(set(state) - set(expected)):
        raise UserError(
            f"{directory / WEIGHTS_NAME}: unexpected tensor '{extra[0]}'; not a taste conditioner"
        )
    conditioner.load_state_dict(state)
    return conditioner
