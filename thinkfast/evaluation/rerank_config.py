"""``rerank_config.json``: the re-ranking settings evaluation chose, saved beside the slow
model so that what was evaluated is what is served.

It plays the part of Hugging Face's ``generation_config.json``: defaults for how a saved
model is used, kept with its weights. ``thinkfast eval --choose-beta`` picks β on the val
split and writes it; ``thinkfast serve`` and ``cluster/serve.yaml`` use it unless a β is
given. β weighs the fast model's cosine against the slow model's log-likelihood, so it
belongs to the *pair*: the file names both model identities, and a service whose
embeddings were made by other models ignores it (with a warning) rather than apply a β
tuned for someone else's scores.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from thinkfast.errors import ThinkfastError
from thinkfast.utils import fs

logger = logging.getLogger(__name__)

RERANK_CONFIG = "rerank_config.json"
FORMAT = "thinkfast-rerank-config"
DEFAULT_BETA = 0.0  # thinkfast.rerank's and eval's default when nothing was chosen


@dataclass(frozen=True)
class RerankConfig:
    """β of ``s = h + β·s_fast`` as chosen on ``split`` at re-rank depth ``k``."""

    beta: float
    k: int  # the re-rank depth β was chosen at (R@1 of the fast top-k re-ranked)
    split: str  # the split it was chosen on: never the one a report is computed on
    fast_identity: str  # FastModel.identity of the fast model whose s_fast was weighed
    slow_identity: str  # SlowModel.identity of the slow model whose h was weighed
    r1_by_beta: dict[str, float] = field(default_factory=dict)  # every candidate β's R@1 on split

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "RerankConfig":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ThinkfastError(f"{where} is not a thinkfast rerank config (no \"format\": \"{FORMAT}\")")
        try:
            cfg = cls(beta=float(data["beta"]), k=int(data["k"]), split=str(data["split"]),
                      fast_identity=str(data["fast_identity"]), slow_identity=str(data["slow_identity"]),
                      r1_by_beta={str(b): float(r) for b, r in (data.get("r1_by_beta") or {}).items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ThinkfastError(f"{where} is malformed: {type(exc).__name__}: {exc}") from None
        if not 0.0 <= cfg.beta <= 1e6 or cfg.beta != cfg.beta:
            raise ThinkfastError(f"{where}: beta {cfg.beta} is not a finite non-negative number")
        return cfg

    def matches(self, fast_identity: str | None, slow_identity: str | None) -> bool:
        return (fast_identity, slow_identity) == (self.fast_identity, self.slow_identity)


def save_rerank_config(slow_dir: str, config: RerankConfig, s3_endpoint: str | None = None) -> str:
    """Write ``config`` into the slow model directory (local or ``s3://``); returns its URI."""
    uri = fs.join(slow_dir, RERANK_CONFIG)
    fs.write_bytes(uri, (json.dumps(config.to_json(), indent=2, sort_keys=True) + "\n").encode(), s3_endpoint)
    return uri


def load_rerank_config(slow_dir: str, s3_endpoint: str | None = None) -> RerankConfig | None:
    """The saved config, or None when the model has none (β was never chosen for it); a
    file that is there but unreadable raises: it must not silently become β = 0."""
    uri = fs.join(slow_dir, RERANK_CONFIG)
    if not fs.exists(uri, s3_endpoint):
        return None
    try:
        data = json.loads(fs.read_bytes(uri, s3_endpoint))
    except ValueError as exc:
        raise ThinkfastError(f"{uri} is not JSON: {exc}") from None
    return RerankConfig.from_json(data, uri)


def served_beta(slow_dir: str, fast_identity: str | None, slow_identity: str | None,
                s3_endpoint: str | None = None) -> tuple[float, str]:
    """(β, why) for a service with no explicit β: the saved one when it was chosen for these
    two models, else :data:`DEFAULT_BETA`."""
    saved = load_rerank_config(slow_dir, s3_endpoint)
    if saved is None:
        return DEFAULT_BETA, f"no {RERANK_CONFIG} beside the slow model: beta {DEFAULT_BETA:g}"
    if not saved.matches(fast_identity, slow_identity):
        logger.warning("%s in %s was chosen for models %s + %s, but these embeddings come from %s + %s; "
                       "using beta %g", RERANK_CONFIG, slow_dir, saved.fast_identity, saved.slow_identity,
                       fast_identity, slow_identity, DEFAULT_BETA)
        return DEFAULT_BETA, (f"{RERANK_CONFIG} was chosen for other models ({saved.fast_identity} + "
                              f"{saved.slow_identity}): beta {DEFAULT_BETA:g}")
    return saved.beta, f"beta {saved.beta:g} from {RERANK_CONFIG} (chosen on {saved.split} at K={saved.k})"


__all__ = ["DEFAULT_BETA", "RERANK_CONFIG", "RerankConfig", "load_rerank_config", "save_rerank_config",
           "served_beta"]
