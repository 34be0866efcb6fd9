"""SlowModel: the cross-attention captioning scorer ``h(x, y) = h_fwd + h_bwd``.

``encode_visual`` gives the fine-grained tokens phi(x) ``(B, T, D)`` (``thinkfast.models.vision``);
these are what the embedding job caches (fp16), so re-ranking never runs the CNN.

Two decoders, forward (left to right) and backward (right to left), each with its own token
and position embeddings, its own learned start embedding and its own output head. A layer
is pre-LayerNorm ``masked self-attention -> cross-attention to phi(x) -> FFN`` (written out,
``nn.TransformerDecoder``-like). Decisions the paper leaves open:

* Scored tokens are the positions where ``attention_mask == 1``, wherever they sit: they are
  first compacted to the front in order (so left- or right-padding, or none, give the same
  score), then the backward decoder reads the *valid* tokens reversed. Padding is never
  attended to by a valid position (causal mask + padding at the end), so it changes nothing.
* ``h_fwd = sum_l log p(y_l | start, y_<l, phi)``, ``h_bwd = sum_l log p(y_l | start, y_>l, phi)``:
  every valid token is predicted once by each decoder, none is given for free; no BOS/EOS
  is needed from the tokenizer.
* Visual tokens may arrive in any float dtype (fp16 from the cache) and are cast to the
  model's dtype first.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from thinkfast.errors import ThinkfastError
from thinkfast.models.bounds import check_param_budget
from thinkfast.models.config import STAGE_STRIDES, DecoderConfig, SlowConfig, slow_preset
from thinkfast.models.io import PretrainedMixin
from thinkfast.models.outputs import CaptionLikelihood, TokenLogProbs
from thinkfast.models.vision import FineGrainedTokens, build_backbone, check_pixels, feature_map_side

if TYPE_CHECKING:
    from thinkfast.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Attention(nn.Module):
    """Multi-head attention via ``scaled_dot_product_attention`` (causal for self-attention)."""

    def __init__(self, width: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor, causal: bool) -> torch.Tensor:
        b, l, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, l, h, d // h).transpose(1, 2)  # (B, h, L, d/h)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, S, d/h)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, l, d))  # (B, L, D)


class DecoderLayer(nn.Module):
    """Pre-LN: x += SelfAttn(LN x) [causal]; x += CrossAttn(LN x, phi); x += FFN(LN x)."""

    def __init__(self, width: int, config: DecoderConfig) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = Attention(width, config.num_heads, config.dropout)
        self.norm_cross = nn.LayerNorm(width)
        self.norm_visual = nn.LayerNorm(width)
        self.cross_attn = Attention(width, config.num_heads, config.dropout)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, config.ffn_size), nn.GELU(), nn.Linear(config.ffn_size, width))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(x)
        x = x + self.dropout(self.self_attn(h, h, causal=True))
        x = x + self.dropout(self.cross_attn(self.norm_cross(x), self.norm_visual(visual), causal=False))
        return x + self.dropout(self.ffn(self.norm_ffn(x)))


class CaptionDecoder(nn.Module):
    """One direction: ``[start, y_1..y_{L-1}]`` -> log-probabilities of ``y_1..y_L``."""

    def __init__(self, vocab_size: int, width: int, max_length: int, config: DecoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_length, width)
        self.start = nn.Parameter(torch.zeros(width))  # learned start-of-caption embedding
        self.layers = nn.ModuleList(DecoderLayer(width, config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        self.max_length = max_length
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        nn.init.normal_(self.start, std=0.02)

    def token_log_probs(self, visual: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``log p(targets[:, l] | start, targets[:, :l], visual)`` for every l: ``(B, L)``."""
        b, l = targets.shape
        inputs = torch.cat([self.start.expand(b, 1, -1), self.token_embedding(targets[:, :-1])], dim=1)  # (B, L, D)
        x = inputs + self.position_embedding.weight[:l]
        for layer in self.layers:
            x = layer(x, visual)
        logits = self.head(self.norm(x))  # (B, L, V)
        return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, L)


def compact_and_reverse(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move valid tokens to the front in order, and build their reversal.

    Returns ``(forward_ids (B, L), backward_ids (B, L), valid (B, L) bool)`` where valid
    positions are a prefix of length ``n_b = mask[b].sum()`` in both sequences and
    ``backward_ids[b, j] = forward_ids[b, n_b - 1 - j]`` for ``j < n_b``."""
    valid_in = attention_mask.bool()
    order = torch.argsort((~valid_in).to(torch.int8), dim=1, stable=True)  # valid first, in order
    fwd = input_ids.gather(1, order)  # (B, L)
    lengths = valid_in.sum(1, keepdim=True)  # (B, 1)
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # (1, L)
    valid = pos < lengths  # (B, L)
    rev_index = torch.where(valid, lengths - 1 - pos, pos)  # mirror the valid prefix only
    bwd = fwd.gather(1, rev_index)
    return fwd, bwd, valid


class SlowModel(PretrainedMixin, nn.Module):
    """Fine-grained visual tokens + forward and backward captioning decoders."""

    model_kind = "slow"
    config_class = SlowConfig

    def __init__(self, config: SlowConfig, tokenizer: "Tokenizer", load_pretrained: bool = True,
                 max_params: int | None = None) -> None:
        """``max_params``: the parameter limit checked (from the config arithmetic) before any
        module is allocated; default ``$THINKFAST_MAX_PARAMS``, else 10^9."""
        if not isinstance(config, SlowConfig):
            raise ThinkfastError(f"SlowModel needs a SlowConfig, got {type(config).__name__}")
        if config.vocab_size <= 0:
            raise ThinkfastError("SlowConfig.vocab_size must be > 0 (build the model with its tokenizer)")
        check_param_budget(config, None, max_params)
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.backbone = build_backbone(config.vision, load_pretrained=load_pretrained)
        self.tokens = FineGrainedTokens(self.backbone.channels, config.width, config.levels, config.max_frames)
        self.forward_decoder = CaptionDecoder(config.vocab_size, config.width, config.max_text_length, config.decoder)
        self.backward_decoder = CaptionDecoder(config.vocab_size, config.width, config.max_text_length, config.decoder)

    # ------------------------------------------------------------ construction hooks
    @classmethod
    def preset_config(cls, name: str) -> SlowConfig:
        return slow_preset(name)

    @classmethod
    def _default_tokenizer(cls, config: SlowConfig) -> "Tokenizer":
        if config.hf_tokenizer:  # the paper preset: a BERT-style vocabulary
            from thinkfast.data.tokenizer import HFTokenizer

            return HFTokenizer(config.hf_tokenizer, max_length=config.max_text_length)
        return super()._default_tokenizer(config)

    @classmethod
    def _with_vocab(cls, config: SlowConfig, tokenizer: "Tokenizer") -> SlowConfig:
        return dataclasses.replace(config, vocab_size=int(tokenizer.vocab_size))

    @classmethod
    def _build(cls, config: SlowConfig, tokenizer: "Tokenizer", load_pretrained: bool, directory: str | None,
               max_params: int | None = None) -> "SlowModel":
        return cls(config, tokenizer, load_pretrained=load_pretrained, max_params=max_params)

    # ------------------------------------------------------------ visual side
    def num_visual_tokens(self, image_size: int | None = None, num_frames: int = 1) -> int:
        """T for a square ``image_size`` input (default ``config.image_size``) and F frames:
        ``F * sum over kept levels of (side / stride)^2`` (49 / 196 / 784 at 224 px)."""
        size = image_size or self.config.image_size
        return num_frames * sum(feature_map_side(size, s) ** 2 for s in self.config.levels)

    def encode_visual(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """phi(x): images ``(B, 3, H, W)`` or videos ``(B, F, 3, H, W)`` -> ``(B, T, D)``."""
        frames, b, f = check_pixels(pixel_values)
        frames = frames.to(device=self.device, dtype=self.tokens.norm.weight.dtype)
        return self.tokens(self.backbone(frames), num_frames=f)  # (B, F*T1, D)

    def trunk_maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor | None]:
        """The backbone maps the FPN reads, per frame: ``[C1..C4]`` with ``None`` where the top-down
        path never goes. With a frozen trunk this is all of phi(x) that cannot train, which
        ``thinkfast.training.frozen`` computes once per image."""
        frames, _, _ = check_pixels(pixel_values)
        frames = frames.to(device=self.device, dtype=self.tokens.norm.weight.dtype)
        maps = self.backbone(frames)
        used = {STAGE_STRIDES.index(s) for s in self.tokens.path}
        return [m if i in used else None for i, m in enumerate(maps)]

    def encode_trunk_maps(self, maps: list[torch.Tensor | None], num_frames: int = 1) -> torch.Tensor:
        """phi(x) from :meth:`trunk_maps` ``(B*F, C, h, w)`` each -> ``(B, T, D)``."""
        dtype = self.tokens.norm.weight.dtype
        maps = [None if m is None else m.to(device=self.device, dtype=dtype) for m in maps]
        return self.tokens(maps, num_frames=num_frames)  # type: ignore[arg-type]

    # ------------------------------------------------------------ text side
    def token_log_probs(
        self, visual_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> TokenLogProbs:
        """Per-token log-probabilities ``(lp_fwd (B, L), lp_bwd (B, L), valid (B, L))`` in the
        compacted order (valid tokens first; backward reversed); zero where not valid."""
        visual, input_ids, attention_mask = self._check_text_inputs(visual_tokens, input_ids, attention_mask)
        fwd_ids, bwd_ids, valid = compact_and_reverse(input_ids, attention_mask)
        zero = torch.zeros((), dtype=visual.dtype, device=visual.device)
        lp_fwd = torch.where(valid, self.forward_decoder.token_log_probs(visual, fwd_ids), zero)  # (B, L)
        lp_bwd = torch.where(valid, self.backward_decoder.token_log_probs(visual, bwd_ids), zero)  # (B, L)
        return TokenLogProbs(lp_fwd, lp_bwd, valid)

    def log_likelihood(
        self, visual_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> CaptionLikelihood:
        """``(h_fwd (B,), h_bwd (B,))``: sums of log p over the valid tokens of each caption
        (unpackable by position; ``.score`` is their sum)."""
        return self.token_log_probs(visual_tokens, input_ids, attention_mask).likelihood()

    def score(self, visual_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``h = h_fwd + h_bwd`` ``(B,)`` (<= 0) for pairs (visual_tokens[i], caption i)."""
        return self.log_likelihood(visual_tokens, input_ids, attention_mask).score

    def score_matrix(
        self, visual_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int = 256
    ) -> torch.Tensor:
        """All pairs: ``visual_tokens (M, T, D)`` x captions ``(B, L)`` -> ``(B, M)`` with
        ``[i, j] = h(x_j, y_i)`` (the teacher's scores over B_i in distillation, and exhaustive
        slow retrieval). Pairs are scored ``chunk_size`` at a time to bound memory."""
        m, b = visual_tokens.shape[0], input_ids.shape[0]
        text_index = torch.arange(b).repeat_interleave(m)  # (B*M,) caption of each pair
        image_index = torch.arange(m).repeat(b)  # (B*M,) image of each pair
        out = []
        for start in range(0, b * m, chunk_size):
            ti, ii = text_index[start : start + chunk_size], image_index[start : start + chunk_size]
            out.append(self.score(visual_tokens[ii.to(visual_tokens.device)], input_ids[ti.to(input_ids.device)],
                                  attention_mask[ti.to(attention_mask.device)]))
        return torch.cat(out).reshape(b, m)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training entry point (what DDP may wrap): pixels + captions -> ``(h_fwd (B,), h_bwd (B,))``,
        a plain tuple because that is what every DDP code path knows how to flatten."""
        return self.log_likelihood(self.encode_visual(pixel_values), input_ids, attention_mask).to_tuple()  # type: ignore[return-value]

    def _check_text_inputs(
        self, visual_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if visual_tokens.ndim != 3 or visual_tokens.shape[-1] != self.config.width:
            raise ThinkfastError(f"visual_tokens must be (B, T, {self.config.width}), got {tuple(visual_tokens.shape)}")
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ThinkfastError(
                f"input_ids and attention_mask must both be (B, L), got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        if input_ids.shape[0] != visual_tokens.shape[0]:
            raise ThinkfastError(f"{visual_tokens.shape[0]} visual token sets but {input_ids.shape[0]} captions")
        if int(attention_mask.sum(1).max()) > self.config.max_text_length:
            raise ThinkfastError(f"captions longer than max_text_length={self.config.max_text_length} tokens")
        device = self.device
        visual = visual_tokens.to(device=device, dtype=self.tokens.norm.weight.dtype)
        input_ids = input_ids.to(device)
        mask = attention_mask.to(device)
        # truncate trailing all-padding columns beyond the position table (right-padded batches)
        if input_ids.shape[1] > self.config.max_text_length:
            input_ids, mask = _compact_columns(input_ids, mask, self.config.max_text_length)
        if int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0:
            raise ThinkfastError(f"token ids out of range for vocab_size={self.config.vocab_size}")
        return visual, input_ids, mask

    def extra_repr(self) -> str:
        return f"width={self.config.width}, levels={self.config.levels}, image_size={self.config.image_size}"


def _compact_columns(input_ids: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``length`` columns after moving valid tokens first (only padding is dropped)."""
    fwd, _, valid = compact_and_reverse(input_ids, mask)
    return fwd[:, :length], valid[:, :length].long()
