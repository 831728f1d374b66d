"""open_clip features: load any model spec offline, unit-norm features, a cache that resumes."""

import json
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.push_to_hf_hub import save_config_for_hf
from PIL import Image
from safetensors.torch import save_file

from plural_diffusion.toyworld.images import make_images
from reward_models.errors import UserError
from reward_models.features import FeatureCache, extract_features, load_clip
from reward_models.io import file_sha256

TINY = "pd-test-tiny-ViT"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random tiny CLIP saved in open_clip's local-dir layout (config JSON + safetensors)."""
    root = tmp_path_factory.mktemp("tiny_clip")
    (root / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(root / f"{TINY}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY)
    model_dir = root / "model"
    model_dir.mkdir()
    save_config_for_hf(model, model_dir / "open_clip_config.json", model_config=TINY_CFG)
    save_file(model.state_dict(), model_dir / "open_clip_model.safetensors")
    return model_dir


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return load_clip(str(tiny_dir))


def write_pngs(images: torch.Tensor, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        pixels = (img.permute(1, 2, 0) * 255).round().byte().numpy()
        paths.append(folder / f"img_{i:03d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def quantised(images: torch.Tensor) -> torch.Tensor:
    """The pixels a PNG round trip keeps: [N, 3, H, W] on the 1/255 grid."""
    return (images * 255).round() / 255


class SimulatedKill(Exception):
    pass


def count_calls(encoder, monkeypatch, fail_on_call: int | None = None) -> list[int]:
    """Record the batch size of every encode_images call; optionally die once, on call k."""
    calls: list[int] = []
    real = encoder.encode_images
    failed = []

    def counted(images, *args, **kwargs):
        calls.append(len(images))
        if len(calls) == fail_on_call and not failed:
            failed.append(True)
            raise SimulatedKill(f"killed during encoder call {fail_on_call}")
        return real(images, *args, **kwargs)

    monkeypatch.setattr(encoder, "encode_images", counted)
    return calls


def test_local_dir_model_gives_unit_norm_features(encoder, tiny_dir):
    assert encoder.dim == 32 and encoder.image_size == (32, 32)
    assert (
        encoder.name.startswith("local-dir:model@")
        and len(encoder.name) == len("local-dir:model@") + 16
    )
    feats = encoder.encode_images(make_images(6, size=32, seed=1).images, batch_size=4)
    assert feats.shape == (6, 32) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(6), atol=1e-5, rtol=0)
    cos = feats @ feats.T
    assert (
        cos[~torch.eye(6, dtype=torch.bool)].min() < 0.999
    )  # different images, different features
    # The "local-dir:" prefix is the same model, and so the same cache identity.
    assert load_clip(f"local-dir:{tiny_dir}").name == encoder.name


def test_named_architecture_with_checkpoint_file_matches_local_dir(encoder, tiny_dir):
    weights = tiny_dir / "open_clip_model.safetensors"
    same = load_clip(TINY, pretrained=str(weights))
    assert same.name.startswith(f"{TINY}:file@")
    images = make_images(3, size=32, seed=2).images
    torch.testing.assert_close(same.encode_images(images), encoder.encode_images(images))


def test_new_weights_change_the_identity(tiny_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "open_clip_config.json").write_bytes((tiny_dir / "open_clip_config.json").read_bytes())
    torch.manual_seed(1)
    save_file(open_clip.create_model(TINY).state_dict(), other / "open_clip_model.safetensors")
    assert load_clip(str(other)).name != load_clip(str(tiny_dir)).name


@pytest.mark.parametrize("size", [32, 48])
def test_path_and_tensor_inputs_give_the_same_features(encoder, tmp_path, size):
    images = quantised(make_images(5, size=size, seed=3).images)
    paths = write_pngs(images, tmp_path / "png")
    from_paths = encoder.encode_images(paths)
    from_tensor = encoder.encode_images(images)
    from_pil = encoder.encode_images([Image.open(p) for p in paths])
    torch.testing.assert_close(from_pil, from_paths)
    # 32 px: no resize, only float rounding differs. 48 px: PIL's and torch's antialiased bicubic
    # differ slightly on edges (measured: features move by at most 4e-4).
    atol = 1e-5 if size == 32 else 2e-3
    torch.testing.assert_close(from_tensor, from_paths, atol=atol, rtol=0)
    assert (from_tensor * from_paths).sum(1).min() > 0.999


def test_second_run_does_no_encoding(encoder, tmp_path, monkeypatch):
    images = make_images(10, size=32, seed=4).images
    calls = count_calls(encoder, monkeypatch)
    first = FeatureCache(tmp_path, encoder, shard_size=4).features(images, batch_size=3)
    assert calls == [4, 4, 2] and len(FeatureCache(tmp_path, encoder).shard_paths()) == 3
    calls.clear()
    again = FeatureCache(tmp_path, encoder, shard_size=4)
    assert torch.equal(again.features(images), first)
    assert calls == [] and again.num_encoded == 0
    # A superset encodes only the new images, and order follows the request, not the cache.
    new = make_images(2, size=32, seed=40).images
    mixed = again.features(torch.cat([new, images]))
    assert calls == [2] and again.num_encoded == 2
    assert torch.equal(mixed[2:], first)
    torch.testing.assert_close(mixed[:2], encoder.encode_images(new))


def test_duplicate_images_are_encoded_once(encoder, tmp_path):
    images = make_images(3, size=32, seed=5).images
    cache = FeatureCache(tmp_path, encoder)
    feats = cache.features(torch.cat([images, images[:1]]))
    assert cache.num_encoded == 3 and torch.equal(feats[3], feats[0])


def test_killed_run_keeps_finished_shards(encoder, tmp_path, monkeypatch):
    images = make_images(10, size=32, seed=6).images
    calls = count_calls(encoder, monkeypatch, fail_on_call=3)
    with pytest.raises(SimulatedKill):
        FeatureCache(tmp_path / "cache", encoder, shard_size=4).features(images)
    cache = FeatureCache(tmp_path / "cache", encoder, shard_size=4)
    assert len(cache.shard_paths()) == 2  # 8 images saved, the third shard lost
    assert not list(cache.dir.glob(".*.tmp"))  # no half-written shard left behind

    calls.clear()
    resumed = cache.features(images)
    assert calls == [2] and cache.num_encoded == 2
    reference = FeatureCache(tmp_path / "fresh", encoder, shard_size=4).features(images)
    torch.testing.assert_close(resumed, reference)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_corrupt_shard_is_reported_and_recomputed(encoder, tmp_path, damage):
    images = make_images(9, size=32, seed=7).images
    reference = FeatureCache(tmp_path, encoder, shard_size=4).features(images)
    shard = FeatureCache(tmp_path, encoder).shard_paths()[1]
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-5] ^= 0xFF  # inside the last feature value: the file still parses
    shard.write_bytes(bytes(data))

    cache = FeatureCache(tmp_path, encoder, shard_size=4)
    with pytest.warns(UserWarning, match=r"shard-00001\.safetensors: corrupt feature shard"):
        feats = cache.features(images)
    assert cache.num_encoded == 4  # exactly the damaged shard's images
    torch.testing.assert_close(feats, reference)
    assert shard.with_name(shard.name + ".corrupt").exists()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the damaged file is out of the way: no warning again
        cache = FeatureCache(tmp_path, encoder)
        assert torch.equal(cache.features(images), feats) and cache.num_encoded == 0


def test_in_memory_images_are_keyed_by_content(encoder, tmp_path):
    images = make_images(2, size=32, seed=8).images
    cache = FeatureCache(tmp_path, encoder)
    cache.features(images)
    nudged = images.clone()
    nudged[0, 0, 0, 0] = 1.0 - nudged[0, 0, 0, 0]  # one changed pixel is a new image
    cache.features(nudged)
    assert cache.num_encoded == 3


def test_unknown_model_name_is_a_user_error():
    with pytest.raises(
        UserError,
        match=r"unknown open_clip model 'ViT-B-33' \(did you mean .*ViT-B-32.*list_models",
    ):
        load_clip("ViT-B-33", "openai")


def test_tag_with_no_cached_weights_offline_says_how_to_get_them(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # What HF_HUB_OFFLINE=1 sets at import time; with an empty cache nothing can be found.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        UserError, match=r"ViT-B-32 / openai: could not get the weights \(HF_HUB_OFFLINE"
    ) as e:
        load_clip("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert "pretrained=/path/to/file" in str(e.value) and "\n" not in str(e.value)


def test_user_mistakes_are_one_line_errors(tiny_dir, tmp_path, encoder):
    with pytest.raises(UserError, match="no weights given"):
        load_clip(TINY)
    with pytest.raises(UserError, match="unknown pretrained tag 'laion9'"):
        load_clip("ViT-B-32", "laion9")
    with pytest.raises(UserError, match="missing.pt: checkpoint file not found"):
        load_clip(TINY, str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="no open_clip_config.json"):
        load_clip(str(tmp_path))
    with pytest.raises(UserError, match="pretrained='openai' is ignored"):
        load_clip(str(tiny_dir), "openai")
    with pytest.raises(UserError, match=r"in \[0, 1\]"):
        encoder.encode_images(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(UserError, match="nope.png: image file not found"):
        FeatureCache(tmp_path, encoder).features([tmp_path / "nope.png"])


def test_extract_features_over_a_directory(tiny_dir, tmp_path):
    images = quantised(make_images(5, size=32, seed=9).images)
    paths = write_pngs(images, tmp_path / "imgs")
    files, feats, cache = extract_features(
        [tmp_path / "imgs"], str(tiny_dir), None, tmp_path / "c", 2
    )
    assert files == paths and feats.shape == (5, 32) and cache.num_encoded == 5
    files, again, cache = extract_features(paths[::-1], str(tiny_dir), None, tmp_path / "c", 2)
    assert cache.num_encoded == 0 and torch.equal(again, feats.flip(0))
    assert np.allclose(again.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_hub_id_loads_from_the_local_hub_cache_offline(tiny_dir, tmp_path, monkeypatch, encoder):
    import huggingface_hub.constants

    # A Hugging Face cache as `hf_hub_download` leaves it: snapshot symlinks into sha256 blobs.
    repo = tmp_path / "models--pd--tiny-clip"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        digest = file_sha256(tiny_dir / name)
        (repo / "blobs" / digest).write_bytes((tiny_dir / name).read_bytes())
        (repo / "snapshots" / commit / name).symlink_to(repo / "blobs" / digest)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    hub = load_clip("hf-hub:pd/tiny-clip", cache_dir=str(tmp_path))
    weights_sha = file_sha256(tiny_dir / "open_clip_model.safetensors")
    assert hub.name == f"hf-hub:pd/tiny-clip@{weights_sha[:16]}"
    images = make_images(2, size=32, seed=10).images
    torch.testing.assert_close(hub.encode_images(images), encoder.encode_images(images))
    with pytest.raises(UserError, match="hf-hub:pd/missing: could not get the weights"):
        load_clip("hf-hub:pd/missing", cache_dir=str(tmp_path))
