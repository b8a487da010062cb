import os

import pytest
import torch

# Two cores on CI: more threads only contend.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _empty_hf_cache(tmp_path_factory):
    """The engine uses model files it finds in the Hugging Face cache; a developer's own
    cache must not change what the tests see (a test that wants one sets HF_HUB_CACHE)."""
    old = os.environ.get("HF_HUB_CACHE")
    os.environ["HF_HUB_CACHE"] = str(tmp_path_factory.mktemp("hf-hub-cache"))
    yield
    if old is None:
        os.environ.pop("HF_HUB_CACHE", None)
    else:
        os.environ["HF_HUB_CACHE"] = old
