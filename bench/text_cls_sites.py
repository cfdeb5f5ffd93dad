"""Where a text_cls run's quantisation changes answers: site kinds and layers one at a time.

For a saved run directory and a T, the validation split is classified by the network's own float
version (every site off), by the DA-QCFS network (every site on), and with the sites of one kind
(or one layer) on and the rest off, and with every site on except one kind. Each figure is the
share of validation samples whose answer is the float version's, so it shows which sites the
quantisation's changed answers come from. (The run's float ANN reference is a separate float
fine-tune by default; this compares with the saved weights' own float version, which the sites
can be switched against.)

    python -m bench.text_cls_sites --run runs/text_cls_tweets_all -T 8 --out docs/bench_text_cls_sites.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from spike_modules.site import iter_sites, set_mode
from stac_common.io import check_output_free, write_json
from text_cls import load_text_snn
from text_cls.batching import model_inputs

from bench.text_cls import split_batches

LAYER = re.compile(r"layer\.(\d+)\.")


def _kind(name: str) -> str:
    return re.sub(r".*layer\.\d+\.", "", name)


def site_agreement(run_dir: Path, T: int, batch_size: int = 64) -> dict:
    model, tok, config = load_text_snn(run_dir / "model", T)
    batches = split_batches(run_dir, tok, config, batch_size, "validation")
    sites = dict(iter_sites(model))

    @torch.inference_mode()
    def answers(on) -> torch.Tensor:
        for name, site in sites.items():
            site.mode = "quant" if on(name) else "ann"
        return torch.cat([model(**model_inputs(b)).logits.argmax(-1) for b in batches])

    reference = answers(lambda n: False)
    share = lambda on: float((answers(on) == reference).double().mean())  # noqa: E731
    kinds = sorted({_kind(n) for n in sites})
    layers = sorted({int(m.group(1)) for n in sites if (m := LAYER.search(n))})
    return {
        "run": str(run_dir), "T": T, "validation_samples": sum(len(b["labels"]) for b in batches), "sites": len(sites),
        "all_sites": share(lambda n: True),
        "only_kind": {k: share(lambda n, k=k: _kind(n) == k) for k in kinds},
        "all_but_kind": {k: share(lambda n, k=k: _kind(n) != k) for k in kinds},
        "only_layer": {str(i): share(lambda n, i=i: f"layer.{i}." in n) for i in layers},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a python -m text_cls run directory (holds model/ and data/)")
    p.add_argument("-T", "--timesteps", type=int, default=8, help="a T the run calibrated (default 8)")
    p.add_argument("--out", required=True, help="report JSON")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        out = check_output_free(args.out, args.overwrite)
        report = site_agreement(Path(args.run), args.timesteps)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json(out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "run"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
