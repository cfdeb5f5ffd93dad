#!/usr/bin/env python
"""Chat-text agreement against the threshold percentile of a chat-calibrated conversion.

For each percentile, the embedded SmolLM2 is converted in full mode at T=16, calibrated on
chit-chat (``--calib_text chitchat --percentile P``), and scored in one pass against the ANN on
held-out chit-chat conversations: those after the 50 that ``test_conversational_snn.py`` scores
(sorted ids, same selection rules), which the calibration, taken from the other end of the
sorted ids, never reads. Reported per percentile: top-1 agreement with the ANN on the reply
tokens, spikes per neuron per step, and the energy ratio from the conversion report. Once, for
the ANN: how the reply tokens spread over its own top-1/top-2 probability margin, and the
agreement of the first percentile in each margin band (near-ties are where top-1 flips).

  python bench/chat_thresholds.py --percentiles 95,90,85 --conversations 30 \
      --out docs/bench_chat_thresholds.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stac_io import check_output_free, write_json  # noqa: E402
from stac_lm.conv_quality import _ids, ann_logits, chitchat  # noqa: E402
from stac_lm.options import CHITCHAT, ConvertOptions  # noqa: E402
from stac_lm.pipeline import run  # noqa: E402
from stac_lm.verify import reset_spike_stats, spike_section  # noqa: E402

SCORED = 50  # conversations test_conversational_snn.py scores by default; held-out ones come after
BANDS = ((0.0, 0.05), (0.05, 0.2), (0.2, 0.5), (0.5, 1.0))


def held_out(tok, n: int, ann) -> list[dict]:
    """Conversations ``SCORED .. SCORED + n`` with the ANN's reply-token logits and prediction slices."""
    convs, _ = chitchat(tok, SCORED + n, 512)
    if len(convs) < SCORED + n:
        raise ValueError(f"only {len(convs) - SCORED} held-out conversations available, asked {n}")
    out = []
    for conv in convs[SCORED:]:
        ids, pos, preds = _ids(conv["segments"]), 0, []
        for seg in conv["segments"]:
            a, b = pos, pos + int(seg.ids.numel())
            pos = b
            if seg.reply:
                preds.append(slice(a - 1, b - 1))  # the logits at t predict token t + 1
        out.append({"id": conv["id"], "ids": ids, "ann": ann_logits(ann, ids), "preds": preds})
    return out


@torch.no_grad()
def score(snn, convs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per reply token: SNN top-1 equals ANN top-1, and the ANN's top-1 minus top-2 probability."""
    agree, margin = [], []
    for c in convs:
        s = snn(input_ids=c["ids"][None], use_cache=False).logits[0].float()
        for p in c["preds"]:
            agree.append(s[p].argmax(-1) == c["ann"][p].argmax(-1))
            top2 = c["ann"][p].softmax(-1).topk(2).values
            margin.append(top2[:, 0] - top2[:, 1])
    return torch.cat(agree), torch.cat(margin)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--percentiles", default="95,90,85")
    p.add_argument("--conversations", type=int, default=30)
    p.add_argument("--timesteps", type=int, default=16)
    p.add_argument("--out", default="docs/bench_chat_thresholds.json")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    out = check_output_free(args.out, args.overwrite)
    percentiles = [float(x) for x in args.percentiles.split(",")]
    t0, rows, bands, convs = time.time(), [], None, None
    with tempfile.TemporaryDirectory(prefix="stac_bench_chat_th_") as tmp:
        for q in percentiles:
            opts = ConvertOptions(calib_text=CHITCHAT, percentile=q, timesteps=args.timesteps, device="cpu",
                                  output_dir=str(Path(tmp) / f"p{q:g}"))
            conv = run(opts, progress=False)
            if convs is None:
                convs = held_out(conv.tokenizer, args.conversations, conv.ann)
            reset_spike_stats(conv.snn)
            agree, margin = score(conv.snn, convs)
            report = conv.report or {}
            rows.append({"percentile": q, "agreement": float(agree.float().mean()), "tokens": int(agree.numel()),
                         "mean_spike_rate": spike_section(conv.snn)["mean_spike_rate"],
                         "energy_ratio": report.get("energy_ratio"), "ppl_ratio_tempest": report.get("ppl_ratio"),
                         "agreement_tempest": report.get("top1_agreement")})
            print(f"percentile {q:g}: chat agreement {rows[-1]['agreement']:.4f} on {agree.numel()} reply tokens, "
                  f"{rows[-1]['mean_spike_rate']:.3f} spikes/neuron/step, energy ratio {rows[-1]['energy_ratio']}",
                  flush=True)
            if bands is None:
                bands = [{"margin": [lo, hi], "share": float(((margin >= lo) & (margin < hi)).float().mean()),
                          f"agreement_p{q:g}": float(agree[(margin >= lo) & (margin < hi)].float().mean())}
                         for lo, hi in BANDS[:-1] + ((BANDS[-1][0], 1.0 + 1e-6),)]
            del conv
    result = {"benchmark": "bench/chat_thresholds.py", "command": " ".join(["python", *sys.argv]),
              "timesteps": args.timesteps, "held_out": {"first": SCORED, "conversations": args.conversations,
                                                        "ids": [c["id"] for c in convs]},
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "per_percentile": rows, "ann_margin_bands": bands, "seconds": time.time() - t0}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"written {out}")


if __name__ == "__main__":
    main()
