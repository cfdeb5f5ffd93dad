"""The library backends of :func:`calibration.int8.quantize_weights_`: bitsandbytes and torchao.

Both are optional and imported lazily. :func:`require` checks that a backend is installed *and*
runs 8-bit on the device at hand (a tiny probe layer), and raises
:class:`BackendUnavailableError` with the install command otherwise; nothing ever falls back to
another backend.

- ``bnb``: ``bitsandbytes.nn.Linear8bitLt(has_fp16_weights=False, threshold=6.0)``, the LLM.int8()
  scheme: int8 weights per output channel *and* int8 activations per token, with the activation
  columns holding a value ``>= threshold`` multiplied in float against the dequantized weight
  columns. 6.0 is the paper's and transformers' default, and it matters here: at threshold 0 a
  token whose ``down_proj`` input reaches the thousands (docs/design.md section 1) gets an int8 step of ~20 for
  all its channels, wiping out the ones near 1. bitsandbytes casts activations to float16 to
  quantize them; values beyond 65504 become inf, which the outlier split keeps out of the int8
  part. On CPU (no AVX-512) its int8 matmul runs as a float matmul. All this holds in eval mode;
  in training mode its CPU path multiplies by the dequantized weight in float (weight-only).
- ``torchao``: ``quantize_(model, Int8WeightOnlyConfig(), filter_fn)``, weight-only int8 per output
  channel (``PerRow``), the same scheme as the ``own`` backend. ``set_inductor_config=False``: the
  default rewrites global torch.compile settings, which converting a model must not do.

Saving and loading: a ``Linear8bitLt``'s state dict holds its int8 weight and ``SCB`` scales as plain
tensors, and loads into a shell built from any weight. torchao's weight is a tensor subclass that
safetensors cannot write, so each torchao layer gets a pair of state-dict hooks
(:func:`torchao_state_dict_hooks`): its state dict holds ``weight_qdata`` (int8), ``weight_scale``
(and any other tensor of the subclass) instead of ``weight``, and loading rebuilds the subclass
from them. Either way the reloaded layer holds the same int8 numbers and computes the same outputs.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

BNB_THRESHOLD = 6.0
PINS = {"bnb": "bitsandbytes==0.50.2", "torchao": "torchao==0.18.0"}
INSTALL = {name: f"python -m pip install --no-deps {pin}" for name, pin in PINS.items()}
_DIST = {"bnb": "bitsandbytes", "torchao": "torchao"}
_PROBED: set[tuple[str, str]] = set()


class BackendUnavailableError(RuntimeError):
    """An 8-bit backend that is not installed or cannot run on this device."""


def _unavailable(backend: str, why: str) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"8-bit backend {backend!r} is unavailable: {why}. Install it with `{INSTALL[backend]}` "
        f"(--no-deps keeps pip from replacing the CPU torch; its other dependencies are in requirements.txt)")




def require(backend: str, device: torch.device | str = "cpu"):
    """Import ``backend``'s library and prove it runs 8-bit on ``device``; return the module.

    Raises:
        BackendUnavailableError: not installed, or the probe layer fails or is off on ``device``.
    """
    if backend not in PINS:
        raise ValueError(f"no library backend {backend!r}; library backends: {', '.join(PINS)}")
    device = torch.device(device)
    try:
        lib = importlib.import_module(_DIST[backend])
    except ImportError as e:
        raise _unavailable(backend, f"{_DIST[backend]} cannot be imported ({e})") from e
    if (backend, str(device)) not in _PROBED:
        _probe(backend, device, lib.__version__)
        _PROBED.add((backend, str(device)))
    return lib


def _probe(backend: str, device: torch.device, installed: str) -> None:
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 64, generator=g))
        linear.bias.copy_(torch.randn(16, generator=g))
    linear = linear.to(device)
    x = torch.randn(8, 64, generator=g).to(device)
    try:
        q = bnb_linear(linear.weight, linear.bias) if backend == "bnb" else torchao_linear(linear.weight, linear.bias)
        q.eval()  # inference: bitsandbytes runs its int8 matmul only in eval mode
        with torch.no_grad():
            ref, out = linear(x), q(x)
    except Exception as e:  # re-raised: the backend cannot be used here
        raise _unavailable(backend, f"{_DIST[backend]} {installed} cannot run int8 on {device}: "
                                    f"{type(e).__name__}: {e}") from e
    rel = float((out.float() - ref).norm() / ref.norm())
    if not rel < 0.05:  # int8 on this probe gives about 0.005; NaN fails too
        raise _unavailable(backend, f"{_DIST[backend]} {installed} on {device} gives a relative error of "
                                    f"{rel:.3g} on a probe layer (int8 should give < 0.05)")


def bnb_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A ``Linear8bitLt`` holding ``weight`` (``[out, in]``) in int8, on ``weight``'s device.

    bitsandbytes quantizes when a float ``Int8Params`` on the CPU moves ``.to`` a device (the CPU
    included), so the weight is staged on the CPU first.
    """
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                threshold=BNB_THRESHOLD, device="meta")
    layer.weight = bnb.nn.Int8Params(weight.detach().to("cpu", copy=True), requires_grad=False,
                                     has_fp16_weights=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu", copy=True), requires_grad=False)
    return layer.to(weight.device)


def bnb_parts(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 weight [out, in], float scale [out] = absmax)`` of a quantized ``Linear8bitLt``;
    its first forward moves them from the weight into ``layer.state``."""
    scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    return layer.weight.data, scb


def bnb_dequantize(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    cb, scb = bnb_parts(layer)
    return bnb.functional.int8_vectorwise_dequant(cb, scb).float()


def torchao_config():
    from torchao.quantization import Int8WeightOnlyConfig, PerRow

    return Int8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False)


def torchao_quantize_(model: nn.Module, paths: list[str]) -> None:
    """torchao int8 weight-only on the ``nn.Linear`` modules at ``paths`` only (its ``filter_fn``),
    each with :func:`torchao_state_dict_hooks` so the model saves as plain tensors."""
    from torchao.quantization import quantize_

    chosen = set(paths)
    quantize_(model, torchao_config(), filter_fn=lambda module, fqn: fqn in chosen)
    missed = [p for p in paths if not _is_torchao(model.get_submodule(p))]
    if missed:
        raise RuntimeError(f"torchao left these layers unquantized: {missed[:8]}")
    for p in paths:
        torchao_state_dict_hooks(model.get_submodule(p))


def _torchao_tensor_names(weight: torch.Tensor) -> list[str]:
    """The tensors a torchao weight holds: ``qdata``, ``scale``, then the optional ones it has."""
    cls = type(weight)
    return list(cls.tensor_data_names) + [n for n in cls.optional_tensor_data_names
                                          if getattr(weight, n) is not None]


def _torchao_save_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    weight = state_dict.pop(prefix + "weight")
    for name in _torchao_tensor_names(weight):
        state_dict[f"{prefix}weight_{name}"] = getattr(weight, name).detach()


def _torchao_load_hook(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Rebuild the weight from its saved tensors (the shell's subclass gives the rest: block size,
    dtype); the default loader then copies it into the shell's weight."""
    shell = module.weight
    names = _torchao_tensor_names(shell)
    keys = [f"{prefix}weight_{n}" for n in names]
    if not all(k in state_dict for k in keys):
        return  # missing keys: the default loader reports "weight" missing
    tensors = {n: state_dict.pop(k) for n, k in zip(names, keys)}
    attrs = {n: getattr(shell, n) for n in type(shell).tensor_attribute_names}
    optional = {n: tensors[n] for n in type(shell).optional_tensor_data_names if n in tensors}
    required = [tensors[n] for n in type(shell).tensor_data_names]
    state_dict[prefix + "weight"] = type(shell)(*required, **attrs, **optional)


def torchao_state_dict_hooks(layer: nn.Module) -> nn.Module:
    """Let a torchao-quantized ``nn.Linear`` save its weight as plain tensors and load it back."""
    layer.register_state_dict_post_hook(_torchao_save_hook)
    layer.register_load_state_dict_pre_hook(_torchao_load_hook)
    return layer


def torchao_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A standalone torchao int8 weight-only ``nn.Linear`` (used by the probe)."""
    from torchao.quantization import quantize_

    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    quantize_(layer, torchao_config(), filter_fn=lambda module, fqn: fqn == "")
    return layer


def _is_torchao(module: nn.Module) -> bool:
    return type(getattr(module, "weight", None)).__name__ == "Int8Tensor"


def torchao_dequantize(layer: nn.Module) -> torch.Tensor:
    return layer.weight.dequantize().float()


def stored_bytes(backend: str, layer: nn.Module) -> int:
    """Bytes a quantized layer holds: its int8 weight, scales and bias."""
    bias = 0 if layer.bias is None else layer.bias.nbytes
    if backend == "bnb":
        cb, scb = bnb_parts(layer)
        return cb.nbytes + scb.nbytes + bias
    w = layer.weight
    extra = sum(getattr(w, n).nbytes for n in type(w).optional_tensor_data_names if getattr(w, n) is not None)
    return w.qdata.nbytes + w.scale.nbytes + extra + bias
