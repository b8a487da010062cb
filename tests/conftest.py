import os

import pytest
import torch

# Two cores on CI: more threads only contend.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
