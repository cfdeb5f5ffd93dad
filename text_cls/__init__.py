"""Text classification with BERT-family encoders converted to spiking networks (DA-QCFS + parallel neurons).

``python -m text_cls`` runs the whole pipeline (see ``text_cls.cli``); in code::

    from text_cls import TextClsOptions, run, load_text_snn, classify
    results = run(TextClsOptions(max_train_samples=500, savedir="runs/quick"))
    model, tok, config = load_text_snn("runs/quick/model", T=8)
"""

from .data import DataError, Splits, load_splits
from .model import SiteSpec, classify, convert_classifier, load_classifier, run_sequential
from .options import TextClsOptions
from .pipeline import run
from .saving import load_text_snn

__all__ = ["DataError", "SiteSpec", "Splits", "TextClsOptions", "classify", "convert_classifier", "load_classifier",
           "load_splits", "load_text_snn", "run", "run_sequential"]
