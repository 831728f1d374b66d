"""Suite-wide settings: one torch thread and a private stage cache.

The test models are tiny, so per-op overhead dominates and a second thread mostly adds OpenMP
barrier waits (measured 3x slower on a busy 2-core machine). The cache variable keeps tests from
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
