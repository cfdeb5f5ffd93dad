"""Per-T calibration chosen on held-back data: the candidate that best keeps the float ANN's answers.

Thresholds tuned to one data set do not carry to the next (long texts spread attention over many
keys, so a threshold set by the largest probabilities rounds most of them to zero at small T). So
the run fits several candidates per T on the training samples and keeps the one whose DA-QCFS
network agrees most often with the float ANN on the validation split (ties: validation accuracy,
then the order given). The test set plays no part in the choice.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from calibration import Calibration, CalibrationConfig, fit_calibration
from spike_modules.site import set_mode

from .batching import model_inputs
from .train import kl_divergence


@torch.inference_mode()
def logits_of(model: nn.Module, batches: list[dict], device) -> torch.Tensor:
    return torch.cat([model(**model_inputs(b, device)).logits.float().cpu() for b in batches])


def quant_logits(snn: nn.Module, calib: Calibration, batches: list[dict], device) -> torch.Tensor:
    """``snn``'s logits on ``batches`` with ``calib`` applied (its T included), sites in ``quant`` mode;
    the sites are back in ``ann`` mode after."""
    calib.apply_to(snn)
    set_mode(snn, "quant")
    try:
        return logits_of(snn, batches, device)
    finally:
        set_mode(snn, "ann")


def quant_predictions(snn: nn.Module, calib: Calibration, batches: list[dict], device) -> torch.Tensor:
    return quant_logits(snn, calib, batches, device).argmax(-1)


def candidate_configs(base: CalibrationConfig, rules: tuple[str, ...]) -> list[CalibrationConfig]:
    """``base`` as it is, then thresholds alone (no DA-QCFS shift and scale, a fraction of the fitting
    time) by ``base``'s rule and each rule of ``rules``; no repeats."""
    configs = [base, *(replace(base, rule=rule, fit_affine=False) for rule in dict.fromkeys((base.rule, *rules)))]
    return list({(c.rule, c.fit_affine): c for c in configs}.values())


def select_calibration(snn: nn.Module, observers, configs: list[CalibrationConfig], batches: list[dict],
                       float_logits: torch.Tensor, labels: torch.Tensor, device, model_id: str,
                       kept: Calibration | None = None, by: str = "agreement") -> tuple[Calibration, list[dict]]:
    """Fit every config of ``configs`` (one T) and return the chosen calibration and the scores of all.

    Each candidate is applied to ``snn`` and run in ``quant`` mode on ``batches`` (validation) and
    compared with ``float_logits`` (the float ANN's there). ``by``: ``agreement`` scores the share of
    answers equal to the float ANN's, then accuracy; ``kl`` the mean KL divergence of the candidate's
    class probabilities from the float ANN's (lower is better), which counts every sample's margin
    rather than the few answers that change, so it is less noisy on a few hundred samples.
    ``kept``: one more candidate taken as it is (the thresholds the DA-QCFS fine-tune trained with,
    which the weights adapted to), tried first.
    """
    float_pred = float_logits.argmax(-1)
    best, table = None, []
    fitted = ((None, kept),) if kept is not None else ()
    for cfg, given in (*fitted, *((c, None) for c in configs)):
        calib = given if given is not None else fit_calibration(observers, cfg, model_id=model_id)
        cfg = calib.config
        logits = quant_logits(snn, calib, batches, device)
        pred = logits.argmax(-1)
        row = {"rule": cfg.rule, "percentile": cfg.percentile if cfg.rule == "percentile" else None,
               "fit_affine": cfg.fit_affine, "refit": given is None,
               "validation_agreement_with_ann": float((pred == float_pred).double().mean()),
               "validation_kl_from_ann": float(kl_divergence(logits, float_logits)),
               "validation_accuracy": float((pred == labels).double().mean())}
        table.append(row)
        key = ((-row["validation_kl_from_ann"],) if by == "kl"
               else (row["validation_agreement_with_ann"], row["validation_accuracy"]))
        if best is None or key > best[0]:
            best = (key, calib, len(table) - 1)
    table[best[2]]["chosen"] = True
    return best[1], table


def agreement_score(snn: nn.Module, reference: nn.Module | None, batches: list[dict], calibrations: dict,
                    device) -> float:
    """Mean over the T's of ``calibrations`` (T -> the ``Calibration`` to run it with) of the share of
    ``batches`` on which ``snn`` in ``quant`` mode answers as the float ANN: ``reference``, or (``None``)
    ``snn`` itself with its sites off. The DA-QCFS fine-tune keeps the epoch that scores best."""
    if reference is None:
        set_mode(snn, "ann")
    float_pred = logits_of(reference if reference is not None else snn, batches, device).argmax(-1)
    shares = [float((quant_predictions(snn, calib, batches, device) == float_pred).double().mean())
              for _, calib in sorted(calibrations.items())]
    return sum(shares) / len(shares)
