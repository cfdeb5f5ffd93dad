"""lm-eval-harness task definitions built from the embedded Shakespeare (The Tempest), offline.

``tempest_lastword``: LAMBADA-style. Each speech of 25 words or more, its last word taken away;
the model must give that word (``acc``: greedy continuation equals it; ``perplexity`` of it).
``tempest_cloze``: multiple choice. The lines of a speech up to its last, then four candidate
last lines: the true one and three lines of other speeches (``acc``, ``acc_norm``).

The YAML files beside this module are lm-eval's; ``stac_lm.eval.harness`` passes this folder to
lm-eval's ``TaskManager(include_path=...)``. The Tempest is also the held-out text of every
perplexity figure; it is never calibration text (``stac_lm.convert.texts.EVAL_PLAYS``).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
TASKS = ("tempest_lastword", "tempest_cloze")
