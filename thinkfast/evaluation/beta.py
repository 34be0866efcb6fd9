"""Choosing β of the re-ranking score ``s = h + β·s_fast`` on the val split.

``h`` is a sum of token log-probabilities (about −10 to −40) and ``s_fast`` a cosine in
[−1, 1], so β sets how much the fast model's opinion counts once the slow model has
spoken. Which β is right depends on the data: on the generated corpus the slow model knows
every word and β = 0 wins; on real photos whose val and test concepts never occur in a
training caption the slow model sees mostly unknown words, and a large β keeps the fast
model's ranking. It is chosen on val, never on test, and travels with the report and
with the slow model (``rerank_config.json``, :mod:`thinkfast.evaluation.rerank_config`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from thinkfast.evaluation.rerank_config import RerankConfig

logger = logging.getLogger(__name__)

BETAS = (0.0, 1.0, 5.0, 20.0, 100.0)


def choose_beta(corpus: str, fast: Any, slow: Any, *, betas: Sequence[float] = BETAS, k: int = 10,
                split: str = "val", **evaluate_kwargs: Any) -> tuple[float, dict[float, float]]:
    """The β of ``betas`` with the best R@1 of the fast top-``k`` re-ranked on ``split``
    (ties: the smaller β), and every β's R@1."""
    from thinkfast import FastModel, SlowModel
    from thinkfast.evaluate import evaluate

    fast = FastModel.from_pretrained(fast).eval() if isinstance(fast, str) else fast  # loaded once, not per β
    slow = SlowModel.from_pretrained(slow).eval() if isinstance(slow, str) else slow
    scores: dict[float, float] = {}
    for beta in betas:
        report = evaluate(corpus, fast, slow, split=split, rerank=[k], beta=float(beta), exhaustive=False,
                          precision=False, **evaluate_kwargs)
        scores[float(beta)] = float(report["methods"][-1]["R@1"])
    best = max(scores, key=lambda b: (scores[b], -b))
    logger.info("beta on %s (R@1 at K=%d): %s -> %s", split, k, scores, best)
    return best, scores


def choose_and_save_beta(corpus: str, fast: Any, slow: str, *, k: int, split: str = "val",
                         betas: Sequence[float] = BETAS, s3_endpoint: str | None = None,
                         **evaluate_kwargs: Any) -> "RerankConfig":
    """:func:`choose_beta`, then the result saved as ``slow/rerank_config.json`` with both
    models' identities, so ``thinkfast serve`` uses the β that was evaluated."""
    from thinkfast import FastModel, SlowModel
    from thinkfast.evaluation.rerank_config import RerankConfig, save_rerank_config

    fast_model = FastModel.from_pretrained(fast).eval() if isinstance(fast, str) else fast
    slow_model = SlowModel.from_pretrained(slow).eval()
    beta, scores = choose_beta(corpus, fast_model, slow_model, betas=betas, k=k, split=split,
                               s3_endpoint=s3_endpoint, **evaluate_kwargs)
    config = RerankConfig(beta=beta, k=k, split=split, fast_identity=fast_model.identity,
                          slow_identity=slow_model.identity, r1_by_beta={f"{b:g}": r for b, r in scores.items()})
    save_rerank_config(slow, config, s3_endpoint)
    return config
