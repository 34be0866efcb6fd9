"""cache_frozen / freeze_text (thinkfast.training.frozen): what is computed once per image
gives the step exactly what it would have computed itself, so a cached run takes the same
steps; what is frozen stays as it was."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from thinkfast.errors import ThinkfastError

FIT = {"preset": "tiny", "batch_size": 8, "epochs": 2, "seed": 0, "torch_threads": 1, "lr": 3e-3, "warmup_steps": 1,
       "val_images": 8, "val_pool": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    from thinkfast.data.synth import SynthConfig, write_synth

    out = str(tmp_path_factory.mktemp("frozen_cache") / "corpus")
    write_synth(out, SynthConfig(num_images=40, captions_per_image=2, image_size=32, image_format="png",
                                 val_fraction=0.15, test_fraction=0.1, seed=5))
    return out


def _frozen(config, stages: int = 4):
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision, frozen_stages=stages))


@pytest.fixture(scope="module")
def frozen_models(tmp_path_factory, corpus):
    """Untrained tiny fast and slow models whose whole trunk is frozen, over the corpus's words."""
    from thinkfast.data.tokenizer import WordTokenizer
    from thinkfast.models.config import fast_preset, slow_preset
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.training.data import inspect_corpus

    root = tmp_path_factory.mktemp("frozen_models")
    tokenizer = WordTokenizer.build(inspect_corpus(corpus).train_captions)
    torch.manual_seed(0)
    FastModel.from_config(_frozen(fast_preset("tiny")), tokenizer=tokenizer).save_pretrained(str(root / "fast"))
    SlowModel.from_config(_frozen(slow_preset("tiny")), tokenizer=tokenizer).save_pretrained(str(root / "slow"))
    return str(root / "fast"), str(root / "slow")


def test_cached_trunk_outputs_give_the_same_embeddings_and_tokens(frozen_models):
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.training.frozen import trunk_is_frozen

    fast, slow = FastModel.from_pretrained(frozen_models[0]), SlowModel.from_pretrained(frozen_models[1])
    assert trunk_is_frozen(fast) and trunk_is_frozen(slow)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fast.encode_pooled(fast.pooled_frames(x)), fast.encode_image(x), atol=1e-6)
        video = torch.rand(2, 3, 3, 32, 32)  # frames are pooled, then averaged after the head
        assert torch.allclose(fast.encode_pooled(fast.pooled_frames(video)), fast.encode_image(video), atol=1e-6)
        maps = slow.trunk_maps(x)
        assert maps[0] is None  # stride 4 is below the finest FPN level (8): never computed into the cache
        assert torch.allclose(slow.encode_trunk_maps(maps), slow.encode_visual(x), atol=1e-6)


@pytest.mark.parametrize("objective", ["fast", "slow"])
def test_a_cached_run_takes_the_same_steps_and_leaves_the_trunk_untouched(corpus, frozen_models, tmp_path, objective):
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.training import fit

    init = frozen_models[0] if objective == "fast" else frozen_models[1]
    plain = fit(objective, corpus, str(tmp_path / "plain"), init=init, **FIT)
    cached = fit(objective, corpus, str(tmp_path / "cached"), init=init, cache_frozen=True, **FIT)
    assert len(cached.losses) == len(plain.losses) > 2
    np.testing.assert_allclose(cached.losses, plain.losses, rtol=1e-4, atol=1e-5)
    cls = FastModel if objective == "fast" else SlowModel
    before, after = cls.from_pretrained(init), cls.from_pretrained(str(tmp_path / "cached"))
    trunk_before, trunk_after = before.backbone.state_dict(), after.backbone.state_dict()
    assert all(torch.equal(trunk_before[k], trunk_after[k]) for k in trunk_before)  # BatchNorm statistics too
    head = "image_proj.weight" if objective == "fast" else "tokens.smooth.32.weight"
    assert not torch.equal(before.state_dict()[head], after.state_dict()[head])  # what is not frozen trained


def test_distillation_with_cached_teacher_tokens_matches_the_online_teacher(corpus, models, frozen_models, tmp_path):
    """The student's trunk trains here (tiny preset, frozen_stages 0), so only the teacher's
    visual tokens are cached; its scores, and so every step, are unchanged."""
    from thinkfast.training import fit

    teacher = frozen_models[1]
    plain = fit("distill", corpus, str(tmp_path / "plain"), teacher=teacher, **{**FIT, "epochs": 1})
    cached = fit("distill", corpus, str(tmp_path / "cached"), teacher=teacher, cache_frozen=True,
                 **{**FIT, "epochs": 1})
    np.testing.assert_allclose(cached.losses, plain.losses, rtol=1e-4, atol=1e-5)


def test_freeze_text_keeps_the_text_tower_and_trains_its_projection(corpus, frozen_models, tmp_path):
    from thinkfast.models.fast import FastModel
    from thinkfast.training import fit

    fit("fast", corpus, str(tmp_path / "out"), init=frozen_models[0], freeze_text=True, cache_frozen=True,
        **{**FIT, "epochs": 1})
    before, after = FastModel.from_pretrained(frozen_models[0]), FastModel.from_pretrained(str(tmp_path / "out"))
    b, a = before.state_dict(), after.state_dict()
    assert all(torch.equal(b[k], a[k]) for k in b if k.startswith("text_encoder."))
    assert not torch.equal(b["text_proj.weight"], a["text_proj.weight"])
    assert not torch.equal(b["image_proj.weight"], a["image_proj.weight"])


def test_what_cannot_be_cached_says_so(corpus, models, tmp_path):
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.training import build_config
    from thinkfast.training.frozen import trunk_fields, trunk_is_frozen

    assert not trunk_is_frozen(FastModel.from_pretrained(models[0]))  # frozen_stages 0: the trunk trains
    with pytest.raises(ThinkfastError, match="data_order=permutation"):
        build_config({"preset": "tiny", "cache_frozen": True, "data_order": "stream"})
    with pytest.raises(ThinkfastError, match="image corpora only"):
        trunk_fields(SlowModel.from_pretrained(models[1]), np.zeros((2, 3, 3, 32, 32), dtype=np.float16))


@pytest.mark.ray
def test_ray_train_worker_caches_and_takes_the_in_process_steps(corpus, frozen_models, ray_session, tmp_path):
    """The Ray Train rank caches the frozen parts of the rows it holds (distill: the student's
    frozen trunk and the teacher's tokens) and trains exactly as the in-process trainer."""
    from thinkfast.training import fit
    from thinkfast_pipelines.train import distill

    kwargs = {**FIT, "epochs": 1, "cache_frozen": True}
    local = fit("distill", corpus, str(tmp_path / "local"), teacher=frozen_models[1], init=frozen_models[0], **kwargs)
    ray_run = distill(corpus, str(tmp_path / "ray"), teacher=frozen_models[1], init=frozen_models[0], workers=1,
                      cpus_per_worker=1.0, **kwargs)
    assert ray_run.trainer == "ray" and ray_run.steps == local.steps > 0
    np.testing.assert_allclose(ray_run.losses, local.losses, rtol=1e-4, atol=1e-5)
