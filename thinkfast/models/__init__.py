"""The method's two models (``FastModel``, ``SlowModel``), their configs and checkpoint I/O.

Submodules: ``config`` (frozen dataclass configs + presets), ``vision`` (ResNet + FPN
tokens), ``text`` (fast text towers), ``fast``, ``slow``, ``io`` (save / load / identity).
Import them directly; this package imports nothing heavy itself.
"""
