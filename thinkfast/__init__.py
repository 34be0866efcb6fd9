"""thinkfast: language-based search over large image and video collections.

Fast dual encoder + FAISS narrows the corpus, a slow cross-attention captioning scorer
re-ranks, and the slow model is distilled into the fast one (Miech et al., CVPR 2021).

Public names are imported lazily so that ``import thinkfast`` stays cheap (no torch,
faiss or Ray until a name that needs them is used) and has no side effects.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "FastModel": "thinkfast.models.fast",
    "SlowModel": "thinkfast.models.slow",
    "FastConfig": "thinkfast.models.config",
    "SlowConfig": "thinkfast.models.config",
    "preprocess_image": "thinkfast.data.image",
    "decode_image": "thinkfast.data.image",
    "decode_video": "thinkfast.data.video",
    "ShardedIndex": "thinkfast.index.sharded",
    "TokenStore": "thinkfast.store",
    "Client": "thinkfast.client",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'thinkfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
