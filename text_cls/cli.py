"""``python -m text_cls``: fine-tune a BERT-family classifier with DA-QCFS sites, calibrate, convert to
spiking neurons, and measure ANN, DA-QCFS ANN, parallel and sequential SNN side by side.

  python -m text_cls                                      # embedded tweets, MiniLM-L6, --spike_sites all, T=4,8,16
  python -m text_cls --max_train_samples 500 --max_eval_samples 200 -T 4,8 --output_dir runs/quick
  python -m text_cls --train_file my.csv --text_column sentence --label_column label --spike_sites ffn
  python -m text_cls --dataset TextCLS --datadir data/ --savedir runs/x --net_arch bert_base_qcfs \\
      --batchsize 32 --dev 0 --time_step 8 --neuron_type ParaInfNeuron --pretrained_model embedded

The last line is the research command: its names still work (listed at the end). Every flag also
takes dashes (--max-train-samples). Multi-GPU training: accelerate launch -m text_cls ...
Exit codes: 0 done, 2 bad input (one line on stderr, nothing written), 1 failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import stac_common.cli as stac_cli
from stac_common.cli import MAX_TIMESTEPS, Parser
from stac_common.cli import fail as cli_fail
from stac_common.cli import flag as cli_flag

PROG = "python -m text_cls"
FLOAT32_ONLY = "text_cls fine-tunes, calibrates and measures in float32, where spike counts are exact whole numbers"

fail = partial(cli_fail, PROG)
flag = partial(cli_flag, unset=True)  # unset flags stay unset: the defaults live in TextClsOptions


def samples(text: str) -> int | None:
    if text.lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of samples or 'all', got {text!r}") from None


def samples_or_auto(text: str) -> int | str | None:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return samples(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number of samples or 'all' or 'auto', got {text!r}") from None


def samples_or_every(text: str) -> int | str | None:
    """A number of samples, or ``'all'`` kept as the word (``None`` would mean the option's default)."""
    return "all" if text.strip().lower() == "all" else samples(text)


def rule_list(text: str) -> tuple[str, ...]:
    if text.strip().lower() == "none":
        return ()
    rules = tuple(r.strip() for r in text.split(",") if r.strip())
    bad = [r for r in rules if r not in ("max", "percentile", "mse")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown threshold rule(s) {bad}; choose from max, percentile, mse, or none")
    return rules


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers such as 4,8,8,16, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one T, such as 4,8,8,16")
    return values


def build_parser() -> Parser:
    p = Parser(PROG, __doc__)
    g = p.add_argument_group("data")
    flag(g, "dataset", "task", dest="dataset", metavar="NAME",
         help="tweets (embedded, default; TextCLS means the same), sst2, ag_news, imdb (need `datasets` and network)")
    flag(g, "datadir", "data_dir", dest="datadir", metavar="DIR",
         help="a folder with train.{csv,tsv,jsonl} (and optionally test.*), or the hub datasets' cache")
    flag(g, "train_file", dest="train_file", metavar="PATH", help="local .csv/.tsv/.jsonl training data")
    flag(g, "test_file", dest="test_file", metavar="PATH", help="local test data (default: a seeded split of "
                                                                "--train_file)")
    flag(g, "text_column", dest="text_column", metavar="NAME", help="column holding the text (default text)")
    flag(g, "label_column", dest="label_column", metavar="NAME", help="column holding the label: class names or "
                                                                      "integer ids (default label)")
    flag(g, "encoding", dest="encoding", metavar="NAME", help="text encoding of local files (default utf-8)")
    flag(g, "max_train_samples", dest="max_train_samples", type=samples, metavar="N",
         help="stratified subset of the training split, or 'all' (default 2000)")
    flag(g, "max_eval_samples", dest="max_eval_samples", type=samples, metavar="N",
         help="stratified subset of the test (and validation) split, or 'all' (default 800)")
    flag(g, "sequential_samples", dest="sequential_samples", type=samples_or_auto, metavar="N",
         help="test samples the sequential simulation runs on (a seeded subset; it costs T parallel passes), "
              "'all', or 'auto' (default: 4096 tokens' worth, 32 to 256 samples: about 120 tweets, 35 "
              "passages of 118 tokens); its agreement with the parallel pass is on the same samples")
    flag(g, "max_len", "max_length", dest="max_len", type=int, metavar="L",
         help="tokens per sample (default: tweets 64, sst2/ag_news 128, imdb 256, files 128)")
    flag(g, "validation_fraction", dest="validation_fraction", type=float, metavar="F", help="default 0.1")
    flag(g, "test_fraction", dest="test_fraction", type=float, metavar="F",
         help="share of the data held out for testing when there is no test file (default 0.1)")
    g = p.add_argument_group("model and conversion")
    stac_cli.model_flag(g, old=("pretrained_model",), unset=True,
                        help="BERT-family checkpoint: 'embedded' (all-MiniLM-L6-v2, default), a local folder or a "
                             "hub name")
    flag(g, "net_arch", dest="net_arch", metavar="NAME", help="accepted for the research command: bert_base_qcfs "
                                                              "(the architecture comes from the checkpoint)")
    flag(g, "spike_sites", dest="spike_sites", choices=("ffn", "all"),
         help="ffn: the FFN intermediate activation only; all: every encoder linear input plus the attention "
              "probabilities (default all)")
    flag(g, "activation", dest="activation", choices=("keep", "relu"),
         help="keep GELU (rate domain, default) or swap it for ReLU before fine-tuning")
    flag(g, "norm_schedule", dest="norm_schedule", choices=("causal", "held"),
         help="LayerNorm in the sequential simulation: causal (per-step differences, default) or held (the norm "
              "of the window's mean at every step); parallel mode is the same either way")
    flag(g, "probs_scale", dest="probs_scale", choices=("sum", "max"),
         help="what the attention probability sites encode: max (each row over its largest probability, the "
              "softmax's normalisation moved after probs.V; default) or sum (the softmax probabilities)")
    flag(g, "sequential_neuron", dest="sequential_neuron", choices=("catch_up", "if"),
         help="neurons of the sequential simulation: catch_up (a step may fire every spike the count still allows "
              "and take back early ones; default) or if (one spike a step: IF / ST-BIF); rate coding only (weighted "
              "neurons fire after their whole window); parallel mode is the same either way")
    flag(g, "coding", dest="coding", choices=("rate", "weighted"),
         help="spike coding of every site: weighted (spike k of the window weighs 2**(T-1-k) levels: 2**T - 1 "
              "levels, T up to 16; default) or rate (one spike per level, T levels)")
    flag(g, "neuron_type", dest="neuron_type", metavar="NAME",
         help="ParaInfNeuron (parallel, default) or IFNeuron (sequential): the saved model's neuron; both are "
              "evaluated")
    stac_cli.timesteps_flag(g, sweep=True, dest="time_steps", old=("time_steps",), unset=True,
                            help=f"the T, or a comma-separated sweep of Ts, to evaluate, each 1..{MAX_TIMESTEPS} "
                                 "(default 4,8,16)")
    flag(g, "primary_timesteps", dest="time_step", type=stac_cli.timesteps, metavar="T", old=("time_step", "T"),
         help="the T of the saved model and of the DA-QCFS ANN figure, added to the sweep (default 8 when the "
              "sweep holds it, else its largest)")
    g = p.add_argument_group("training and calibration")
    flag(g, "ann_epochs", dest="ann_epochs", type=int, metavar="N",
         help="epochs of the float fine-tune before the DA-QCFS one; its model is the float ANN reference and "
              "the DA-QCFS fine-tune's teacher (default 1; 0: the reference is the DA-QCFS-trained weights run "
              "as a float network)")
    flag(g, "trainsnn_epochs", dest="trainsnn_epochs", type=int, metavar="N",
         help="DA-QCFS-aware fine-tune epochs (straight-through floor, T cycling over the sweep; default 0 with "
              "weighted coding, whose 2**T - 1 levels follow the float ANN without it, and 1 with rate coding); "
              "with more than one, each epoch is scored by agreement with the float ANN on the validation split, "
              "the best kept, and the first worse epoch stops training")
    flag(g, "learning_rate", "lr", dest="learning_rate", type=float, metavar="LR", help="float phase (default 1e-4)")
    flag(g, "snn_learning_rate", dest="snn_learning_rate", type=float, metavar="LR",
         help="DA-QCFS phase (default 1e-4)")
    stac_cli.batch_size_flag(g, dest="batchsize", old=("batchsize",), unset=True, help="training batch (default 32)")
    flag(g, "eval_batch_size", dest="eval_batchsize", type=int, metavar="B", old=("eval_batchsize",),
         help="evaluation and calibration batch (default 64)")
    flag(g, "freeze_embeddings", dest="freeze_embeddings", action=argparse.BooleanOptionalAction,
         help="keep the word embeddings fixed while fine-tuning (default on)")
    flag(g, "direct_inference", dest="direct_inference", action="store_true",
         help="no fine-tuning: calibrate and convert the checkpoint as it is (it should be a trained classifier)")
    flag(g, "calibrate_th", dest="calibrate_th", action=argparse.BooleanOptionalAction,
         help="refit thresholds and the DA-QCFS shift/scale per T after training (default on)")
    flag(g, "fit_affine", dest="fit_affine", action=argparse.BooleanOptionalAction,
         help="fit the DA-QCFS per-channel shift psi and scale phi at each T (default on; off: thresholds only)")
    flag(g, "threshold_rule", dest="threshold_rule", choices=("max", "percentile", "mse"),
         help="per-channel threshold rule (default percentile)")
    flag(g, "percentile", dest="percentile", type=float, metavar="Q", help="default 99.9")
    flag(g, "threshold_candidates", dest="threshold_candidates", type=rule_list, metavar="RULES",
         help="other threshold rules tried at each T besides --threshold_rule, comma-separated (default mse); "
              "the candidates (the training thresholds as they are, --threshold_rule with the DA-QCFS shift and "
              "scale, each rule's thresholds alone) are scored on the validation split and the one whose DA-QCFS "
              "network agrees most often with the float ANN is kept; 'none': no choice, --threshold_rule with "
              "the shift and scale at every T")
    flag(g, "distill", dest="distill", type=float, metavar="W",
         help="weight of distillation from the float ANN's logits in the DA-QCFS fine-tune, 0..1 (default 1: "
              "the quantized network learns to answer as the float ANN; 0: labels only)")
    flag(g, "distill_temperature", dest="distill_temperature", type=float, metavar="TAU",
         help="softmax temperature of the distillation (default 1)")
    flag(g, "distill_samples", dest="distill_samples", type=samples_or_every, metavar="N",
         help="training samples the DA-QCFS fine-tune distils on, the float fine-tune's included (their labels "
              "are not used at --distill 1); more than --max_train_samples adds training rows it left out, 'all' "
              "takes every one (default: the float fine-tune's samples)")
    flag(g, "train_cycle", dest="train_cycle", type=int_list, metavar="TS",
         help="the order of T's the DA-QCFS fine-tune cycles through, each of the sweep; a repeated T gets more "
              "steps (default: the sweep, e.g. 4,8,16)")
    flag(g, "select_by", dest="select_by", choices=("agreement", "kl"),
         help="how the per-T calibration candidates are scored on the validation split: agreement (share of the "
              "float ANN's answers kept, default) or kl (mean KL divergence from the float ANN's class "
              "probabilities, lower wins)")
    flag(g, "float_loss", dest="float_loss", type=float, metavar="W",
         help="weight of the float network's own cross-entropy in the DA-QCFS fine-tune, 0..1 (default 0: off): "
              "each batch also runs with the sites off, so the shared weights keep learning the labels as a float "
              "network while the quantized pass follows it through --distill")
    flag(g, "hidden_distill", dest="hidden_distill", type=float, metavar="W",
         help="weight of layer-wise distillation in the DA-QCFS fine-tune: the relative squared error of every "
              "encoder layer's hidden states against the float ANN's (default 0: off)")
    flag(g, "train_thresholds", dest="train_thresholds", choices=("shared", "max", "percentile", "mse"),
         help="thresholds of the DA-QCFS fine-tune: a rule (max, percentile, mse: default) fitted per T, each "
              "batch using its T's, or 'shared' (one set by --threshold_rule for every T of the cycle)")
    flag(g, "calib_samples", dest="calib_samples", type=int, metavar="N",
         help="training samples seen by calibration (default 256)")
    g = p.add_argument_group("run")
    stac_cli.device_flag(g, choices=None, metavar="DEV", old=("dev",), unset=True,
                         help="auto (default: CUDA when present), cpu, cuda, cuda:N or N")
    stac_cli.dtype_flag(g, unset=True, help=f"float32 only (the default): {FLOAT32_ONLY}")
    stac_cli.output_dir_flag(g, dest="savedir", old=("savedir",), unset=True,
                             help="run directory (default runs/text_cls_<data>_<sites>)")
    flag(g, "overwrite", dest="overwrite", action="store_true", help="replace an existing run directory")
    stac_cli.seed_flag(g, unset=True, help="seed of the split, sampling and training (default 0)")
    flag(g, "threads", dest="threads", type=int, metavar="N",
         help="torch CPU threads (default: torch's choice; on a loaded machine fewer threads can be much faster)")
    flag(g, "progress", dest="progress", action=argparse.BooleanOptionalAction, help="progress bars (default on)")
    return p


def main(argv: list[str] | None = None) -> int:
    given = vars(build_parser().parse_args(argv))
    stac_cli.float32_only(PROG, given.pop("dtype", None), FLOAT32_ONLY)
    from stac_common.assets import MissingAssetError

    from .options import TextClsOptions

    try:
        opts = TextClsOptions(**given)
    except ValueError as e:
        fail(str(e))
    try:
        from .pipeline import run

        run(opts)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written to {opts.savedir}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, MissingAssetError) as e:  # user input (DataError is a ValueError)
        fail(str(e))
    print(f"results written to {opts.savedir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
