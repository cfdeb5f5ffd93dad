"""The interactive chat on top of the processor: the chat template (``format``), turn segments
(``segments``), engines for ANN and SNN (``engines``) and the REPL session (``session``)."""
