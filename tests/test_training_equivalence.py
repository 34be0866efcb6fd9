"""The in-process trainer and Ray Train run the same training: for one worker, the same
seed and config, their per-step losses and final weights are bit-equal; two Ray Train runs
with the same seed are bit-equal too (issue 19: a single-worker CPU run is reproducible).

Why it holds: both decode with ``thinkfast.training.data.decode_split`` (float16 pixels),
visit the train rows sorted by key in ``epoch_permutation(seed, epoch)`` order
(``data_order="permutation"``, Ray holding its one shard), seed the model the same way
(``build_model``) and step with ``thinkfast.training.loop.train_step``. With more workers
the shards' membership is Ray Data's ``streaming_split`` and is not fixed: this test is
about one worker.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.ray

# tiny preset, 2 epochs of 6 steps; one intra-op thread in both, so the reductions match
CONFIG = {"preset": "tiny", "batch_size": 8, "epochs": 2, "workers": 1, "cpus_per_worker": 1.0, "torch_threads": 1,
          "lr": 3e-3, "warmup_steps": 1, "val_images": 16, "seed": 0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    from thinkfast.data.synth import SynthConfig, write_synth

    out = str(tmp_path_factory.mktemp("equivalence") / "corpus")
    write_synth(out, SynthConfig(num_images=64, captions_per_image=2, image_size=32, image_format="png",
                                 val_fraction=0.15, test_fraction=0.1, seed=3))
    return out


@pytest.fixture(scope="module")
def ray_runs(corpus, ray_session, tmp_path_factory):
    """Two Ray Train runs of train_fast with the same seed and config (one worker)."""
    from thinkfast_pipelines.train import train_fast

    work = tmp_path_factory.mktemp("ray_runs")
    return [train_fast(corpus, str(work / f"fast-{i}"), storage=str(work / "ckpt"), run_name=f"run-{i}", **CONFIG)
            for i in range(2)]


def _weights_equal(a: str, b: str) -> bool:
    from thinkfast.models.fast import FastModel

    left, right = FastModel.from_pretrained(a).state_dict(), FastModel.from_pretrained(b).state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_inprocess_and_ray_train_give_the_same_loss_curve(corpus, ray_runs, tmp_path):
    from thinkfast.training import fit

    ray_result = ray_runs[0]
    local = fit("fast", corpus, str(tmp_path / "fast-inprocess"), **CONFIG)
    assert local.trainer == "inprocess" and ray_result.trainer == "ray"
    assert local.steps == ray_result.steps == len(local.losses) == len(ray_result.losses) == 12
    worst = max(abs(a - b) for a, b in zip(local.losses, ray_result.losses))
    print(f"in-process vs Ray Train (1 worker), {local.steps} steps: max |loss difference| = {worst:.3g}")
    print("in-process:", local.losses)
    print("Ray Train: ", ray_result.losses)
    assert local.losses == ray_result.losses  # bit-equal, not merely close
    assert [h["train_loss"] for h in local.history] == [h["train_loss"] for h in ray_result.history]
    assert local.history[-1]["val_score_sum"] == ray_result.history[-1]["val_score_sum"]
    assert _weights_equal(local.out, ray_result.out)


def test_two_ray_train_runs_with_one_seed_are_bit_identical(ray_runs):
    first, second = ray_runs
    assert first.losses == second.losses, (first.losses, second.losses)
    assert _weights_equal(first.out, second.out)
