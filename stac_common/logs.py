"""Known, harmless notes from libraries we depend on, dropped by exact text at import.

- torch logs "Triton not available" once per SpikingJelly kernel on a machine without Triton,
  while SpikingJelly uses its CPU kernels.
- bitsandbytes warns on every float32 forward that it casts activations to float16 (its
  LLM.int8() design, stated in our int8 docs).
- torchao warns at import that it cannot load its MX-FP8 and CUTLASS-sm90a CUDA kernels, which
  int8 weight-only never calls, and torch that torchao registers its Enums the old way;
  transformers imports torchao whenever it loads a model class.
- torch warns once that sparse CSR tensors are "in beta state" when ``--use_sparse`` first
  builds one (the event-driven simulation, ``spike_modules.sparse``, is tested against dense).
Filters act on records emitted after they are installed, so the first STAC import installs them.
"""

import logging
import warnings


def quiet_known_notes() -> None:
    logging.getLogger("torch._library.triton").addFilter(lambda r: "Triton not available" not in r.getMessage())
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        lambda r: not str(r.msg).startswith("MatMul8bitLt: inputs will be cast from"))
    logging.getLogger("torchao").addFilter(
        lambda r: not (str(r.msg).startswith("Failed to load") and ("_C_mxfp8" in str(r.msg) or "_C_cutlass" in str(r.msg))))
    logging.getLogger("torch.utils._pytree").addFilter(lambda r: "is an Enum subclass and is now" not in str(r.msg))
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)


quiet_known_notes()
