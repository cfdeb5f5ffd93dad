"""How good a converted LM is: perplexity and top-1 agreement (``perplexity``), lm-eval-harness on
ANN and SNN (``harness``, offline tasks in ``lm_eval_tasks``), free-running reply fidelity
(``fidelity``) on a fixed prompt set (``prompts``). The energy model is ``spike_modules.energy``."""
