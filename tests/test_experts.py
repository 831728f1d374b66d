"""Taste-routed LoRA experts: each cluster's taste drives its own expert, tastes between clusters
mix them, a fixed taste bakes into a plain LoRA exactly, and checkpoints round-trip."""

from __future__ import annotations

import pytest
import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from plural_diffusion.backbone import ADAPTER, add_lora, load_checkpoint, save_checkpoint
from plural_diffusion.conditioning import TasteConditioner, TasteConditioningConfig, unet_forward
from plural_diffusion.experts import bake_gate, expert_gates, routing_temperature
from reward_models.errors import UserError
from tests.test_conditioning import TASTE_DIM, inputs, tiny_unet

RANK = 2
CENTROIDS = torch.tensor(
    [[2.0, 0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0, 0]]
)  # [E=3, TASTE_DIM]


def routed_unet(seed: int = 0):
    """A tiny UNet with a LoRA of 3 experts of rank 2 (B randomised, so each expert acts) and a
    tokens conditioner routing by CENTROIDS."""
    unet = tiny_unet()
    add_lora(unet, rank=RANK * 3, alpha=RANK * 3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    config = TasteConditioningConfig(taste_dim=TASTE_DIM, n_tokens=3, hidden=16, experts=3)
    conditioner = TasteConditioner.for_unet(config, unet)
    conditioner.set_experts(CENTROIDS)
    conditioner.attach(unet)
    return unet, conditioner


def test_a_clusters_own_taste_routes_to_its_expert_and_a_midpoint_mixes_two():
    tau = routing_temperature(CENTROIDS)
    gates = expert_gates(CENTROIDS, CENTROIDS, tau)  # [3, 3]
    assert torch.allclose(gates.sum(dim=1), torch.ones(3))
    assert (gates.diagonal() > 0.95).all(), gates
    mid = expert_gates((CENTROIDS[:1] + CENTROIDS[1:2]) / 2, CENTROIDS, tau)[0]
    assert abs(mid[0] - mid[1]) < 1e-5 and mid[0] > 0.45 and mid[2] < 0.1, mid


def test_a_tastes_gradient_lands_on_its_own_expert():
    unet, conditioner = routed_unet()
    latents, t, text, _ = inputs(batch=2)
    z = CENTROIDS[1].expand(2, -1)  # both images asked for cluster 1
    unet_forward(unet, conditioner, latents, t, text, z).pow(2).mean().backward()
    per_expert = torch.zeros(3)
    for name, p in unet.named_parameters():
        if "lora_B" in name:  # [out, 3 * RANK]: column block e is expert e
            per_expert += p.grad.abs().view(p.shape[0], 3, RANK).sum(dim=(0, 2))
    assert per_expert[1] > 20 * max(per_expert[0], per_expert[2]), per_expert


def test_experts_give_different_outputs_for_different_clusters():
    unet, conditioner = routed_unet()
    latents, t, text, _ = inputs(batch=1)
    with torch.no_grad():
        outs = [unet_forward(unet, conditioner, latents, t[:1], text, c[None]) for c in CENTROIDS]
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_a_fixed_taste_bakes_into_a_plain_lora_exactly():
    unet, conditioner = routed_unet()
    latents, t, text, _ = inputs(batch=2)
    z = (0.7 * CENTROIDS[0] + 0.3 * CENTROIDS[2]).expand(2, -1)  # between two clusters
    with torch.no_grad():
        routed = unet_forward(unet, conditioner, latents, t, text, z)
    # the same LoRA with A's rows scaled by this taste's gates, in a UNet with no hooks; the
    # conditioner's taste tokens are exactly zero at init, so only the LoRA differs
    gates = conditioner.gates(z[:1], 1)[0]
    plain = tiny_unet()
    add_lora(plain, rank=RANK * 3, alpha=RANK * 3)
    baked = bake_gate(get_peft_model_state_dict(unet, adapter_name=ADAPTER), gates, RANK)
    set_peft_model_state_dict(plain, baked, adapter_name=ADAPTER)
    with torch.no_grad():
        expected = plain(latents, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)


def test_a_routed_checkpoint_round_trips(tmp_path):
    unet, conditioner = routed_unet()
    latents, t, text, _ = inputs(batch=2)
    z = CENTROIDS[[0, 2]]
    with torch.no_grad():
        before = unet_forward(unet, conditioner, latents, t, text, z)
    save_checkpoint(tmp_path / "ckpt", unet, conditioner)
    fresh = tiny_unet()
    _, loaded = load_checkpoint(tmp_path / "ckpt", fresh)
    loaded.attach(fresh)
    torch.testing.assert_close(loaded.expert_centroids, CENTROIDS)
    with torch.no_grad():
        after = unet_forward(fresh, loaded, latents, t, text, z)
    torch.testing.assert_close(before, after)


def test_centroids_that_do_not_fit_the_experts_are_a_one_line_error():
    unet = tiny_unet()
    add_lora(unet, rank=4, alpha=4)
    config = TasteConditioningConfig(taste_dim=TASTE_DIM, n_tokens=3, hidden=16, experts=2)
    conditioner = TasteConditioner.for_unet(config, unet)
    with pytest.raises(UserError, match="set conditioning.experts to the number of taste"):
        conditioner.set_experts(CENTROIDS)


# ------------------------------------------------------------------ maxmin's assignment
def test_each_cluster_gets_an_equal_share_of_images_those_best_for_it():
    from plural_diffusion.rewards import NeedAssignment

    need = NeedAssignment(3, temperature=0.1, momentum=0.5)
    # six images, all best for cluster 0 (its ideal is nearest the base model), some of them
    # relatively better for 1 or 2 than the others
    scores = torch.tensor(
        [
            [3.0, 0.0, 0.0],
            [2.9, 0.1, 0.0],
            [2.0, 1.5, 0.0],
            [2.0, 1.6, 0.1],
            [2.0, 0.0, 1.2],
            [1.9, 0.0, 1.4],
        ]
    )
    a = need.assign(scores)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(6))
    torch.testing.assert_close(a.sum(dim=0), torch.full((3,), 2.0), rtol=0, atol=0.05)
    assert a.argmax(dim=1).tolist() == [0, 0, 1, 1, 2, 2]
    for _ in range(10):  # over many batches cluster 0 is served 1 std better than the others
        need.observe(torch.tensor([1.0, 0.0, 0.0]))
    shares = need.shares()
    assert shares[0] < 0.2 and torch.isclose(shares[1], shares[2]), shares
    a = need.assign(scores)  # cluster 0 keeps only its best-suited image or so
    torch.testing.assert_close(a.sum(dim=0), 6 * shares, rtol=0, atol=0.05)
    assert a.argmax(dim=1)[0] == 0 and (a.argmax(dim=1)[2:] != 0).all()
    restored = NeedAssignment(3, 0.1, 0.5)
    restored.load_state_dict(need.state_dict())
    torch.testing.assert_close(restored.assign(scores), a)


def test_maxmin_over_one_cluster_is_a_one_line_error():
    from plural_diffusion.rewards import NeedAssignment

    with pytest.raises(UserError, match="use objective=mean"):
        NeedAssignment(1)
