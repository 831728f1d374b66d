"""configs/sd15.yaml as the README writes it, on a base with Stable Diffusion 1.5's architecture
(random weights, narrower blocks, built offline): DDPO and DRaFT train, a run resumes,
`generate` draws per taste, and diffusers' own loader reads the LoRA."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from plural_diffusion.cli import CONFIGS, main
from plural_diffusion.ddpo import latest_checkpoint
from plural_diffusion.sd15_random import SD15_CPU, save_sd15_random
from reward_models.errors import UserError

SD15_YAML = str(CONFIGS / "sd15.yaml")


@pytest.fixture(scope="module")
def sd15_base(tmp_path_factory):
    return save_sd15_random(tmp_path_factory.mktemp("sd15") / "base", SD15_CPU)


@pytest.fixture
def fresh_accelerate():
    """sd15.yaml trains in bf16; accelerate keeps one precision per process unless reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def cli(*argv: str) -> None:
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    assert done.value.code == 0


def log_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~30 s on a 2-core CPU, besides the shared reward-run fixture
def test_sd15_yaml_trains_resumes_and_generates_on_an_sd15_shaped_base(
    sd15_base, reward_run, tmp_path, fresh_accelerate
):
    common = [f"base={sd15_base}", f"rewards={reward_run}", "sampling.steps=2", "resolution=64"]
    # DDPO at sd15.yaml's batches: 8 images per sampling batch over the run's 3 clusters,
    # 32 per epoch in minibatches of 4, 2 optimizer updates per epoch
    ddpo = tmp_path / "ddpo"
    cli("train", "--config", SD15_YAML, *common, f"out_dir={ddpo}", "epochs=1")
    cli("train", "--config", SD15_YAML, *common, f"out_dir={ddpo}", "epochs=2", "--resume")
    log = log_of(ddpo)
    assert [e["epoch"] for e in log] == [0, 1]
    assert [e["optimizer_steps"] for e in log] == [2, 2]
    assert all(sum(t["n"] for t in e["per_taste"].values()) <= 32 for e in log)  # 10% null
    assert all(torch.isfinite(torch.tensor(e["reward_mean"])) for e in log)

    draft = tmp_path / "draft"
    cli(
        "train",
        "--config",
        SD15_YAML,
        *common,
        f"out_dir={draft}",
        "method=draft",
        "epochs=1",
        "draft.steps_per_epoch=1",
    )
    assert log_of(draft)[0]["epoch"] == 0

    ckpt = latest_checkpoint(ddpo / "checkpoints")
    out = tmp_path / "images"
    cli(
        "generate",
        "--base",
        str(sd15_base),
        "--checkpoint",
        str(ckpt),
        "--rewards",
        str(reward_run),
        "--steps",
        "2",
        "--seeds",
        "1",
        "--prompt",
        "a bowl of fruit",
        "--out",
        str(out),
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["tastes"]) == 3 and len(manifest["prompts"][0]["images"]) == 3

    # the trained LoRA is a plain diffusers LoRA for SD 1.5
    pipe = StableDiffusionPipeline.from_pretrained(str(sd15_base))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(500)
    text = torch.randn(1, 77, 768)
    with torch.no_grad():
        base_out = pipe.unet(x, t, encoder_hidden_states=text).sample
        pipe.load_lora_weights(ckpt / "policy", weight_name="pytorch_lora_weights.safetensors")
        tuned_out = pipe.unet(x, t, encoder_hidden_states=text).sample
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
    assert not torch.equal(base_out, tuned_out)


def test_sd15_yaml_refuses_a_base_that_is_not_sd15_shaped(
    toy_assets, reward_run, tmp_path, fresh_accelerate
):
    from plural_diffusion.ddpo import Trainer
    from plural_diffusion.train_config import TrainConfig
    from reward_models.config import load_config

    cfg = load_config(
        TrainConfig,
        SD15_YAML,
        [f"base={toy_assets.base}", f"rewards={reward_run}", f"out_dir={tmp_path}"],
    )
    with pytest.raises(UserError, match="expect_architecture=sd15 but its text states are 64 wide"):
        Trainer(cfg)
