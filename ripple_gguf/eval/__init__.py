"""Evaluation: side-by-side benchmarks (bench, membench) against stock llama.cpp baselines, their
reports and figures, the real model and synthetic ones, and evaluation texts."""
