"""``report.json``: the measured verification plus what was converted and how long it took,
and the rich table that summarises it."""

from __future__ import annotations

import time

from rich.table import Table

REQUIRED = ("ppl_ann", "ppl_snn", "top1_agreement", "timesteps", "mode", "mean_spike_rate", "coverage",
            "energy_ratio", "conversion_seconds")


def assemble_report(measured: dict, config: dict) -> dict:
    """``measured`` (from :func:`stac_lm.checks.verify.verify`) with the run's facts from the saved ``config``."""
    texts = config["texts"]
    report = dict(measured)
    report.update(
        model=config["source"]["model_id"], source=config["source"], mode=config["mode"],
        timesteps=config["timesteps"], options=config["options"],
        conversion_seconds=config["conversion_seconds"], step_seconds=config["step_seconds"],
        conversion_seconds_covers="load, texts, convert, calibrate, 8-bit weights and fine-tune (not verify or save)",
        calib_tokens=texts["calibration"]["tokens_used"], eval_tokens=texts["evaluation"]["tokens_used"],
        texts=texts, quantization=config["quantization"]["summary"], finetune=config["finetune"],
        silence=config.get("silence"), memory=config.get("memory"),
        verified_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    missing = [k for k in REQUIRED if k not in report]
    if missing:
        raise ValueError(f"report is missing {missing}")
    return report


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _traffic(m: dict | None) -> str:
    """SNN bytes per token over the float ANN's and the int8 ANN's (older reports have no estimate)."""
    if not m:
        return "-"
    return f"{m['snn_over_ann']:.2f}x / {m['snn_over_ann_int8']:.2f}x"


def _total(t: dict | None) -> str:
    """Total energy per decoded token over the int8, bf16 and float32 ANNs' (older reports have none)."""
    if not t:
        return "-"
    return f"{t['snn_over_ann_int8']:.2f}x / {t['snn_over_ann_bf16']:.2f}x / {t['snn_over_ann_fp32']:.2f}x"


def _crossing(t: dict | None) -> str:
    """Where the SNN's decode energy meets the int8 ANN's as the context grows (older reports have none)."""
    if not t or "crossing_context" not in t:
        return "-"
    c = t["crossing_context"]["ann_int8"]
    cheaper = "SNN" if c["snn_cheaper_beyond"] else "int8 ANN"
    return f"{cheaper} cheaper at every longer context" if c["context"] is None else \
        f"{c['context']:,.0f} keys; past it the {cheaper} is cheaper"


def _silent(t: dict | None) -> str:
    if not t:
        return "-"
    per = t["silence"]["per_token"]
    return f"{per['mean']:.1%} (5-95%: {per['p05']:.1%}-{per['p95']:.1%})"


def _peak(peak: dict | None) -> str:
    if not peak or peak.get("site") is None:
        return "-"
    return f"{peak['spikes']:,.0f} (T={peak['timesteps']}, {peak['site'].removeprefix('model.')})"


def _memory(m: dict | None) -> str:
    """Peak resident memory of the run, and the budget it was held to (older reports have none)."""
    if not m or "peak_rss_bytes" not in m:
        return "-"
    way = "layer by layer" if m.get("layerwise") else "whole model"
    budget = f", budget {m['max_memory']['cpu']}" if (m.get("max_memory") or {}).get("cpu") else ""
    return f"{m['peak_rss_bytes'] / 2**30:.2f} GiB ({way}{budget})"


def report_table(report: dict) -> Table:
    """The summary table ``make demo`` prints."""
    table = Table(title=f"STAC SNN: {report['model']}, {report['mode']} mode, T={report['timesteps']}",
                  caption_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("perplexity ANN", report["ppl_ann"]), ("perplexity SNN", report["ppl_snn"]),
        ("perplexity ratio SNN/ANN", report["ppl_ratio"]), ("top-1 agreement", report["top1_agreement"]),
        ("mean spike rate", report["mean_spike_rate"]),
        ("most spikes of one neuron for one token", _peak(report["spikes"].get("peak_spikes_per_token"))),
        ("coverage (spike-driven MACs)", report["coverage"]),
        ("total energy / token SNN over int8 / bf16 / fp32 ANN (batch-1 decode, DRAM)",
         _total(report.get("energy_total"))),
        ("total energy equal to the int8 ANN's at context", _crossing(report.get("energy_total"))),
        ("weight bytes left unread per token (silent channels)", _silent(report.get("energy_total"))),
        ("operation energy SNN / fp32 ANN (op counts)", report["energy_ratio"]),
        ("memory traffic SNN / float ANN / int8 ANN (est.)", _traffic(report["energy"].get("memory_traffic"))),
        ("parallel vs sequential top-1 (not gated)", report["sequential"]["top1_agreement"]),
        ("sequential counts off the parallel ones", report["sequential"]["sites"]["off_share"]),
        ("conversion seconds", report["conversion_seconds"]),
        ("peak resident memory", _memory(report.get("memory"))),
        ("eval tokens / calib tokens", f"{report['eval_tokens']} / {report['calib_tokens']}"),
    ]
    if "ppl_relu_ann" in report:
        rows.insert(2, ("perplexity ReLU ANN (no spikes)", report["ppl_relu_ann"]))
    for name, value in rows:
        table.add_row(name, _fmt(value))
    for check in report["checks"]:
        mark = "[green]pass[/]" if check["passed"] else "[red]FAIL[/]"
        table.add_row(f"check: {check['name']}", mark)
    gen = report["generation"]
    table.caption = (f"perplexity: {report['protocol']}; total energy: arithmetic + DRAM/SRAM traffic at each "
                     f"model's widths, 45 nm table (report.json: energy_total.convention, .table, .scenarios); "
                     f"operation energy: the field's op-count convention (energy.convention)\n"
                     f"prompt {gen['prompt']!r}\n  ANN: {gen['ann']!r}\n"
                     f"  SNN: {gen['snn']!r}")
    return table
