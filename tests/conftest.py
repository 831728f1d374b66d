"""Suite-wide settings: one torch thread and a private stage cache.

The test models are tiny, so per-op overhead dominates and a second thread mostly adds OpenMP
barrier waits. The cache variable keeps tests from
reading or writing the user's ~/.cache/plural-diffusion.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread_and_private_cache(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setenv("PLURAL_DIFFUSION_CACHE", str(tmp_path_factory.mktemp("stage-cache")))
    yield
    mp.undo()
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fast_demo_config():
    """The `demo --fast` config: tiny toy stages that every end-to-end test shares (cached)."""
    from plural_diffusion.configs import CONFIGS
    from plural_diffusion.demo import DemoConfig
    from reward_models.config import load_config

    return load_config(DemoConfig, CONFIGS / "demo-fast.yaml")


@pytest.fixture(scope="session")
def toy_assets(fast_demo_config, _one_thread_and_private_cache):
    from plural_diffusion.toyworld.prepare import prepare_toy

    return prepare_toy(fast_demo_config.prepare, progress=False)


@pytest.fixture(scope="session")
def reward_run(fast_demo_config, toy_assets):
    from plural_diffusion.cache import cache_root
    from plural_diffusion.demo import stage_rewards

    return stage_rewards(fast_demo_config, toy_assets, cache_root())
