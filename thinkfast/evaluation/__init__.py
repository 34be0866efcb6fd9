"""Modules behind :mod:`thinkfast.evaluate` (import from there): ``config`` (flags and
defaults), ``gallery`` (split rows and caption queries), ``ranking`` (ranks per method),
``run`` (the evaluation and its report)."""
