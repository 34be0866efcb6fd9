"""Typed results of the models, in the manner of Hugging Face's ``ModelOutput``: named,
documented fields with their shapes, instead of bare tuples whose order callers must
remember.

They stay unpackable by position (``h_fwd, h_bwd = slow.log_likelihood(...)``, ``out[0]``)
because training, evaluation and older callers unpack them that way. They are frozen
dataclasses rather than ``NamedTuple``s so that they are not *equal* to a tuple and can
carry derived properties (``score``). ``SlowModel.forward`` (what DDP may wrap) still
returns a plain tuple: every DDP code path flattens tuples, not all of them dataclasses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch


class _Positional:
    """Tuple-like access to a dataclass' fields, in declaration order."""

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(dataclasses.fields(self))  # type: ignore[arg-type]

    def __getitem__(self, index: int | slice) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self.to_tuple()[index]


@dataclass(frozen=True, eq=False)
class CaptionLikelihood(_Positional):
    """``SlowModel.log_likelihood``: per caption, the summed log-probability of its valid
    tokens under each decoder.

    * ``h_fwd`` ``(B,)``: ``sum_l log p(y_l | start, y_<l, phi(x))`` (left to right);
    * ``h_bwd`` ``(B,)``: ``sum_l log p(y_l | start, y_>l, phi(x))`` (right to left).

    Both are <= 0; ``score`` is the re-ranking score ``h = h_fwd + h_bwd``."""

    h_fwd: torch.Tensor  # (B,)
    h_bwd: torch.Tensor  # (B,)

    @property
    def score(self) -> torch.Tensor:
        """``h(x, y) = h_fwd + h_bwd``, ``(B,)``."""
        return self.h_fwd + self.h_bwd


@dataclass(frozen=True, eq=False)
class TokenLogProbs(_Positional):
    """``SlowModel.token_log_probs``: per-token log-probabilities in the *compacted* order
    (valid tokens first; the backward decoder's sequence reversed), zero where not valid.

    * ``lp_fwd`` ``(B, L)``: forward decoder's ``log p`` of compacted token l;
    * ``lp_bwd`` ``(B, L)``: backward decoder's ``log p`` of reversed token l;
    * ``valid`` ``(B, L)`` bool: the valid prefix (``n_b = attention_mask[b].sum()`` long)."""

    lp_fwd: torch.Tensor  # (B, L)
    lp_bwd: torch.Tensor  # (B, L)
    valid: torch.Tensor  # (B, L) bool

    def likelihood(self) -> CaptionLikelihood:
        """Sums over the tokens (invalid positions are zero, so they add nothing)."""
        return CaptionLikelihood(self.lp_fwd.sum(1), self.lp_bwd.sum(1))


__all__ = ["CaptionLikelihood", "TokenLogProbs"]
