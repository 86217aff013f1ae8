"""Shared fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of small models: on a busy 2-core machine a second thread
    only adds contention (several times slower here). Use with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
