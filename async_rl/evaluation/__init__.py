"""Evaluation like the papers: avg@n, unbiased pass@k, cons@n on benchmark files.

``benchmarks`` reads the files (verl rows and the JSONL layouts the ecosystem ships),
``runner`` samples through the vLLM actor engine and scores through the reward pool,
``metrics`` turns per-sample verdicts into the reported numbers, and ``report`` prints,
saves and compares result files. ``async-rl eval`` (``async_rl/commands/eval.py``) is the
command line over these.
"""
