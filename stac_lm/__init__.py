"""The conversion pipeline around the converter: options, texts, verification, energy, saving.

    from stac_lm import ConvertOptions, run, load_snn
    out = run(ConvertOptions(simplified=True, timesteps=16))     # converts, verifies, saves
    model, tokenizer, config = load_snn(out.options.output_dir)  # identical logits, from the directory alone

Names are imported on first use, so ``stac_lm.options`` (all the CLI needs for ``--help``) does
not pull in torch.
"""

import importlib

_EXPORTS = {
    "ConvertOptions": "options", "Converted": "pipeline", "run": "pipeline", "verify_saved": "pipeline",
    "OpCounts": "energy", "count_ops": "energy", "energy_summary": "energy",
    "load_snn": "saving", "save_snn": "saving", "verify": "verify",
    "TemporalSpikeProcessor": "processor", "Generation": "processor", "StepOutput": "processor",
    "SamplingConfig": "sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stac_lm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
