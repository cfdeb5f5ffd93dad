"""KV-cached multi-turn generation with a converted LM: ``TemporalSpikeProcessor`` (``processor``)
and its sampling (``sampling``)."""
