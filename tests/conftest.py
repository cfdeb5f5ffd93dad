"""Session fixtures shared by test files: the trained tiny Llama (trained once per session)."""

import pytest
import torch
from trained_tiny import save_trained


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    models gain nothing from threads, and spinning threads slow a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def trained_llama(tmp_path_factory):
    """A tiny Llama trained on Hamlet (``trained_tiny``), saved as a Hugging Face folder."""
    return save_trained(tmp_path_factory.mktemp("trained_llama") / "model", "llama")
