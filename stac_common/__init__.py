"""What the LM application (``stac_lm``) and text classification (``text_cls``) share: the CLI
flag vocabulary (``cli``), atomic writes and saved-config reading (``io``), the packaged weights and
data (``assets``), devices, machine facts and stage timing (``runtime``), and the library-log
filters (``logs``). Nothing here imports ``stac_lm`` or ``text_cls``."""
