"""SlowModel: token counts, the score's exact definition, masks and padding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from thinkfast.data.tokenizer import WordTokenizer
from thinkfast.errors import ThinkfastError
from thinkfast.losses import caption_loss
from thinkfast.models.slow import SlowModel, compact_and_reverse

CAPTIONS = [
    "a red circle left of a blue square",
    "a small green triangle above a big red circle",
    "two yellow squares",
    "a blue circle below a green square near a red triangle",
]


@pytest.fixture(scope="module")
def tokenizer() -> WordTokenizer:
    return WordTokenizer.build(CAPTIONS, max_length=16)


@pytest.fixture(scope="module")
def model(tokenizer: WordTokenizer) -> SlowModel:
    torch.manual_seed(0)
    return SlowModel.from_preset("tiny", tokenizer=tokenizer).eval()


@pytest.fixture(scope="module")
def batch(model: SlowModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    with torch.no_grad():
        visual = model.encode_visual(torch.randn(len(CAPTIONS), 3, 32, 32))
    return visual, model.tokenize(CAPTIONS)


def test_token_counts_match_levels_for_images_and_videos(tokenizer: WordTokenizer) -> None:
    model = SlowModel.from_preset("tiny", tokenizer=tokenizer).eval()
    assert model.config.levels == (32, 16, 8)
    assert model.num_visual_tokens(224) == 49 + 196 + 784
    assert model.num_visual_tokens(32) == 1 + 4 + 16
    assert model.num_visual_tokens(64, num_frames=3) == 3 * (4 + 16 + 64)
    with torch.no_grad():
        assert model.encode_visual(torch.randn(2, 3, 32, 32)).shape == (2, 21, 32)
        assert model.encode_visual(torch.randn(2, 3, 64, 64)).shape == (2, 84, 32)
        assert model.encode_visual(torch.randn(2, 3, 3, 64, 64)).shape == (2, 3 * 84, 32)
    coarse = SlowModel.from_preset("tiny", tokenizer=tokenizer, levels=(16,)).eval()
    assert coarse.num_visual_tokens(224) == 196
    with torch.no_grad():
        assert coarse.encode_visual(torch.randn(1, 3, 96, 96)).shape == (1, 36, 32)


def test_image_is_a_one_frame_video_and_frames_are_distinguished(model: SlowModel) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        image = model.encode_visual(x)
        video = model.encode_visual(x[:, None])
        two = model.encode_visual(torch.stack([x, x], dim=1))  # (2, 2, 3, 32, 32)
    torch.testing.assert_close(image, video)
    # the same picture in frames 0 and 1 gives different tokens: the frame embedding
    assert not torch.allclose(two[:, :21], two[:, 21:])


def test_score_is_sum_of_both_directions_and_nonpositive(model: SlowModel, batch) -> None:
    visual, tokens = batch
    with torch.no_grad():
        h_fwd, h_bwd = model.log_likelihood(visual, **tokens)
        score = model.score(visual, **tokens)
    assert h_fwd.shape == h_bwd.shape == score.shape == (len(CAPTIONS),)
    torch.testing.assert_close(score, h_fwd + h_bwd)
    assert (score <= 0).all() and (h_fwd < 0).all() and (h_bwd < 0).all()


def test_outputs_are_typed_and_still_unpack_by_position(model: SlowModel, batch) -> None:
    from thinkfast.models.outputs import CaptionLikelihood, TokenLogProbs

    visual, tokens = batch
    with torch.no_grad():
        out = model.log_likelihood(visual, **tokens)
        per_token = model.token_log_probs(visual, **tokens)
        trained = model(torch.randn(len(CAPTIONS), 3, 32, 32), **tokens)
    assert isinstance(out, CaptionLikelihood) and isinstance(per_token, TokenLogProbs)
    h_fwd, h_bwd = out
    assert h_fwd is out.h_fwd and out[1] is out.h_bwd and len(out) == 2 and out.to_tuple() == (h_fwd, h_bwd)
    torch.testing.assert_close(out.score, model.score(visual, **tokens))
    lp_fwd, lp_bwd, valid = per_token
    assert valid is per_token.valid and valid.dtype == torch.bool
    torch.testing.assert_close(per_token.likelihood().score, out.score)
    assert lp_fwd.shape == lp_bwd.shape == tokens["input_ids"].shape
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.h_fwd = h_bwd  # type: ignore[misc]
    # what DDP may wrap returns a plain tuple of (B,) tensors
    assert type(trained) is tuple and len(trained) == 2 and trained[0].shape == (len(CAPTIONS),)


def test_each_direction_equals_one_position_at_a_time(model: SlowModel, batch) -> None:
    """h_fwd = sum_l log p(y_l | y_<l); h_bwd = sum_l log p(y_l | y_>l), each term computed by
    running the decoder on exactly the context it is allowed to see."""
    visual, tokens = batch
    with torch.no_grad():
        h_fwd, h_bwd = model.log_likelihood(visual, **tokens)
        for b in range(len(CAPTIONS)):
            ids = tokens["input_ids"][b][tokens["attention_mask"][b].bool()]  # (n,)
            n = ids.shape[0]
            fwd = bwd = 0.0
            for pos in range(n):
                prefix = ids[: pos + 1][None]  # context y_<pos, target y_pos last
                fwd += float(model.forward_decoder.token_log_probs(visual[b : b + 1], prefix)[0, -1])
                suffix = ids[pos:].flip(0)[None]  # reversed: context y_>pos, target y_pos last
                bwd += float(model.backward_decoder.token_log_probs(visual[b : b + 1], suffix)[0, -1])
            assert float(h_fwd[b]) == pytest.approx(fwd, abs=1e-4)
            assert float(h_bwd[b]) == pytest.approx(bwd, abs=1e-4)


def test_masks_forward_sees_only_past_backward_only_future(model: SlowModel, batch) -> None:
    visual, tokens = batch
    ids, mask = tokens["input_ids"][:1], tokens["attention_mask"][:1]
    n = int(mask.sum())
    j = 3
    changed = ids.clone()
    changed[0, j] = (changed[0, j] + 1) % model.config.vocab_size
    with torch.no_grad():
        f0, b0, _ = model.token_log_probs(visual[:1], ids, mask)
        f1, b1, _ = model.token_log_probs(visual[:1], changed, mask)
    # forward: positions < j do not see y_j; positions > j do
    torch.testing.assert_close(f0[0, :j], f1[0, :j])
    assert not torch.allclose(f0[0, j + 1 : n], f1[0, j + 1 : n])
    # backward (reversed order: index r predicts y_{n-1-r}): positions > j in the caption,
    # i.e. r < n-1-j, do not see y_j
    r = n - 1 - j
    torch.testing.assert_close(b0[0, :r], b1[0, :r])
    assert not torch.allclose(b0[0, r + 1 : n], b1[0, r + 1 : n])


def test_padding_changes_nothing(model: SlowModel, batch) -> None:
    visual, tokens = batch
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    with torch.no_grad():
        base = model.score(visual, ids, mask)
        right = model.score(visual, torch.cat([ids, torch.full((4, 5), 7)], 1), torch.cat([mask, torch.zeros(4, 5, dtype=torch.long)], 1))
        left = model.score(visual, torch.cat([torch.full((4, 3), 9), ids], 1), torch.cat([torch.zeros(4, 3, dtype=torch.long), mask], 1))
        alone = torch.stack([model.score(visual[i : i + 1], ids[i : i + 1, : int(mask[i].sum())], mask[i : i + 1, : int(mask[i].sum())])[0]
                             for i in range(4)])
    torch.testing.assert_close(right, base, atol=1e-4, rtol=0)
    torch.testing.assert_close(left, base, atol=1e-4, rtol=0)
    torch.testing.assert_close(alone, base, atol=1e-4, rtol=0)


def test_compact_and_reverse() -> None:
    ids = torch.tensor([[0, 5, 6, 0, 7], [1, 2, 0, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]])
    fwd, bwd, valid = compact_and_reverse(ids, mask)
    assert fwd[0, :3].tolist() == [5, 6, 7] and bwd[0, :3].tolist() == [7, 6, 5]
    assert fwd[1, :2].tolist() == [1, 2] and bwd[1, :2].tolist() == [2, 1]
    assert valid.sum(1).tolist() == [3, 2]


def test_fp16_tokens_and_score_matrix(model: SlowModel, batch) -> None:
    visual, tokens = batch
    with torch.no_grad():
        full = model.score(visual, **tokens)
        half = model.score(visual.half(), **tokens)
        matrix = model.score_matrix(visual, tokens["input_ids"], tokens["attention_mask"], chunk_size=5)
    torch.testing.assert_close(half, full, atol=0.05, rtol=0)
    assert matrix.shape == (4, 4)
    torch.testing.assert_close(torch.diagonal(matrix), full, atol=1e-4, rtol=0)
    with torch.no_grad():
        one = model.score(visual[2:3], tokens["input_ids"][0:1], tokens["attention_mask"][0:1])
    torch.testing.assert_close(matrix[0, 2:3], one, atol=1e-4, rtol=0)


def test_bad_inputs_raise_clear_errors(model: SlowModel, batch) -> None:
    visual, tokens = batch
    with pytest.raises(ThinkfastError, match="multiples of 32"):
        model.encode_visual(torch.randn(1, 3, 30, 30))
    with pytest.raises(ThinkfastError, match="3 colour channels"):
        model.encode_visual(torch.randn(1, 1, 32, 32))
    with pytest.raises(ThinkfastError, match="at most"):
        model.encode_visual(torch.randn(1, 9, 3, 32, 32))
    with pytest.raises(ThinkfastError, match="visual token sets"):
        model.score(visual[:2], **tokens)
    with pytest.raises(ThinkfastError, match="out of range"):
        model.score(visual, tokens["input_ids"] + 1000, tokens["attention_mask"])
    with pytest.raises(ThinkfastError, match="tokenizer"):
        SlowModel.from_preset("tiny")
    with pytest.raises(ThinkfastError, match="unknown preset"):
        SlowModel.from_preset("huge")


def test_caption_loss_training_step_lowers_loss(tokenizer: WordTokenizer) -> None:
    torch.manual_seed(0)
    model = SlowModel.from_preset("tiny", tokenizer=tokenizer)
    model.train()
    pixels = torch.randn(4, 3, 32, 32)
    tokens = model.tokenize(CAPTIONS)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        h_fwd, h_bwd = model(pixels, **tokens)
        loss = caption_loss(h_fwd, h_bwd, tokens["attention_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_config_is_frozen_and_validated(model: SlowModel) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config.width = 3  # type: ignore[misc]
    with pytest.raises(ThinkfastError):
        dataclasses.replace(model.config, levels=(64,))
    with pytest.raises(ThinkfastError):
        dataclasses.replace(model.config, image_size=100)


def test_paper_preset_is_resnet50_with_a_bert_vocabulary() -> None:
    """Built without downloading (random weights): the architecture is ResNet-50's, the
    tokenizer the offline MiniLM's, and the 224 px token count 49 + 196."""
    from thinkfast.data.tokenizer import HFTokenizer

    model = SlowModel.from_preset("paper", load_pretrained=False).eval()
    vision = model.config.vision
    assert (vision.hidden_sizes, vision.depths, vision.layer_type) == ((256, 512, 1024, 2048), (3, 4, 6, 3), "bottleneck")
    assert vision.pretrained == "microsoft/resnet-50" and model.config.image_size == 224
    assert isinstance(model.tokenizer, HFTokenizer) and model.config.vocab_size == model.tokenizer.vocab_size
    assert sum(p.numel() for p in model.backbone.parameters()) == pytest.approx(23.5e6, rel=0.01)
    assert model.num_visual_tokens() == 49 + 196
    with torch.no_grad():
        tokens = model.encode_visual(torch.randn(1, 3, 64, 64))  # small input keeps the test cheap
        score = model.score(tokens, **model.tokenize(["a dog on a red sofa"]))
    assert tokens.shape == (1, 4 + 16, 512) and float(score[0]) < 0
