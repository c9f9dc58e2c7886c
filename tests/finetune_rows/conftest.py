"""One BLAS thread for the row-sparse tests: tiny matmuls gain nothing from more threads and
lose a lot on a busy machine."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run the module's tests on one thread, then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
