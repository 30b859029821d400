"""Headless tools: the ``refound`` command line, pre-training, fine-tuning, evaluation, benchmarks."""
