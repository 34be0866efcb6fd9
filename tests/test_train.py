"""Ray Train: train-fast / train-slow / distill on a tiny generated corpus, 2 CPU workers.

Ray Train runs on 2 CPU workers, shared through module fixtures where they can be:
* fast, checkpoints on moto S3: loss falls; the S3 checkpoint loads back and reproduces
  the worker's validation scores exactly;
* slow with the ``fail_at_step`` test hook: one restart from the newest checkpoint, the
  step count continues;
* distillation: a slow teacher trained in-process (the ~14-step Ray one is near-uniform,
  so KL to it measures nothing), then train_fast and distill from the same init, data and
  steps: the distilled student's KL to the teacher on held-out images is lower than the
  NCE-only student's and the initial student's (~3-4 min on 2 busy cores).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.ray

EPOCHS = 3
BATCH = 8
TINY = {"preset": "tiny", "batch_size": BATCH, "workers": 2, "lr": 3e-3, "warmup_steps": 1, "val_images": 64,
        "val_pool": 16, "seed": 0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    from thinkfast.data.synth import SynthConfig, write_synth

    out = str(tmp_path_factory.mktemp("train") / "corpus")
    write_synth(out, SynthConfig(num_images=96, captions_per_image=2, image_size=32, image_format="png",
                                 val_fraction=0.15, test_fraction=0.1, seed=3))
    return out


def _val_set(corpus: str, kind: str, image_size: int, limit: int):
    """The val split decoded by the training pipeline's own UDF (same float16 pixels)."""
    from thinkfast.training.data import decode_split
    from thinkfast.training.validate import ValidationSet
    from thinkfast.data import reader

    info = reader.inspect_corpus(corpus)
    table = reader.read_table(corpus, columns=info.columns.read_columns())
    rows = decode_split(table, info.columns, "val", image_size, 1, explode_captions=False)
    pixels, queries, answers = [], [], []
    for caps, array, reject in zip(rows["captions"], rows["pixels"], rows["reject"]):
        assert not reject
        caps = json.loads(caps)
        for c in caps[:1] if kind == "slow" else caps:
            queries.append(c)
            answers.append(len(pixels))
        pixels.append(np.asarray(array, dtype=np.float32))
        if len(pixels) == limit:
            break
    return ValidationSet(kind, torch.as_tensor(np.stack(pixels)), queries, np.asarray(answers))


@pytest.fixture(scope="module")
def slow_run(corpus, ray_session, tmp_path_factory):
    """train-slow with one injected worker crash at step 3 (checkpoints every 2 steps)."""
    from thinkfast_pipelines.train import train_slow

    work = tmp_path_factory.mktemp("slow")
    marker = str(work / "failed-once")
    result = train_slow(corpus, str(work / "model"), storage=str(work / "ckpt"), epochs=EPOCHS,
                        checkpoint_every_steps=2, fail_at_step=3, fail_marker=marker, **TINY)
    return result, marker


def test_train_fast_loss_falls_and_s3_checkpoint_scores_identically(corpus, ray_session, s3_bucket):
    from thinkfast_pipelines.train import train_fast
    from thinkfast.models.fast import FastModel
    from thinkfast.utils import fs

    out = f"{s3_bucket}/models/fast"
    result = train_fast(corpus, out, storage=f"{s3_bucket}/runs", epochs=EPOCHS, **TINY)

    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == EPOCHS and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] * 0.9, losses
    assert result.starts == [0]
    assert result.steps == result.history[-1]["step"] == EPOCHS * result.history[0]["step"]
    assert result.run_dir.startswith(s3_bucket.removeprefix("s3://"))
    # checkpoints are in the bucket, in save_pretrained form plus optimizer/step state
    listing = fs.fsspec_fs(s3_bucket).find(fs.strip_scheme(f"{s3_bucket}/runs"))
    assert any(p.endswith("model/model.safetensors") for p in listing)
    assert any(p.endswith("optimizer.pt") for p in listing)
    assert json.loads(fs.read_bytes(f"{out}/training.json"))["steps"] == result.steps

    # the final model, read back from S3, reproduces what rank 0 measured in memory
    model = FastModel.from_pretrained(out).eval()
    last = result.history[-1]
    val = _val_set(corpus, "fast", model.config.image_size, TINY["val_images"])
    assert len(val.queries) == last["val_queries"]
    again = val.evaluate(model, torch.device("cpu"))
    assert again["val_r1"] == last["val_r1"]
    assert again["val_median_rank"] == last["val_median_rank"]
    assert again["val_score_sum"] == pytest.approx(last["val_score_sum"], rel=1e-5, abs=1e-4)


def test_worker_crash_restarts_from_checkpoint_and_step_count_continues(slow_run):
    result, marker = slow_run
    assert os.path.exists(marker), "the test hook never fired"
    steps_per_epoch = result.history[0]["step"]
    # crashed at step 3, newest checkpoint was step 2: exactly one restart, from step 2
    assert result.starts == [0, 2]
    assert result.steps == EPOCHS * steps_per_epoch
    assert [h["epoch"] for h in result.history] == list(range(1, EPOCHS + 1))
    assert [h["step"] for h in result.history] == [steps_per_epoch * e for e in range(1, EPOCHS + 1)]
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0], losses
    assert "val_r1" in result.history[-1]


