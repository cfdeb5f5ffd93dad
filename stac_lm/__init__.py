"""The conversion pipeline around the converter: options, texts, verification, energy, saving.

    from stac_lm import ConvertOptions, from_pretrained, run
    out = run(ConvertOptions(simplified=True, timesteps=16))     # converts, verifies, saves
    model = from_pretrained(out.options.output_dir)               # identical logits, from the directory alone
    model.generate(**model.tokenizer("To be", return_tensors="pt"), max_new_tokens=20)  # transformers' generate

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
    "SpikingCausalLM": "hf_native", "from_pretrained": "hf_native",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stac_lm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
