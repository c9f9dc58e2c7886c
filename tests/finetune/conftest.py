"""Fine-tuning tests run with one BLAS thread: their tiny matmuls gain nothing from more, and on
a busy machine two threads per process make them many times slower (spin-waiting)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One thread for the test, the previous count restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
