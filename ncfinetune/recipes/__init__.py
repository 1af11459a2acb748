"""The run layer: the commands (``finetune``, ``select``, ``eval``, ``predict``, ``pretrain``),
their configs, run folders and the accelerate side of training. Nothing in the library imports
this package; ``ncfinetune.cli`` and the thin ``recipes/*.py`` scripts call it.
"""
