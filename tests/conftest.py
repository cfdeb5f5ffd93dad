"""Session fixtures shared by test files: the trained tiny Llama (trained once per session)."""

import pytest
from trained_tiny import save_trained


@pytest.fixture(scope="session")
def trained_llama(tmp_path_factory):
    """A tiny Llama trained on Hamlet (``trained_tiny``), saved as a Hugging Face folder."""
    return save_trained(tmp_path_factory.mktemp("trained_llama") / "model", "llama")
