"""CLIP / SigLIP checkpoints as the fast model, offline: tiny random configs saved to a temp
dir with a small BERT word-piece tokenizer. The embeddings must equal the checkpoint's own
``get_text_features`` / ``get_image_features`` (with its own normalisation), normalised."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

from thinkfast.errors import CheckpointError
from thinkfast.models.hf_dual import HFDualEncoder, is_hf_dual_checkpoint

WORDS = ["a", "red", "green", "blue", "circle", "square", "photo", "of", "zebra", "apple", "cat", "dog"]
TEXTS = ["a red circle", "a photo of a zebra", "green apple", "dog"]


def _tokenizer(directory: str):
    from transformers import BertTokenizerFast

    os.makedirs(directory, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=path)


def _save_tiny(kind: str, directory: str, image_size: int = 64) -> None:
    torch.manual_seed(0)
    tok = _tokenizer(directory)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=16)
    if kind == "clip":
        from transformers import CLIPConfig, CLIPModel

        text["eos_token_id"] = tok.sep_token_id
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    else:
        from transformers import SiglipConfig, SiglipModel

        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    if kind == "siglip":  # SigLIP's own normalisation; CLIP's defaults are exercised without the file
        with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
            json.dump({"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": image_size, "width": image_size}}, f)


def _imagenet_normalised(unit: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (unit - mean) / std


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_embeddings_equal_the_checkpoints_own_features(kind: str, tmp_path) -> None:
    from transformers import AutoModel, AutoTokenizer

    _save_tiny(kind, str(tmp_path))
    assert is_hf_dual_checkpoint(str(tmp_path))
    fast = HFDualEncoder.from_pretrained(str(tmp_path))
    reference = AutoModel.from_pretrained(str(tmp_path)).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert fast.config.model_type == kind and fast.config.image_size == 64

    padding = "max_length" if kind == "siglip" else True
    ref_tok = tok(TEXTS, padding=padding, max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = reference.get_text_features(input_ids=ref_tok["input_ids"], attention_mask=ref_tok["attention_mask"])
        want = F.normalize(getattr(want, "pooler_output", want), dim=-1)
        ours = fast.tokenize(TEXTS)
        got = fast.encode_text(ours["input_ids"], ours["attention_mask"])
    assert ours["input_ids"].shape[1] == (16 if kind == "siglip" else ref_tok["input_ids"].shape[1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS)))

    unit = torch.rand(3, 3, 64, 64)
    mean, std = ((0.5,) * 3, (0.5,) * 3) if kind == "siglip" else (
        (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    own = (unit - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        want_img = reference.get_image_features(pixel_values=own)
        want_img = F.normalize(getattr(want_img, "pooler_output", want_img), dim=-1)
        got_img = fast.encode_image(_imagenet_normalised(unit))
        video = fast.encode_image(_imagenet_normalised(unit)[:, None].repeat(1, 2, 1, 1, 1))
    torch.testing.assert_close(got_img, want_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(video, got_img, atol=1e-5, rtol=1e-4)  # identical frames -> the image's embedding


def test_save_round_trip_keeps_identity_and_outputs(tmp_path) -> None:
    _save_tiny("clip", str(tmp_path / "src"))
    fast = HFDualEncoder.from_pretrained(str(tmp_path / "src"))
    fast.save_pretrained(str(tmp_path / "copy"))
    again = HFDualEncoder.from_pretrained(str(tmp_path / "copy"))
    assert again.identity == fast.identity and fast.identity.startswith("fast-")
    before = fast.identity
    fast.tokenize(["a much longer query than any before it, to change the padding"])
    assert fast.identity == before  # tokenizing (which sets the tokenizer's padding state) is not a new model
    tok = fast.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(**tok), fast.encode_text(**tok))
    # a change of weights changes the identity
    with torch.no_grad():
        next(again.model.parameters()).add_(1.0)
    assert again.identity != fast.identity


def test_not_a_dual_encoder_is_refused(tmp_path) -> None:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(str(tmp_path))
    assert not is_hf_dual_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a dual encoder"):
        HFDualEncoder.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError):
        HFDualEncoder.from_pretrained(str(tmp_path / "missing"))


@pytest.mark.ray
def test_clip_fast_model_through_embed_index_and_eval(ray_session, tmp_path) -> None:
    """A CLIP checkpoint directory as ``--fast`` everywhere a thinkfast fast model goes."""
    from thinkfast_pipelines.embed import EmbedConfig, embed
    from thinkfast_pipelines.evaluate import evaluate
    from thinkfast_pipelines.index import build_index
    from thinkfast_pipelines.synth import synth

    from thinkfast import SlowModel
    from thinkfast.data.reader import read_table
    from thinkfast.data.tokenizer import WordTokenizer

    corpus, emb, index = str(tmp_path / "corpus"), str(tmp_path / "emb"), str(tmp_path / "index")
    synth(corpus, images=24, captions_per_image=2, image_size=64, seed=2, image_format="png", workers=1,
          test_fraction=0.5)
    _save_tiny("clip", str(tmp_path / "clip"), image_size=64)
    caps = [c for cs in read_table(corpus, columns=["captions"]).column("captions").to_pylist() for c in cs]
    torch.manual_seed(0)
    SlowModel.from_preset("tiny", tokenizer=WordTokenizer.build(caps), image_size=64).save_pretrained(str(tmp_path / "slow"))
    embed(corpus, emb, fast=str(tmp_path / "clip"), slow=str(tmp_path / "slow"),
          config=EmbedConfig(batch_size=8, progress=False))
    manifest = build_index(emb, index, shards=1, factory="Flat")
    assert manifest.count == 24
    via_index = evaluate(corpus, str(tmp_path / "clip"), str(tmp_path / "slow"), index=index, embeddings=emb,
                         rerank=[5])
    in_process = evaluate(corpus, str(tmp_path / "clip"), None, rerank=[])
    assert via_index["fast_model"] == HFDualEncoder.from_pretrained(str(tmp_path / "clip")).identity
    # the embed job's CLIP vectors rank exactly as CLIP run here on the decoded gallery
    assert via_index["methods"][0]["R@1"] == in_process["methods"][0]["R@1"]
    assert via_index["methods"][0]["median_rank"] == in_process["methods"][0]["median_rank"]


# ---------------------------------------------------------------- a CLIP / SigLIP checkpoint as the student

STUDENT_FIT = {"preset": "tiny", "batch_size": 8, "epochs": 3, "seed": 0, "torch_threads": 1, "lr": 1e-3,
               "warmup_steps": 1, "val_images": 8, "val_pool": 8}


@pytest.fixture(scope="module")
def student_corpus(tmp_path_factory) -> str:
    from thinkfast.data.synth import SynthConfig, write_synth

    out = str(tmp_path_factory.mktemp("hf_student") / "corpus")
    write_synth(out, SynthConfig(num_images=40, captions_per_image=2, image_size=32, image_format="png",
                                 val_fraction=0.2, test_fraction=0.2, seed=5))
    return out


def _train_pairs(corpus: str, image_size: int):
    """The train split's pairs, one caption each (epoch 0's draw): a fixed set to score a model on."""
    from thinkfast.training.data import inspect_corpus, read_split, to_pairs

    return to_pairs(read_split(inspect_corpus(corpus), "train", image_size, 1), seed=0, epoch=0)


def _objective_loss(objective, pairs, teacher_scores=None) -> float:
    """The objective's loss over ``pairs`` in fixed batches of 8 (mean), without gradients."""
    model = objective.model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(pairs.captions) - 7, 8):
            pixels, caps = pairs.pixels[start:start + 8], pairs.captions[start:start + 8]
            tok = model.tokenize(caps)
            scores = objective.teacher_matrix(pixels, caps) if teacher_scores else None
            losses.append(float(objective(pixels, tok["input_ids"], tok["attention_mask"], scores)[0]))
    return sum(losses) / len(losses)


def test_clip_student_distils_into_a_new_checkpoint(student_corpus, models, tmp_path) -> None:
    """``distill --init CLIP_DIR``: L_DE + alpha*L_distill trains the CLIP towers, and OUT is
    a CLIP checkpoint again, loaded as the fast model everywhere, with a new identity."""
    from transformers import AutoModel, AutoTokenizer

    from thinkfast.evaluate import evaluate
    from thinkfast.models.fast import FastModel
    from thinkfast.training import build_config, fit
    from thinkfast.training.loop import load_teacher
    from thinkfast.training.objectives import build_objective

    _, slow = models
    init, out = str(tmp_path / "clip"), str(tmp_path / "student")
    _save_tiny("clip", init, image_size=32)
    result = fit("distill", student_corpus, out, teacher=slow, init=init, **STUDENT_FIT)
    assert result.steps > 0 and all(map(torch.isfinite, torch.tensor(result.losses)))
    assert "train_distill" in result.history[-1] and "val_r1" in result.history[-1]

    before, after = FastModel.from_pretrained(init), FastModel.from_pretrained(out)
    assert isinstance(after, HFDualEncoder) and after.config == dataclasses.replace(before.config, source=out)
    assert after.identity != before.identity  # an index built with the init model is refused for this one
    old, new = before.model.state_dict(), after.model.state_dict()
    assert old.keys() == new.keys()
    changed = [k for k in old if not torch.equal(old[k], new[k])]
    assert any("vision_model" in k for k in changed) and any("text_model" in k for k in changed)
    assert torch.equal(old["logit_scale"], new["logit_scale"])  # the objectives' temperature is used instead

    # the objective it was trained on is lower on the train pairs than the init's
    teacher, config = load_teacher(slow), build_config(STUDENT_FIT)
    pairs = _train_pairs(student_corpus, 32)
    losses = [_objective_loss(build_objective("distill", m, teacher, config), pairs, teacher_scores=True)
              for m in (before, after)]
    assert losses[1] < losses[0], losses

    # its text embeddings are still the saved checkpoint's own get_text_features, normalised
    reference, tok = AutoModel.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    ref_tok = tok(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        want = reference.get_text_features(input_ids=ref_tok["input_ids"], attention_mask=ref_tok["attention_mask"])
        ours = after.tokenize(TEXTS)
        torch.testing.assert_close(after.encode_text(ours["input_ids"], ours["attention_mask"]),
                                   F.normalize(getattr(want, "pooler_output", want), dim=-1), atol=1e-5, rtol=1e-5)
    report = evaluate(student_corpus, out, None, rerank=[])
    assert report["fast_model"] == after.identity and report["methods"][0]["R@1"] >= 0


def test_siglip_student_fine_tunes_with_nce_and_refuses_the_wrong_roles(student_corpus, models, tmp_path) -> None:
    """``train-fast --init SIGLIP_DIR`` by the same path; a dual encoder is never a slow model."""
    from thinkfast.training import fit
    from thinkfast.training.loop import check_model_kinds, image_size_for

    init, out = str(tmp_path / "siglip"), str(tmp_path / "tuned")
    _save_tiny("siglip", init, image_size=32)
    assert image_size_for("fast", None, init) == 32  # read from its files, not a thinkfast config.json
    result = fit("fast", student_corpus, out, init=init, **{**STUDENT_FIT, "epochs": 1})
    assert result.steps > 0 and "train_nce" in result.history[-1]
    tuned = HFDualEncoder.from_pretrained(out)
    assert tuned.config.model_type == "siglip" and tuned.identity != HFDualEncoder.from_pretrained(init).identity
    _, slow = models
    with pytest.raises(CheckpointError, match="not a slow model"):
        check_model_kinds("slow", init, None)
    with pytest.raises(CheckpointError, match="not a slow model"):
        check_model_kinds("distill", None, init)
    with pytest.raises(CheckpointError, match="not a model directory"):
        check_model_kinds("distill", None, "someone/slow-model")  # hub-id shaped, but no such directory
    check_model_kinds("distill", init, slow)  # the student's role is fine


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_ddp_wrapped_student_steps_with_every_trainable_weight_used(kind: str, tmp_path) -> None:
    """Ray Train wraps the objective in DDP, which stops at the second step if a trainable
    parameter gets no gradient (CLIP's logit_scale, SigLIP's logit_bias would not)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from thinkfast.training import build_config
    from thinkfast.training.data import PairBatch
    from thinkfast.training.loop import make_optimizer, train_step
    from thinkfast.training.objectives import build_objective

    _save_tiny(kind, str(tmp_path / "m"), image_size=32)
    model = HFDualEncoder.from_pretrained(str(tmp_path / "m")).train()
    config = build_config({"preset": "tiny", "lr": 1e-3, "warmup_steps": 0})
    torch.manual_seed(0)
    batch = PairBatch(keys=list("abcd"), captions=TEXTS, pixels=torch.randn(4, 3, 32, 32), teacher_scores=None,
                      rejected={})
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        objective = DistributedDataParallel(build_objective("fast", model, None, config))
        optimizer = make_optimizer(model, config)
        losses = [train_step(objective, optimizer, batch, step=s, total_steps=3, config=config)[0] for s in range(3)]
    finally:
        dist.destroy_process_group()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_text_encoder_is_the_text_tower_below_its_projection(kind: str, tmp_path) -> None:
    """``freeze_text`` freezes ``model.text_encoder``: the words the checkpoint knows stay, its
    text projection (CLIP's text_projection, SigLIP's text head) and image tower still train."""
    _save_tiny(kind, str(tmp_path), image_size=32)
    model = HFDualEncoder.from_pretrained(str(tmp_path))
    model.text_encoder.requires_grad_(False)
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    projection = "text_projection" if kind == "clip" else "text_model.head"
    assert any(n.startswith(projection) for n in trainable) and any(n.startswith("vision_model.") for n in trainable)
    assert not [n for n in trainable if n.startswith("text_model.") and not n.startswith(projection)]
