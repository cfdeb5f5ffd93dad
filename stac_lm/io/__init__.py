"""Converted LMs on disk: the Hugging Face-native directory (``hf_native``: ``save_pretrained`` /
``from_pretrained``, ``SpikingCausalLM``) and the older entry points over it (``saving``)."""
