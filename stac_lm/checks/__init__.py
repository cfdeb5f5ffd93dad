"""Checks that a converted LM is what it claims: the conversion verification and its bars
(``verify``, ``gates``) and the conversational validator (``suite`` over ``conversation``,
``masks``, ``quality`` and the free-running reply gate ``free_running``)."""
