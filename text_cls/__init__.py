"""Text classification with BERT-family encoders converted to spiking networks (DA-QCFS + parallel neurons).

``python -m text_cls`` runs the whole pipeline (see ``text_cls.cli``); in code::

    from text_cls import TextClsOptions, run, load_text_snn, classify
    results = run(TextClsOptions(max_train_samples=500, savedir="runs/quick"))
    model, tok, config = load_text_snn("runs/quick/model", T=8)

Names are imported on first use, so ``python -m text_cls --help`` parses its flags without
loading torch.
"""

import importlib

_EXPORTS = {
    "DataError": "data", "Splits": "data", "load_splits": "data",
    "SiteSpec": "model", "classify": "model", "convert_classifier": "model", "load_classifier": "model",
    "run_sequential": "model",
    "TextClsOptions": "options", "run": "pipeline", "load_text_snn": "saving",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'text_cls' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
