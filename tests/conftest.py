import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="run slow tests (full sweeps)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running checks, run with --slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One torch thread for the whole suite: its tensors are small, and on a shared 2-core
    machine extra threads only add contention (several times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
