"""Inject and score: the family log-mass score, its reference and fast scorers, and sampling.

All go through the one injection engine (:mod:`steercmp.lm.hooks`), so every method is scored
the same way.
"""
