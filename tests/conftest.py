"""Session fixtures shared by test files: the trained tiny Llama (trained once per session) and its SNN
(converted once per session)."""

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


@pytest.fixture(scope="session")
def trained_snn_dir(trained_llama, tmp_path_factory):
    """The trained tiny Llama converted in full mode (rate coding, T=8) and saved, once per session;
    each test module loads its own copy from the directory."""
    from stac_lm.convert.options import ConvertOptions
    from stac_lm.convert.pipeline import run

    out = tmp_path_factory.mktemp("trained_snn") / "snn"
    run(ConvertOptions(model_name=str(trained_llama), output_dir=str(out), calib_tokens=256, eval_tokens=512,
                       verify=False, timesteps=8, coding="rate", int8_rounding="nearest"),
        progress=False)  # the rounding the tests' measured figures were taken with (the default is GPTQ's now)
    return out
