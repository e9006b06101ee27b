"""Runnable examples: ``python -m crossvit_fast.examples.train_ddp --help``."""
