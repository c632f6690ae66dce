"""Everything that touches a language model: loading, tokens and positions, hooks, captures.

This is the ONLY package that registers hooks on a model or swaps its modules
(:mod:`steercmp.lm.hooks`); the layers above call its functions.
"""
