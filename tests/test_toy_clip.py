"""The toy world's tiny open_clip model: trained from a seed, saved in open_clip's local-dir layout,
and its frozen image features read out the pixel statistics the gold raters score.

A smaller config than the default (512 images, 128 steps) keeps this file quick.
"""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from plural_diffusion.toyworld.clip import (
    CONFIG_FILE,
    PROBE_SEED,
    WEIGHTS_FILE,
    ToyClipConfig,
    brightness_retrieval_accuracy,
    encode_images,
    linear_probe_r2,
    load_toy_clip,
    probe_targets,
    train_toy_clip,
)
from plural_diffusion.toyworld.images import make_images
from reward_models.errors import UserError
from reward_models.io import file_sha256

SMALL = ToyClipConfig(n_images=512, epochs=16, batch_size=64, seed=0)
TINY = {"n_images": 64, "epochs": 1, "batch_size": 32}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: a second OpenMP thread only adds barrier waits on a shared 2-core CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    return train_toy_clip(SMALL, tmp_path_factory.mktemp("toy-clip") / "clip", progress=False)


@pytest.fixture(scope="module")
def trained(trained_dir):
    model, _, tokenizer = load_toy_clip(trained_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def held_out():
    return make_images(600, 32, PROBE_SEED)


def test_saved_dir_loads_with_open_clips_own_local_dir_loader(trained_dir):
    assert sorted(p.name for p in trained_dir.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    spec = f"local-dir:{trained_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(spec)

    saved = load_file(trained_dir / WEIGHTS_FILE)
    state = model.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert sum(v.numel() for v in saved.values()) < 4_000_000  # tiny: 3.2M are the BPE table

    cfg = open_clip.get_model_preprocess_cfg(model)
    assert cfg["size"] == (32, 32)
    # The toy world's own pixel statistics, not ImageNet's (0.48, 0.46, 0.41 / 0.27, 0.26, 0.28).
    assert all(0.30 < m < 0.38 for m in cfg["mean"]), cfg["mean"]
    assert all(0.23 < s < 0.30 for s in cfg["std"]), cfg["std"]
    assert preprocess(Image.new("RGB", (32, 32))).shape == (3, 32, 32)
    assert open_clip.get_tokenizer(spec)(["a dark grey image of one circle"]).shape == (1, 16)


def test_same_seed_gives_identical_weights_and_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = train_toy_clip(ToyClipConfig(**TINY, seed=3), tmp_path / "a", progress=False)
    assert torch.equal(torch.rand(3), expected_draw)  # training used a private generator

    b = train_toy_clip(ToyClipConfig(**TINY, seed=3), tmp_path / "b", progress=False)
    c = train_toy_clip(ToyClipConfig(**TINY, seed=4), tmp_path / "c", progress=False)
    assert file_sha256(a / WEIGHTS_FILE) == file_sha256(b / WEIGHTS_FILE)
    assert file_sha256(a / WEIGHTS_FILE) != file_sha256(c / WEIGHTS_FILE)


def test_trained_features_read_out_pixel_stats_better_than_untrained(
    trained_dir, trained, held_out
):
    model, _ = trained
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SMALL.seed)  # the same initial weights training started from
        untrained, _, _ = open_clip.create_model_and_transforms(
            f"local-dir:{trained_dir}", load_weights=False
        )
    targets = probe_targets(held_out)  # luminance, colourfulness, warmth, brightness, saturation
    lum, col, _, bright, sat = linear_probe_r2(encode_images(model, held_out.images), targets)
    lum0, col0, _, bright0, sat0 = linear_probe_r2(
        encode_images(untrained.eval(), held_out.images), targets
    )
    # Measured: trained 0.963 / 0.866 / 0.941 / 0.876, untrained 0.940 / 0.808 / 0.901 / 0.708.
    # A random ViT's features are already near-linear in the mean colour, so luminance gains
    # least; saturation, which only the captions name, gains most.
    assert lum > 0.955 and lum > lum0 + 0.015
    assert col > col0 + 0.04
    assert bright > bright0 + 0.025
    assert sat > 0.85 and sat > sat0 + 0.12


def test_dark_and_bright_captions_retrieve_dark_and_bright_images(trained, held_out):
    model, tokenizer = trained
    # Each dark (bright) image is nearer its own caption than to that caption saying bright (dark).
    assert brightness_retrieval_accuracy(model, tokenizer, held_out) >= 0.97


def test_features_are_unit_norm_and_independent_of_batch_size(trained, held_out):
    model, _ = trained
    features = encode_images(model, held_out.images[:50], batch_size=7)
    assert features.shape == (50, 64)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(50))
    torch.testing.assert_close(features, encode_images(model, held_out.images[:50], batch_size=256))
    assert features.std(dim=0).mean() > 0.05  # images differ, features differ


def test_encode_images_matches_open_clips_pil_preprocess(trained_dir, trained, held_out):
    model, _ = trained
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{trained_dir}")
    pixels = (held_out.images[:8] * 255).round().to(torch.uint8)  # what a PNG would hold
    pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    with torch.no_grad():
        expected = model.encode_image(torch.stack([preprocess(im) for im in pil]), normalize=True)
    torch.testing.assert_close(encode_images(model, pixels / 255.0), expected, atol=1e-5, rtol=0)


def test_linear_probe_is_one_for_a_linear_target_and_near_zero_for_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    linear = x @ rng.normal(size=8) + 0.5
    noise = rng.normal(size=400)
    r2_linear, r2_noise = linear_probe_r2(x, np.stack([linear, noise], axis=1))
    assert r2_linear > 0.999
    assert -0.1 < r2_noise < 0.05
    assert linear_probe_r2(x, linear) == pytest.approx([r2_linear])  # [N] targets work too


def test_user_mistakes_raise_one_line_user_errors(tmp_path, trained):
    model, _ = trained
    with pytest.raises(UserError, match=r"\[N, 3, 32, 32\].*resize"):
        encode_images(model, torch.rand(2, 3, 16, 16))
    with pytest.raises(UserError, match="no open_clip_config.json"):
        load_toy_clip(tmp_path)
    with pytest.raises(UserError, match="same N"):
        linear_probe_r2(np.zeros((10, 4)), np.zeros(9))
    with pytest.raises(UserError, match="NaN"):
        linear_probe_r2(np.full((20, 4), np.nan), np.zeros(20))
    with pytest.raises(UserError, match="batch_size"):
        train_toy_clip(ToyClipConfig(n_images=16, batch_size=32), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
