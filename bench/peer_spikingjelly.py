"""The peer: SpikingJelly 2.0's own LLM conversion (``Qwen2SNNRecipe``), measured as STAC is.

The recipe puts per-channel signed QCFS encoders (a positive and a negative
``ActivationAwareIFNode`` per channel) at the token embeddings, Q and K after
rotary, V, and the MLP down-projection input of a Hugging Face Qwen2 model; every
other operator (q/k/v/o/gate/up projections, RMSNorm, SiLU, the gate product,
softmax attention, the head) runs in temporal-difference form on float ``[T, B, S, H]``
sequences. Scales come from ``calibrate_qwen2_snn``: the per-channel ``quantile`` of
``|x|`` on calibration tokens, divided by ``levels``; counts are clipped to ``[-T, T]``.

SmolLM2 is a Llama, which is a Qwen2 without q/k/v biases, so :func:`llama_to_qwen2`
copies it into Qwen2 form with zero biases (identical logits, checked). :func:`run_peer`
calibrates, converts with ``ModuleConverter``, runs the true signed-IF simulation
(``encoding_mode="signed_if"``) under ``stac_lm.eval.perplexity.evaluate_lm`` and times it against the ANN.

    python -m bench.peer_spikingjelly --timesteps 16,32 --out docs/bench_peer_spikingjelly.json --overwrite
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
from torch import nn

from bench.timing import model_latency
from stac_lm.eval.perplexity import evaluate_lm, windows
from stac_common.runtime import input_device

SITE_KINDS = ("input", "query", "key", "value", "mlp")
SPIKING_SITES = ("signed IF encoders (positive + negative ActivationAwareIFNode, per-channel threshold) at: the "
                 "token embeddings; per layer Q and K after rotary, V, and the MLP down-projection input "
                 "(silu(gate) * up). Float temporal-difference sequences everywhere else: inputs of q/k/v/o/gate/up "
                 "projections, RMSNorm, SiLU, the gate product, softmax attention on accumulated Q/K/V, lm_head.")
PROBE_TOKENS = 64


def llama_to_qwen2(model: nn.Module, check: bool = True) -> nn.Module:
    """A ``Qwen2ForCausalLM`` holding the weights of a Llama-family causal LM, with zero q/k/v biases.

    Llama and Qwen2 differ only in Qwen2's q/k/v biases (and its optional sliding window, left
    off), so the copy computes the same function. With ``check`` the two models' float logits on
    a probe sequence must be bit-identical.

    Raises:
        ValueError: ``model`` is not a Llama causal LM, or has biases Qwen2 cannot hold (o_proj, MLP).
        RuntimeError: ``check`` found logits that differ.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "llama":
        raise ValueError(f"llama_to_qwen2 needs a Llama-family causal LM (config.model_type 'llama'), "
                         f"got {getattr(cfg, 'model_type', type(model).__name__)!r}")
    if cfg.attention_bias or cfg.mlp_bias:
        raise ValueError("Qwen2 has no o_proj or MLP biases; a Llama with attention_bias or mlp_bias cannot be "
                         "copied into Qwen2 form")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    qcfg = Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=dict(cfg.rope_parameters),
        use_sliding_window=False, attention_dropout=cfg.attention_dropout, pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, head_dim=head_dim)
    qcfg._attn_implementation = cfg._attn_implementation
    weight = model.get_input_embeddings().weight
    qwen = Qwen2ForCausalLM(qcfg).to(device=weight.device, dtype=weight.dtype).eval()
    missing, unexpected = qwen.load_state_dict(model.state_dict(), strict=False)
    biases = {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(cfg.num_hidden_layers) for p in "qkv"}
    if unexpected or set(missing) != biases:
        raise ValueError(f"Llama -> Qwen2 key mismatch: unexpected {unexpected[:4]}, "
                         f"missing {sorted(set(missing) - biases)[:4]}")
    with torch.no_grad():
        for layer in qwen.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.zero_()
    if check:
        probe = torch.arange(PROBE_TOKENS, device=weight.device)[None] % cfg.vocab_size
        with torch.inference_mode():
            a, b = model(probe).logits, qwen(probe).logits
        if not torch.equal(a, b):
            raise RuntimeError(f"the Qwen2 copy's logits differ from the Llama model's by up to "
                               f"{float((a - b).abs().max()):.3g}")
    return qwen


def peer_config(T: int, levels: int | None = None, quantile: float = 1.0, **extra):
    """``Qwen2SNNConfig`` for ``T`` steps; ``levels`` (default ``T``) sets the step ``scale = bound / levels``.

    Raises:
        ValueError: ``T`` or ``levels`` is not a positive integer, ``levels > T``, or ``quantile``
            lies outside (0, 1].
    """
    from spikingjelly.activation_based.ann2snn.recipes import Qwen2SNNConfig

    levels = T if levels is None else levels
    for name, v in (("T", T), ("levels", levels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if levels > T:
        raise ValueError(f"levels must lie in [1, T] (SpikingJelly clips counts to T), got levels={levels} > T={T}")
    if not 0.0 < float(quantile) <= 1.0:
        raise ValueError(f"quantile must lie in (0, 1], got {quantile}")
    return Qwen2SNNConfig(time_steps=T, calibration_levels=levels, calibration_quantile=float(quantile), **extra)


def calibrate_peer(qwen: nn.Module, ids: torch.Tensor, config, window: int = 512, batch_size: int = 4):
    """SpikingJelly's ``calibrate_qwen2_snn`` over ``window``-token windows of the 1-D ``ids``."""
    from spikingjelly.activation_based.ann2snn.recipes import calibrate_qwen2_snn

    device = input_device(qwen)
    batches = [{"input_ids": b.to(device), "attention_mask": torch.ones_like(b, device=device)}
               for b in windows(ids, window).split(batch_size)]
    return calibrate_qwen2_snn(qwen, batches, config)


class PeerLM(nn.Module):
    """The converted ``Qwen2SNNModel`` behind the causal-LM call ``model(ids).logits``.

    Its TD operators keep cumulative state across calls of the same shape, so every call
    starts with ``functional.reset_net``. The first ``stats_calls`` calls run the encoders
    with statistics on (they cost about as much as the simulation) and sum spike counts per
    site kind; later calls run without them.
    """

    def __init__(self, snn: nn.Module, stats_calls: int = 1):
        super().__init__()
        self.snn = snn
        self.stats_calls = stats_calls
        self.calls = 0
        self.spikes = {k: 0 for k in SITE_KINDS}
        self.node_steps = {k: 0 for k in SITE_KINDS}
        self.rel_l2: dict[str, list[float]] = {k: [] for k in SITE_KINDS}

    def forward(self, input_ids: torch.Tensor):
        from spikingjelly.activation_based import functional

        functional.reset_net(self.snn)
        self.snn.set_collect_statistics(self.calls < self.stats_calls)
        self.calls += 1
        out = self.snn(input_ids, encoding_mode="signed_if")
        for enc in self.snn.signed_encoders():
            if enc.collect_statistics:
                s, kind = enc.statistics(), enc.name.rsplit(".", 1)[-1]
                self.spikes[kind] += s["positive_spike_count"] + s["negative_spike_count"]
                self.node_steps[kind] += 2 * s["spike_value_count"]
                self.rel_l2[kind].append(s["local_relative_l2"])
        return out

    def spike_summary(self) -> dict:
        """Spikes per IF node per step (two nodes per channel) and mean relative L2 error of each site kind."""
        return {k: {"spike_rate": self.spikes[k] / self.node_steps[k],
                    "mean_local_relative_l2": sum(self.rel_l2[k]) / len(self.rel_l2[k])}
                for k in SITE_KINDS if self.node_steps[k]}


def convert_peer(qwen: nn.Module, calibration, config, stats_calls: int = 1) -> PeerLM:
    """``ModuleConverter(Qwen2SNNRecipe(calibration, config)).convert(qwen)``, wrapped in :class:`PeerLM`."""
    from spikingjelly.activation_based.ann2snn import ModuleConverter
    from spikingjelly.activation_based.ann2snn.recipes import Qwen2SNNRecipe

    return PeerLM(ModuleConverter(Qwen2SNNRecipe(calibration, config)).convert(qwen), stats_calls).eval()


def spike_driven_share(snn: nn.Module) -> dict:
    """Share of linear-layer MACs per token whose input is a spike train (the down projections)."""
    from spikingjelly.activation_based.ann2snn.operators import TDLinear

    total = {n: m.weight.numel() for n, m in snn.named_modules() if isinstance(m, TDLinear)}
    spiking = sum(v for n, v in total.items() if n.endswith("down_proj"))
    blocks = sum(v for n, v in total.items() if n != "lm_head")
    return {"blocks": spiking / blocks, "with_head": spiking / sum(total.values()),
            "definition": "MACs of linears fed by spike trains / all linear MACs per token (attention matmuls "
                          "run on accumulated Q/K/V and are not counted)"}


def run_peer(model: nn.Module, ids_calib: torch.Tensor, ids_eval: torch.Tensor, T: int, levels: int | None = None,
             quantile: float = 1.0, window: int = 512, batch_size: int = 1, calib_batch_size: int = 4,
             timing_repeats: int = 3, stats_windows: int = 1, progress: bool = True) -> dict:
    """Calibrate, convert and measure SpikingJelly's Qwen2 recipe on ``model`` at ``T`` steps.

    ``model`` is a Llama-family (copied with :func:`llama_to_qwen2`) or Qwen2 causal LM; it is
    the ANN reference. Perplexity and top-1 agreement follow ``stac_lm.eval.perplexity.evaluate_lm`` on 1-D
    ``ids_eval``; spike rates come from the first ``stats_windows`` windows; the latency ratio
    times one ``window``-token forward of each, with the encoders' statistics off.

    Returns a JSON-able dict: T, levels, quantile, ppl_ann, ppl_peer, ratio, top1_agreement,
    latency_ratio, timing, spikes, spike_driven_mac_share, spiking_sites, structure, sj_config,
    calibration_tokens, eval (protocol, windows, tokens), seconds.
    """
    t0 = time.perf_counter()
    config = peer_config(T, levels, quantile)
    for name, v in (("batch_size", batch_size), ("timing_repeats", timing_repeats), ("stats_windows", stats_windows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if model.config.model_type == "qwen2":
        qwen = model
    else:
        qwen = llama_to_qwen2(model)
    calibration = calibrate_peer(qwen, ids_calib, config, window, calib_batch_size)
    peer = convert_peer(qwen, calibration, config, stats_calls=-(-stats_windows // batch_size))
    device = input_device(model)
    lm = evaluate_lm({"ann": model, "peer": peer}, ids_eval.to(device), window=window, batch_size=batch_size,
                     reference="ann", progress=progress)
    spikes = {"per_site_kind": peer.spike_summary(),
              "measured_on": f"first {min(stats_windows, lm['windows'])} window(s)",
              "rate_definition": "spikes per IF node per timestep; each channel has a positive and a negative node"}
    timing = model_latency(model, peer, windows(ids_eval, window)[:1].to(device), timing_repeats, warmup=0, name="peer")
    return {"T": T, "levels": config.calibration_levels, "quantile": config.calibration_quantile,
            "ppl_ann": lm["ppl"]["ann"], "ppl_peer": lm["ppl"]["peer"], "ratio": lm["ppl"]["peer"] / lm["ppl"]["ann"],
            "top1_agreement": lm["top1_agreement"]["peer"], "latency_ratio": timing["ratio"],
            "timing": timing, "spikes": spikes, "spike_driven_mac_share": spike_driven_share(peer.snn),
            "spiking_sites": SPIKING_SITES, "structure": peer.snn.structure_summary(),
            "sj_config": dataclasses.asdict(config) | {"encoding_mode": "signed_if"},
            "calibration_tokens": calibration.valid_token_count,
            "eval": {"protocol": lm["protocol"], "windows": lm["windows"], "tokens": lm["tokens"]},
            "seconds": time.perf_counter() - t0}


def parse_timesteps(text: str) -> list[int]:
    try:
        Ts = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--timesteps must be comma-separated integers such as 16,32, got {text!r}") from None
    if not Ts or min(Ts) < 1:
        raise ValueError(f"--timesteps must be positive, got {text!r}")
    return Ts


def run_peer_on_embedded(Ts: list[int], calib_tokens: int = 8192, eval_tokens: int = 4096, levels: int | None = None,
                         quantile: float = 1.0, progress: bool = True) -> dict:
    """:func:`run_peer` at every ``T`` on the embedded SmolLM2 and STAC's default texts; the JSON report.

    Calibration: the first ``calib_tokens`` tokens of Hamlet, Macbeth and Othello; evaluation: the
    first ``eval_tokens`` of The Tempest (``stac_lm.convert.texts``, as ``run_conversion.py`` reads them).
    """
    from stac_common.assets import load_smollm2
    from stac_lm.convert.texts import load_streams
    from stac_common.runtime import machine_info

    for T in Ts:
        peer_config(T, levels, quantile)
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    calib, evals = load_streams(tok, None, calib_tokens, None, eval_tokens)
    rows = []
    for T in Ts:
        row = run_peer(model, calib.ids, evals.ids, T, levels, quantile, progress=progress)
        print(f"SpikingJelly Qwen2SNNRecipe T={T} levels={row['levels']}: ppl {row['ppl_ann']:.3f} -> "
              f"{row['ppl_peer']:.3f} (ratio {row['ratio']:.3f}), top-1 {row['top1_agreement']:.3f}, "
              f"{row['latency_ratio']:.1f}x ANN latency", flush=True)
        rows.append(row)
    return {"model": "SmolLM2-135M-Instruct (embedded GGUF, float32), copied into Qwen2 form with zero q/k/v biases",
            "recipe": "spikingjelly.activation_based.ann2snn.recipes.Qwen2SNNRecipe via ModuleConverter",
            "calibration": calib.describe(), "evaluation": evals.describe(),
            "machine": machine_info(torch.device("cpu")),
            "note": "latency: median of interleaved single-window forwards on shared CPU cores; the peer's "
                    "encoders run without statistics while timed",
            "seconds": time.perf_counter() - t0, "results": rows}


def main(argv: list[str] | None = None) -> int:
    from stac_common.io import OutputExistsError, check_output_free, write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", default="16,32", help="comma-separated T values (default 16,32)")
    p.add_argument("--levels", type=int, default=None, help="QCFS levels for every T (default: levels = T)")
    p.add_argument("--quantile", type=float, default=1.0, help="per-channel |x| quantile for the scale (default 1.0)")
    p.add_argument("--calib_tokens", "--calib-tokens", type=int, default=8192)
    p.add_argument("--eval_tokens", "--eval-tokens", type=int, default=4096)
    p.add_argument("--out", default="docs/bench_peer_spikingjelly.json")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        Ts = parse_timesteps(args.timesteps)
        for T in Ts:
            peer_config(T, args.levels, args.quantile)
        out = check_output_free(args.out, args.overwrite)
        if args.eval_tokens < 512 or args.calib_tokens < 512:
            raise ValueError("--calib_tokens and --eval_tokens must be >= 512 (one evaluation window)")
    except (ValueError, OutputExistsError) as e:
        p.error(str(e))
    report = run_peer_on_embedded(Ts, args.calib_tokens, args.eval_tokens, args.levels, args.quantile)
    command = " ".join(["python -m bench.peer_spikingjelly", *(sys.argv[1:] if argv is None else argv)])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"benchmark": "bench/peer_spikingjelly.py", "command": command, **report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
