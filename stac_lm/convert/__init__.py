"""Conversion of a causal LM into an SNN: the options (``options``), the run from source model to
saved directory (``pipeline``), the calibration texts (``texts``), the ANN-reply distillation text
(``replies``) and the printed report (``report``)."""
