"""Experiment configs: plain Python dicts, run by ``experiments/run.py``."""
