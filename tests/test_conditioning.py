"""Taste conditioning: exact identity at init, gradient reaches the taste, save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from plural_diffusion.conditioning import (
    TasteConditioner,
    TasteConditioningConfig,
    detach_taste,
    load_taste_conditioner,
    save_taste_conditioner,
    unet_forward,
)
from reward_models.errors import UserError

TASTE_DIM = 6


def tiny_unet(cross_attention_dim: int = 32) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return unet.eval().requires_grad_(False)


def inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, 7, 32, generator=g)  # [B, L, C] stands in for CLIP text states
    z = torch.randn(batch, TASTE_DIM, generator=g)
    return latents, torch.tensor([500, 20]), text, z


def conditioner_for(unet, mode: str) -> TasteConditioner:
    config = TasteConditioningConfig(mode=mode, taste_dim=TASTE_DIM, n_tokens=3, hidden=16)
    conditioner = TasteConditioner.for_unet(config, unet)
    conditioner.attach(unet)
    return conditioner


@pytest.mark.parametrize("mode", ["tokens", "timestep"])
def test_conditioned_unet_equals_the_base_exactly_at_init(mode):
    unet = tiny_unet()
    latents, t, text, z = inputs()
    with torch.no_grad():
        base = unet(latents, t, encoder_hidden_states=text).sample
        conditioner = conditioner_for(unet, mode)
        conditioned = unet_forward(unet, conditioner, latents, t, text, z)
        null = unet_forward(unet, conditioner, latents, t, text, None)
        reference = unet_forward(unet, None, latents, t, text, z)
    assert conditioner.config.out_dim == (32 if mode == "tokens" else 128)
    torch.testing.assert_close(conditioned, base, atol=0, rtol=0)
    torch.testing.assert_close(null, base, atol=0, rtol=0)
    torch.testing.assert_close(reference, base, atol=0, rtol=0)


def test_zero_tokens_appended_to_plain_cross_attention_are_not_a_no_op():
    # the trap the decoupled taste attention avoids: softmax mass moves to the extra tokens
    unet = tiny_unet()
    latents, t, text, _ = inputs()
    with torch.no_grad():
        base = unet(latents, t, encoder_hidden_states=text).sample
        padded = torch.cat([text, torch.zeros(2, 3, 32)], dim=1)
        naive = unet(latents, t, encoder_hidden_states=padded).sample
    assert (naive - base).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["tokens", "timestep"])
def test_one_optimizer_step_makes_two_tastes_give_different_outputs(mode):
    unet = tiny_unet()
    latents, t, text, z = inputs(1)
    same_x = latents[:1].expand(2, -1, -1, -1)  # one image, two tastes
    same_t, same_text = t[:1].expand(2), text[:1].expand(2, -1, -1)
    with torch.no_grad():
        base = unet(same_x, same_t, encoder_hidden_states=same_text).sample
    conditioner = conditioner_for(unet, mode)
    with torch.no_grad():
        before = unet_forward(unet, conditioner, latents, t, text, z)
    # taste 0 wants the prediction up, taste 1 wants it down
    target = before + torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
    optimizer = torch.optim.Adam(conditioner.parameters(), lr=1e-2)
    loss = ((unet_forward(unet, conditioner, latents, t, text, z) - target) ** 2).mean()
    loss.backward()
    assert conditioner.proj_out.weight.grad.abs().sum() > 0  # the zero projection gets a gradient
    optimizer.step()

    with torch.no_grad():
        out = unet_forward(unet, conditioner, same_x, same_t, same_text, z)
        after = unet_forward(unet, conditioner, latents, t, text, z)
        reference = unet_forward(unet, None, same_x, same_t, same_text, z)
    assert (out[0] - out[1]).abs().max() > 1e-4
    assert (out - base).abs().max() > 1e-4
    # the step moved each taste's prediction toward its own target
    assert (after[0] - before[0]).mean() > 0 > (after[1] - before[1]).mean()
    # the base reference (conditioner=None) ignores the trained taste module exactly
    torch.testing.assert_close(reference, base, atol=0, rtol=0)


def test_null_taste_is_used_for_missing_and_dropped_tastes():
    unet = tiny_unet()
    conditioner = conditioner_for(unet, "tokens")
    with torch.no_grad():
        conditioner.null.copy_(torch.arange(TASTE_DIM, dtype=torch.float32))
    z = torch.randn(5, TASTE_DIM)
    assert torch.equal(conditioner.drop_taste(z, p=1.0), conditioner.null_taste(5))
    assert torch.equal(conditioner.drop_taste(z, p=0.0), z)
    dropped = conditioner.drop_taste(
        z.repeat(200, 1), p=0.25, generator=torch.Generator().manual_seed(0)
    )
    fraction = (dropped == conditioner.null).all(dim=1).float().mean().item()
    assert 0.18 < fraction < 0.32
    # the null taste is a parameter the trainer can learn
    assert any(p is conditioner.null for p in conditioner.parameters())


def test_save_load_round_trip_reproduces_a_trained_conditioner(tmp_path):
    unet = tiny_unet()
    latents, t, text, z = inputs(2)
    conditioner = conditioner_for(unet, "timestep")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in conditioner.parameters():
            p.add_(0.1 * torch.randn_like(p))  # stands in for training
        expected = unet_forward(unet, conditioner, latents, t, text, None)

    save_taste_conditioner(conditioner, tmp_path / "taste")
    assert sorted(p.name for p in (tmp_path / "taste").iterdir()) == [
        "config.json",
        "taste_conditioner.safetensors",
    ]
    loaded = load_taste_conditioner(tmp_path / "taste")
    assert loaded.config == conditioner.config
    with torch.no_grad():
        torch.testing.assert_close(unet_forward(unet, loaded, latents, t, text, None), expected)


def test_weights_that_do_not_fit_the_config_are_a_user_error(tmp_path):
    unet = tiny_unet()
    save_taste_conditioner(conditioner_for(unet, "tokens"), tmp_path / "taste")
    (tmp_path / "taste" / "config.json").write_text(
        '{"mode": "tokens", "taste_dim": 6, "n_tokens": 3, "hidden": 99, "out_dim": 32, "taste_dropout": 0.1}'
    )
    with pytest.raises(UserError, match="do not belong together"):
        load_taste_conditioner(tmp_path / "taste")


def test_conditioner_for_another_base_model_is_refused():
    conditioner = conditioner_for(tiny_unet(), "tokens")
    with pytest.raises(UserError, match="cross_attention_dim is 16"):
        conditioner.attach(tiny_unet(cross_attention_dim=16))


def test_detach_restores_plain_cross_attention_and_forward_notices_missing_attach():
    unet = tiny_unet()
    latents, t, text, z = inputs(3)
    conditioner = conditioner_for(unet, "tokens")
    detach_taste(unet)
    with pytest.raises(RuntimeError, match="attach"):
        unet_forward(unet, conditioner, latents, t, text, z)
    with torch.no_grad():
        plain = unet_forward(unet, None, latents, t, text, None)
        torch.testing.assert_close(plain, unet(latents, t, encoder_hidden_states=text).sample)


def expert_token_conditioner(
    expert_tokens: bool = True, centred_experts: bool = False
) -> TasteConditioner:
    config = TasteConditioningConfig(
        taste_dim=TASTE_DIM,
        n_tokens=2,
        hidden=16,
        out_dim=8,
        experts=3,
        expert_tokens=expert_tokens,
        centred_experts=centred_experts,
    )
    conditioner = TasteConditioner(config)
    conditioner.set_experts(3.0 * torch.eye(3, TASTE_DIM))  # three well-separated clusters
    return conditioner


def test_expert_tokens_keep_one_clusters_update_off_the_others_tokens():
    """With `expert_tokens`, a step on cluster 0's taste alone leaves clusters 1 and 2's tokens
    all but unmoved (only their small gate on cluster 0's module); with one shared module
    the same step moves theirs too."""
    centroids = 3.0 * torch.eye(3, TASTE_DIM)
    moved = {}
    for expert_tokens in (True, False):
        conditioner = expert_token_conditioner(expert_tokens)
        with torch.no_grad():
            before = conditioner(centroids)
        opt = torch.optim.SGD(conditioner.parameters(), lr=0.5)
        for _ in range(3):  # pull cluster 0's tokens toward ones
            opt.zero_grad()
            (conditioner(centroids[:1]) - 1).pow(2).mean().backward()
            opt.step()
        with torch.no_grad():
            moved[expert_tokens] = (conditioner(centroids) - before).abs().mean((1, 2))
    own, others = moved[True][0], moved[True][1:]
    assert own > 0 and (others < 0.1 * own).all(), moved[True]
    assert (moved[False][1:] > 0.2 * moved[False][0]).all(), moved[False]


def test_expert_tokens_route_the_null_taste_through_the_asked_tastes_module():
    """CFG's unconditional half is the null taste; routed by the asked taste it is made by
    that taste's module alone, so a step on cluster 0 leaves cluster 1's unconditional tokens
    all but where they were. Gated by the null taste itself they mix every cluster's module."""
    conditioner = expert_token_conditioner()
    centroids = 3.0 * torch.eye(3, TASTE_DIM)
    null = conditioner.null_taste(1).detach()
    with torch.no_grad():
        for p in conditioner.parameters():  # modules away from their zero init
            p.add_(0.1 * torch.randn_like(p, generator=torch.Generator().manual_seed(0)))
        routed = conditioner(null, route=centroids[1:2])
        mixed = conditioner(null)
    opt = torch.optim.SGD([p for n, p in conditioner.named_parameters() if n != "null"], lr=0.5)
    for _ in range(3):  # pull cluster 0's tokens, both halves, toward ones
        opt.zero_grad()
        z = torch.cat([null, centroids[:1]])
        route = torch.cat([centroids[:1], centroids[:1]])
        (conditioner(z, route=route) - 1).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        routed_moved = (conditioner(null, route=centroids[1:2]) - routed).abs().max()
        mixed_moved = (conditioner(null) - mixed).abs().max()
    # cluster 1's gate on cluster 0's module is small, not zero (soft routing)
    assert routed_moved < 0.1 * mixed_moved, (routed_moved, mixed_moved)


def cfg_halves(conditioner: TasteConditioner, centroids: torch.Tensor, k: int) -> torch.Tensor:
    """The tokens of [null; cluster k's taste], both routed by cluster k, as CFG asks them."""
    z = torch.cat([conditioner.null_taste(1), centroids[k : k + 1]])
    return conditioner(z, route=centroids[k : k + 1].repeat(2, 1))


def test_a_centred_expert_module_copied_into_another_clusters_slot_draws_what_it_drew():
    """`centred_experts`: cluster 0's module copied into cluster 2's slot (as `restart_experts`
    copies it) reads for cluster 2's taste what it read for cluster 0's, the taste minus its
    centroid, and the null taste as it is: both CFG halves of cluster 2 are then what cluster 0's
    were. A module reading z itself draws something else for the new cluster's taste."""
    centroids = 3.0 * torch.eye(3, TASTE_DIM)
    for centred in (True, False):
        conditioner = expert_token_conditioner(centred_experts=centred)
        conditioner.expert_temperature.fill_(1e-3)  # hard gates: each cluster its own module
        with torch.no_grad():
            for p in conditioner.parameters():
                p.add_(0.3 * torch.randn_like(p, generator=torch.Generator().manual_seed(0)))

            before = cfg_halves(conditioner, centroids, 0)
            conditioner.expert_module(2).load_state_dict(conditioner.expert_module(0).state_dict())
            after = cfg_halves(conditioner, centroids, 2)
        if centred:
            torch.testing.assert_close(after, before)
        else:
            assert not torch.allclose(after[1], before[1], atol=1e-3)  # the conditional half


def test_the_null_taste_is_recognised_in_any_dtype_and_read_as_it_is():
    conditioner = expert_token_conditioner(centred_experts=True)
    with torch.no_grad():
        conditioner.null.add_(0.1234567)  # learned: not a round number in bf16
    z = torch.randn(5, TASTE_DIM)
    for dtype in (torch.float32, torch.bfloat16):
        dropped = conditioner.drop_taste(z.to(dtype), 1.0)
        assert conditioner.is_null(dropped).all()
        assert not conditioner.is_null(z.to(dtype)).any()
    mixed = conditioner.drop_taste(z, 0.5, torch.Generator().manual_seed(0))
    null_rows = conditioner.is_null(mixed).squeeze(1)
    assert 0 < null_rows.sum() < len(z)
    with pytest.raises(UserError, match="centred_experts=true .* needs conditioning.expert_tokens"):
        expert_token_conditioner(expert_tokens=False, centred_experts=True)


def test_expert_tokens_are_identity_at_init_round_trip_and_need_experts(tmp_path):
    conditioner = expert_token_conditioner()
    z = torch.randn(4, TASTE_DIM)
    assert conditioner(z).abs().max() == 0  # every module's projection starts at zero
    torch.manual_seed(1)
    with torch.no_grad():
        for p in conditioner.parameters():
            p.add_(0.1 * torch.randn_like(p))
        expected = conditioner(z)
    save_taste_conditioner(conditioner, tmp_path / "taste")
    loaded = load_taste_conditioner(tmp_path / "taste")
    assert loaded.config.expert_tokens
    with torch.no_grad():
        torch.testing.assert_close(loaded(z), expected)

    # centred: saved and loaded as such; a conditioner saved before the option (no key in its
    # config) loads as it was trained, reading z itself
    centred = expert_token_conditioner(centred_experts=True)
    centred.load_state_dict(conditioner.state_dict())
    save_taste_conditioner(centred, tmp_path / "centred")
    loaded = load_taste_conditioner(tmp_path / "centred")
    assert loaded.config.centred_experts
    with torch.no_grad():
        torch.testing.assert_close(loaded(z), centred(z))
        assert not torch.allclose(loaded(z), expected, atol=1e-3)
    config_file = tmp_path / "centred" / "config.json"
    old = json.loads(config_file.read_text())
    del old["centred_experts"]
    config_file.write_text(json.dumps(old))
    with torch.no_grad():
        torch.testing.assert_close(load_taste_conditioner(tmp_path / "centred")(z), expected)
    config = TasteConditioningConfig(taste_dim=TASTE_DIM, out_dim=8, expert_tokens=True)
    with pytest.raises(UserError, match="conditioning.expert_tokens=true .* needs lora.experts"):
        TasteConditioner(config)
