"""Checkpoints: bit-identical round trips (local and S3), identity, and refusal of anything
that is not a thinkfast checkpoint, without unpickling it."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from thinkfast.data.tokenizer import WordTokenizer
from thinkfast.errors import CheckpointError
from thinkfast.models.fast import FastModel
from thinkfast.models.slow import SlowModel

CAPTIONS = ["a red circle left of a blue square", "two yellow squares", "a green triangle"]


@pytest.fixture(scope="module")
def tokenizer() -> WordTokenizer:
    return WordTokenizer.build(CAPTIONS)


def _outputs(fast: FastModel, slow: SlowModel) -> list[torch.Tensor]:
    torch.manual_seed(5)
    pixels = torch.randn(2, 3, 32, 32)
    video = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        tokens = slow.encode_visual(pixels)
        return [fast.encode_image(pixels), fast.encode_image(video), fast.encode_text(**fast.tokenize(CAPTIONS[:2])),
                tokens, slow.encode_visual(video), slow.score(tokens, **slow.tokenize(CAPTIONS[:2]))]


def test_save_load_is_bit_identical(tmp_path, tokenizer: WordTokenizer) -> None:
    fast = FastModel.from_preset("tiny", tokenizer=tokenizer).eval()
    slow = SlowModel.from_preset("tiny", tokenizer=tokenizer).eval()
    fast.save_pretrained(str(tmp_path / "fast"))
    slow.save_pretrained(str(tmp_path / "slow"))
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "fast"))
    fast2 = FastModel.from_pretrained(str(tmp_path / "fast"))
    slow2 = SlowModel.from_pretrained("file://" + str(tmp_path / "slow"))
    assert not fast2.training and not slow2.training
    assert fast2.config == fast.config and slow2.config == slow.config
    assert fast2.tokenizer.vocab == tokenizer.vocab
    for a, b in zip(_outputs(fast, slow), _outputs(fast2, slow2)):
        assert torch.equal(a, b)
    assert fast2.identity == fast.identity and slow2.identity == slow.identity
    assert fast.identity.startswith("fast-") and slow.identity.startswith("slow-")


def test_identity_follows_weights(tokenizer: WordTokenizer) -> None:
    model = SlowModel.from_preset("tiny", tokenizer=tokenizer)
    before = model.identity
    assert model.identity == before
    with torch.no_grad():
        model.forward_decoder.start[0] += 1e-3
    assert model.identity != before


def test_round_trip_through_s3(s3_bucket, tokenizer: WordTokenizer) -> None:
    fast = FastModel.from_preset("tiny", tokenizer=tokenizer).eval()
    slow = SlowModel.from_preset("tiny", tokenizer=tokenizer).eval()
    fast.save_pretrained(f"{s3_bucket}/models/fast")
    slow.save_pretrained(f"{s3_bucket}/models/slow")
    fast2 = FastModel.from_pretrained(f"{s3_bucket}/models/fast")
    slow2 = SlowModel.from_pretrained(f"{s3_bucket}/models/slow")
    for a, b in zip(_outputs(fast, slow), _outputs(fast2, slow2)):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="config.json missing"):
        FastModel.from_pretrained(f"{s3_bucket}/models/nothing-here")


class _Trap:
    """Unpickling this writes a file: proof that a loader executed pickle code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_disguised_as_checkpoint_is_refused_without_unpickling(tmp_path, tokenizer: WordTokenizer) -> None:
    model = SlowModel.from_preset("tiny", tokenizer=tokenizer)
    model.save_pretrained(str(tmp_path / "m"))
    trap = tmp_path / "unpickled.txt"
    payload = pickle.dumps({"state_dict": _Trap(str(trap))})
    (tmp_path / "m" / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        SlowModel.from_pretrained(str(tmp_path / "m"))
    assert not trap.exists()
    torch.save(model.state_dict(), tmp_path / "m" / "model.safetensors")  # a torch pickle checkpoint
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        SlowModel.from_pretrained(str(tmp_path / "m"))


def test_incomplete_or_foreign_directories_are_refused(tmp_path, tokenizer: WordTokenizer) -> None:
    with pytest.raises(CheckpointError, match="not a model directory"):
        FastModel.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json missing"):
        FastModel.from_pretrained(str(tmp_path / "empty"))
    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError):
        FastModel.from_pretrained(str(afile))

    fast = FastModel.from_preset("tiny", tokenizer=tokenizer)
    fast.save_pretrained(str(tmp_path / "fast"))
    with pytest.raises(CheckpointError, match="not a 'slow' model"):
        SlowModel.from_pretrained(str(tmp_path / "fast"))

    config_path = tmp_path / "fast" / "config.json"
    payload = json.loads(config_path.read_text())
    payload["config"]["embed_dim"] = 48  # weights no longer fit the config
    config_path.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="do not match"):
        FastModel.from_pretrained(str(tmp_path / "fast"))
    payload["config"]["no_such_field"] = 1
    config_path.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="unknown FastConfig fields"):
        FastModel.from_pretrained(str(tmp_path / "fast"))
    config_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        FastModel.from_pretrained(str(tmp_path / "fast"))

    slow = SlowModel.from_preset("tiny", tokenizer=tokenizer)
    slow.save_pretrained(str(tmp_path / "slow"))
    os.remove(tmp_path / "slow" / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        SlowModel.from_pretrained(str(tmp_path / "slow"))


def test_pretrained_resnet_from_a_local_directory(tmp_path) -> None:
    """``vision.pretrained`` may be a local transformers ResNet dir (hub ids work the same
    way on machines with network); an architecture mismatch is refused, never half-loaded."""
    import dataclasses

    from transformers import ResNetConfig, ResNetModel

    from thinkfast.models.config import VisionConfig
    from thinkfast.models.vision import ResNetBackbone

    vision = VisionConfig(embedding_size=8, hidden_sizes=(8, 16, 16, 32), depths=(1, 1, 1, 1), layer_type="basic")
    torch.manual_seed(3)
    source = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic"))
    source.save_pretrained(str(tmp_path / "resnet"))
    backbone = ResNetBackbone(dataclasses.replace(vision, pretrained=str(tmp_path / "resnet")))
    for name, tensor in source.state_dict().items():
        assert torch.equal(backbone.resnet.state_dict()[name], tensor)
    wider = dataclasses.replace(vision, hidden_sizes=(8, 16, 16, 64), pretrained=str(tmp_path / "resnet"))
    with pytest.raises(CheckpointError, match="does not match"):
        ResNetBackbone(wider)
    with pytest.raises(CheckpointError, match="cannot load pretrained ResNet"):
        ResNetBackbone(dataclasses.replace(vision, pretrained=str(tmp_path / "nowhere")))
    # a thinkfast checkpoint of a model built from pretrained weights loads without the source
    tok = WordTokenizer.build(CAPTIONS)
    fast = FastModel.from_preset("tiny", tokenizer=tok, vision=dataclasses.replace(vision, pretrained=str(tmp_path / "resnet")))
    fast.save_pretrained(str(tmp_path / "fast"))
    import shutil

    shutil.rmtree(tmp_path / "resnet")
    loaded = FastModel.from_pretrained(str(tmp_path / "fast"))
    assert loaded.identity == fast.identity
