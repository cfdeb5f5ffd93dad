"""The LM application, one subpackage per job: ``convert`` (options, calibration texts, the run),
``io`` (save_pretrained / from_pretrained), ``eval`` (perplexity, lm-eval, reply fidelity),
``generate`` (TemporalSpikeProcessor, sampling), ``chat`` (the REPL) and ``checks`` (verification
and the conversational validator). The spiking layers are ``spike_modules``, calibration is
``calibration``, and what LM and text classification share is ``stac_common``.

    from stac_lm import ConvertOptions, from_pretrained, run
    out = run(ConvertOptions(simplified=True, timesteps=16))     # converts, verifies, saves
    model = from_pretrained(out.options.output_dir)               # identical logits, from the directory alone
    model.generate(**model.tokenizer("To be", return_tensors="pt"), max_new_tokens=20)  # transformers' generate

Names are imported on first use, so ``stac_lm.convert.options`` (all the CLI needs for
``--help``) does not pull in torch.
"""

import importlib

_EXPORTS = {
    "ConvertOptions": "stac_lm.convert.options", "Converted": "stac_lm.convert.pipeline", "run": "stac_lm.convert.pipeline",
    "verify_saved": "stac_lm.convert.pipeline",
    "OpCounts": "spike_modules.energy", "count_ops": "spike_modules.energy", "energy_summary": "spike_modules.energy",
    "load_snn": "stac_lm.io.saving", "save_snn": "stac_lm.io.saving", "verify": "stac_lm.checks.verify",
    "TemporalSpikeProcessor": "stac_lm.generate.processor", "Generation": "stac_lm.generate.processor",
    "StepOutput": "stac_lm.generate.processor", "SamplingConfig": "stac_lm.generate.sampling",
    "SpikingCausalLM": "stac_lm.io.hf_native", "from_pretrained": "stac_lm.io.hf_native",
    "set_spike_counting": "spike_modules.site",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stac_lm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
