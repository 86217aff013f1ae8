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


_MEASUREMENTS: list = []


@pytest.fixture
def report():
    """`report(line)`: a measurement shown in the run's summary (pytest captures print())."""
    return _MEASUREMENTS.append


def pytest_terminal_summary(terminalreporter):
    if _MEASUREMENTS:
        terminalreporter.section("measurements")
        for line in _MEASUREMENTS:
            terminalreporter.write_line(line)
