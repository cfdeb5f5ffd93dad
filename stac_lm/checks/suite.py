"""The conversational validation suite: load a saved SNN, run the chosen groups of checks, and
summarise them as a table (check, measured figure, bar, PASS/FAIL) and a JSON result.

    from stac_lm.checks.suite import run_suite, checks_table
    result = run_suite("out/chat_smollm2_T16", ["positions", "masks"])
    Console().print(checks_table(result))
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.table import Table
from torch import nn

from calibration import CalibrationConfig

from . import conversation, free_running, masks, quality
from stac_lm.convert.layerwise import peak_memory
from stac_lm.convert.options import parse_max_memory
from stac_lm.convert.pipeline import load_checked_source, within_budget
from stac_lm.generate.processor import TemporalSpikeProcessor
from stac_lm.io.saving import load_snn
from stac_common.runtime import machine_info, place, resolve_device

GROUPS = ("multi_turn", "positions", "masks", "spike_rates", "fidelity")


def load_ann(config: dict, device, offload: bool = False) -> nn.Module:
    """The source model the SNN was converted from; refuses one whose weights changed since. With
    ``offload`` its weights stay on disk, each module's loaded for its own forward."""
    ann = load_checked_source(config, offload=offload)
    return ann if offload else place(ann, device)


class _Steps:
    """Times named steps, shows a spinner on each, and collects their rows and measurements."""

    def __init__(self, console: Console, progress: bool):
        self.console, self.progress = console, progress
        self.rows: list[dict] = []
        self.measurements: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, key: str, text: str) -> Iterator[callable]:
        t0 = time.perf_counter()
        if self.progress:
            with self.console.status(text) as status:
                yield lambda k, n: status.update(f"{text} ({k}/{n})")
        else:
            yield None
        self.seconds[key] = time.perf_counter() - t0
        self.console.print(f"  [green]done[/] {text} in {self.seconds[key]:.1f} s")

    def add(self, key: str, found: tuple[list[dict], dict]) -> None:
        rows, measured = found
        self.rows += rows
        self.measurements[key] = measured


def run_suite(model_dir: str, groups: list[str], *, timesteps: int | None = None, device: str = "auto",
              conversations: int = 50, max_context_length: int = 512, console: Console | None = None,
              progress: bool = True, max_memory: dict | str | None = None) -> dict:
    """Run ``groups`` (of :data:`GROUPS`) on the SNN saved in ``model_dir``; returns the result dict.

    ``max_memory`` (``cpu=SIZE``, CPU only): the SNN loads within the budget (the decoder layers that
    do not fit read from its saved files for each forward), the float64 copy of the exact checks is
    loaded the same way and widened (the layers on disk widen as they load), and the source model
    reads every module's weights from disk for its forward. The result records the peak resident
    memory and whether it stayed within the budget.

    Raises:
        ValueError: an unusable directory, an unknown group, bad ``timesteps`` / ``max_context_length``,
            ``conversations`` < 1, or a source model that changed since conversion.
    """
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown or not groups:
        raise ValueError(f"unknown or no check groups {unknown}; choose from {', '.join(GROUPS)}")
    if isinstance(conversations, bool) or not isinstance(conversations, int) or conversations < 1:
        raise ValueError(f"conversations must be an integer >= 1, got {conversations!r}")
    console = console or Console(stderr=True)
    dev = resolve_device(device)
    if max_memory is not None:
        max_memory = parse_max_memory(max_memory)
        if dev.type != "cpu":
            raise ValueError(f"--max_memory runs the checks on the CPU with layers on disk; got device {device}: "
                             "use --device cpu")
    t_start = time.perf_counter()
    snn, tok, config = load_snn(model_dir, "cpu", max_memory)
    snn = snn if max_memory is not None else place(snn, dev)
    offload = max_memory is not None
    T = config["timesteps"] if timesteps is None else timesteps
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    proc = TemporalSpikeProcessor(snn, T, max_context_length, pad_token_id=pad)
    step = _Steps(console, progress)
    exact = None
    if {"multi_turn", "positions", "masks"} & set(groups):
        with step("float64_copy", "float64 copy of the model (for the exact checks)"):
            exact = conversation.exact_processor(proc, load_snn(model_dir, "cpu", max_memory)[0] if offload else None)
    if "multi_turn" in groups:
        with step("cache_contract_float64", "cache contract, float64 (3 turns)"):
            step.add("cache_contract_float64", conversation.cache_contract(exact, tok))
        with step("cache_contract_float32", "cache contract, float32 (3 turns)"):
            step.add("cache_contract_float32", conversation.cache_contract(proc, tok))
        ann = load_ann(config, dev, offload)
        with step("chitchat", f"multi-turn quality ({conversations} chit-chat conversations)") as tick:
            step.add("chitchat", quality.multi_turn_quality(proc, ann, tok, conversations, config["mode"], tick))
        with step("recall", f"recall probes ({len(quality.FACTS)})"):
            step.add("recall", quality.recall(proc, ann, tok))
        del ann
    if "positions" in groups:
        with step("turn_boundaries", "positions at turn boundaries (float64)"):
            step.add("turn_boundaries", conversation.turn_boundaries(exact, tok))
        with step("context_limit", "positions at the context limit (float64)"):
            step.add("context_limit", conversation.context_limit(exact, tok))
    if "masks" in groups:
        with step("masks", "masks: batched vs alone (float64)"):
            step.add("masks", masks.masks(exact, tok))
    del exact
    if "fidelity" in groups:
        ann = load_ann(config, dev, offload)
        with step("fidelity", "free-running replies beside the ANN's") as tick:
            step.add("fidelity", free_running.free_running(proc, ann, tok, progress=tick))
        del ann
    if "spike_rates" in groups:
        with step("spike_rates", "spike rates and T"):
            calib = CalibrationConfig(**config["calibration_config"])
            step.add("spike_rates", conversation.spike_rates(proc, tok, calib))
    failed = [r["name"] for r in step.rows if r["passed"] is False]
    peak = peak_memory(dev)
    return {"model_dir": str(model_dir), "model": config["source"]["model_id"], "mode": config["mode"],
            "timesteps": T, "calibrated_timesteps": config["timesteps"], "max_context_length": proc.max_context_length,
            "conversations": conversations, "groups": [g for g in GROUPS if g in groups],
            "tolerances": {"rel_tol_float64": conversation.REL_TOL, "top1_min_float64": conversation.TOP1_MIN,
                           "rel_tol_float32": conversation.F32_REL_TOL, "top1_min_float32": conversation.F32_TOP1_MIN,
                           "t_change_min": conversation.T_CHANGE_MIN, "recall_tolerance": quality.RECALL_TOLERANCE,
                           "quality_targets": quality.TARGETS,
                           "fidelity_identity_min": free_running.IDENTITY_MIN,
                           "fidelity_keep_min": free_running.KEEP_MIN},
            "checks": step.rows, "failed": failed, "all_passed": not failed, "measurements": step.measurements,
            "memory": {"max_memory": max_memory, **peak, "within_budget": within_budget(peak["peak_rss_bytes"], max_memory)},
            "seconds": {**step.seconds, "total": time.perf_counter() - t_start}, "machine": machine_info(dev)}


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == int(v) and abs(v) < 1e6:
            return str(int(v))
        return f"{v:.3g}" if abs(v) < 1e-3 else f"{v:.4g}"
    return str(v)


def checks_table(result: dict) -> Table:
    """The rich table of a :func:`run_suite` result."""
    table = Table(title=f"Conversational checks: {result['model']}, {result['mode']} mode, T={result['timesteps']}")
    for col, kw in (("group", {}), ("check", {}), ("measured", {"justify": "right"}), ("bar", {}), ("result", {})):
        table.add_column(col, **kw)
    marks = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "info"}
    for r in result["checks"]:
        table.add_row(r["group"], r["name"], _fmt(r["value"]), r["bar"], marks[r["passed"]])
    table.caption = f"{len(result['checks'])} rows, {len(result['failed'])} failed, {result['seconds']['total']:.0f} s"
    return table


def markdown_table(result: dict) -> str:
    """The same table as Markdown (for docs)."""
    lines = ["| group | check | measured | bar | result |", "|---|---|---:|---|---|"]
    marks = {True: "PASS", False: "FAIL", None: "info"}
    for r in result["checks"]:
        lines.append(f"| {r['group']} | {r['name']} | {_fmt(r['value'])} | {r['bar']} | {marks[r['passed']]} |")
    return "\n".join(lines) + "\n"
