"""Energy prices per action, kept apart from the counting (docs/design.md section 5).

The counting code (:mod:`spike_modules.energy_total`) yields *actions* per token: a MAC at a
width, an integer add, a shift, bytes read from DRAM or SRAM. A table prices them. A table is
a small JSON file with its sources; another technology node or another memory is another file
(``EnergyTable.load(path)``), not new code. The default is Horowitz's 45 nm table
(``energy_tables/horowitz_45nm.json``), the one SNN papers quote.

A multiply-accumulate is a multiply plus an add at the accumulator's width:

========  =====================  ==================================================
MAC       price                  why
========  =====================  ==================================================
fp32      mult_fp32 + add_fp32   float32 everything
bf16      mult_fp16 + add_fp32   bf16 products accumulate in float32
int8      mult_int8 + add_int32  int8 x int8 products (16 bits) summed over up to
                                 thousands of inputs need a 32-bit accumulator
========  =====================  ==================================================
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

TABLES = Path(__file__).with_name("energy_tables")
DEFAULT_TABLE = TABLES / "horowitz_45nm.json"
OPS = ("add_int8", "add_int32", "add_int64", "add_fp16", "add_fp32", "mult_int8", "mult_fp16", "mult_fp32",
       "shift_int32", "shift_int64")
MEMORIES = ("dram", "sram_small", "sram_large")
MACS = {"mac_fp32": ("mult_fp32", "add_fp32"), "mac_bf16": ("mult_fp16", "add_fp32"),
        "mac_int8": ("mult_int8", "add_int32")}


@dataclass(frozen=True)
class EnergyTable:
    """Prices: ``ops_pj`` per operation (:data:`OPS`), ``memory_pj_per_byte`` per memory (:data:`MEMORIES`).

    Raises:
        ValueError: a missing or unknown entry, or a price that is not a finite number >= 0.
    """

    name: str
    source: str
    ops_pj: dict
    memory_pj_per_byte: dict
    notes: dict

    def __post_init__(self):
        for what, got, known in (("ops_pj", self.ops_pj, OPS), ("memory_pj_per_byte", self.memory_pj_per_byte, MEMORIES)):
            missing, unknown = sorted(set(known) - set(got)), sorted(set(got) - set(known))
            if missing or unknown:
                raise ValueError(f"energy table {self.name!r}: {what} must price exactly {', '.join(known)}; "
                                 f"missing {missing}, unknown {unknown}")
            for key, v in got.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ValueError(f"energy table {self.name!r}: {what}[{key!r}] must be a number >= 0, got {v!r}")

    def price(self, action: str) -> float:
        """pJ of one action: an op of :data:`OPS`, a MAC of :data:`MACS`, or one byte of a memory."""
        if action in MACS:
            mult, add = MACS[action]
            return self.ops_pj[mult] + self.ops_pj[add]
        if action in self.ops_pj:
            return self.ops_pj[action]
        if action in self.memory_pj_per_byte:
            return self.memory_pj_per_byte[action]
        raise ValueError(f"energy table {self.name!r} has no price for {action!r}; known: "
                         f"{', '.join((*MACS, *OPS, *MEMORIES))}")

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "ops_pj": dict(self.ops_pj),
                "memory_pj_per_byte": dict(self.memory_pj_per_byte), "notes": dict(self.notes),
                "macs_pj": {k: self.price(k) for k in MACS}}

    @classmethod
    def load(cls, path: str | Path = DEFAULT_TABLE) -> EnergyTable:
        """Read a table from JSON (``name``, ``source``, ``ops_pj``, ``memory_pj_per_byte``, ``notes``).

        Raises:
            ValueError: not a readable JSON table of that shape.
        """
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"energy table {path}: cannot read it as JSON ({e})") from None
        keys = {"name", "source", "ops_pj", "memory_pj_per_byte", "notes"}
        if not isinstance(d, dict) or set(d) != keys:
            raise ValueError(f"energy table {path}: a JSON object with exactly the keys {sorted(keys)}")
        return cls(**d)
