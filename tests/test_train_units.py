"""Training pieces that need no Ray: config merging, schedule, batch assembly, state, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from thinkfast.errors import ThinkfastError


def test_config_priority_defaults_preset_file_flags(tmp_path):
    from thinkfast.training.config import build_config

    path = tmp_path / "train.yaml"
    path.write_text("preset: tiny\nepochs: 7\nlr: 1\nbatch-size: 12\n")
    config = build_config({"epochs": 9, "lr": None}, str(path))
    assert config.preset == "tiny"
    assert config.epochs == 9  # flag beats file
    assert config.lr == 1.0 and isinstance(config.lr, float)  # file beats preset, int coerced
    assert config.batch_size == 12  # dashes in file keys are accepted
    assert config.val_pool == 16  # tiny preset default


def test_config_json_and_errors(tmp_path):
    from thinkfast.training.config import build_config

    path = tmp_path / "train.json"
    path.write_text(json.dumps({"preset": "small", "alpha": 0.5}))
    assert build_config({}, str(path)).alpha == 0.5
    with pytest.raises(ThinkfastError, match="unknown training config fields"):
        build_config({"learning_rate": 1.0})
    with pytest.raises(ThinkfastError, match="epochs"):
        build_config({"epochs": 0})
    with pytest.raises(ThinkfastError, match="unknown preset"):
        build_config({"preset": "huge"})
    with pytest.raises(ThinkfastError, match="fail_marker"):
        build_config({"fail_at_step": 3})
    with pytest.raises(ThinkfastError, match="cannot read config"):
        build_config({}, str(tmp_path / "missing.yaml"))


def test_learning_rate_warmup_then_cosine_floor():
    from thinkfast.training.state import learning_rate

    lrs = [learning_rate(s, 100, 1.0, 10) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_to_pairs_skips_rejects_and_samples_reproducibly():
    from thinkfast.training.data import to_pairs

    batch = {
        "key": np.array(["a", "b", "c"], dtype=object),
        "captions": np.array([json.dumps(["x one", "x two"]), json.dumps(["y"]), json.dumps(["z"])], dtype=object),
        "pixels": np.arange(3 * 3 * 4 * 4, dtype=np.float16).reshape(3, 3, 4, 4),
        "reject": np.array(["", "corrupt: bad bytes", ""], dtype=object),
    }
    pairs = to_pairs(batch, seed=1, epoch=0, rank=0)
    assert pairs.keys == ["a", "c"] and pairs.rejected == {"b": "corrupt: bad bytes"}
    assert pairs.pixels.dtype == torch.float32 and pairs.pixels.shape == (2, 3, 4, 4)
    assert pairs.captions[0] in ("x one", "x two") and pairs.captions[1] == "z"
    assert to_pairs(batch, seed=1, epoch=0, rank=0).captions == pairs.captions
    seen = {to_pairs(batch, seed=1, epoch=e, rank=0).captions[0] for e in range(20)}
    assert seen == {"x one", "x two"}  # a different caption is drawn across epochs
    assert pairs.weight == 1.0


def test_to_pairs_all_rejected_still_steps_at_zero_weight():
    from thinkfast.training.data import to_pairs

    batch = {"key": np.array(["a"], dtype=object), "captions": np.array([json.dumps(["x"])], dtype=object),
             "pixels": np.zeros((1, 3, 4, 4), dtype=np.float16), "reject": np.array(["empty: 0 bytes"], dtype=object)}
    pairs = to_pairs(batch, seed=0, epoch=0, rank=0)
    assert pairs.weight == 0.0 and len(pairs.keys) == 1 and pairs.rejected == {"a": "empty: 0 bytes"}


def test_to_pairs_flattens_groups_and_subsets_teacher_scores():
    from thinkfast.training.data import to_pairs

    scores = np.arange(9, dtype=np.float32).reshape(3, 3)
    batch = {
        "key": np.array([json.dumps(["a", "b", "c"])], dtype=object),
        "captions": np.array([json.dumps([["ca"], ["cb"], ["cc"]])], dtype=object),
        "reject": np.array([json.dumps(["", "truncated: x", ""])], dtype=object),
        "pixels": np.zeros((1, 3, 3, 4, 4), dtype=np.float16),
        "scores": scores[None],
        "group_size": np.array([3]),
    }
    pairs = to_pairs(batch, seed=0, epoch=0, rank=0)
    assert pairs.keys == ["a", "c"] and pairs.captions == ["ca", "cc"]
    assert pairs.teacher_scores.tolist() == [[0.0, 2.0], [6.0, 8.0]]


def test_loop_state_round_trip(tmp_path):
    from thinkfast.training.state import LoopState, load_optimizer_state, load_state, save_checkpoint

    class Saver(torch.nn.Linear):
        def save_pretrained(self, directory: str) -> None:
            import os

            os.makedirs(directory, exist_ok=True)

    model = Saver(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    state = LoopState(step=5, epoch=1, step_in_epoch=2, history=[{"epoch": 1}], starts=[0], rejected={"k": "r"},
                      epoch_losses=[1.0, 2.0])
    save_checkpoint(str(tmp_path), model, opt, state, {"objective": "fast"})
    loaded, extra = load_state(str(tmp_path))
    assert loaded == state and extra["objective"] == "fast"
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh.load_state_dict(load_optimizer_state(str(tmp_path)))
    assert fresh.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_split_of_key_is_stable_and_covers_all_splits():
    from thinkfast.data.splits import split_of_key

    splits = [split_of_key(f"key-{i}") for i in range(2000)]
    assert splits == [split_of_key(f"key-{i}") for i in range(2000)]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert 0.85 < share["train"] < 0.95 and 0.02 < share["val"] < 0.08 and 0.02 < share["test"] < 0.08


def test_cli_parses_each_subcommand_and_rejects_missing_inputs(tmp_path, capsys):
    from thinkfast_pipelines.cli import build_parser, main

    for command in ("train-slow", "train-fast", "distill"):
        args = build_parser(command).parse_args([command, "--corpus", "c", "--out", "o", "--epochs", "2"])
        assert args.epochs == 2 and args.lr is None
    code = main(["distill", "--corpus", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "tiny"])
    assert code == 2
    assert "needs --teacher" in capsys.readouterr().err
    code = main(["distill", "--corpus", str(tmp_path), "--out", str(tmp_path / "o"), "--teacher", str(tmp_path / "nope")])
    assert code == 2
    assert "not a model directory" in capsys.readouterr().err


def test_init_and_teacher_must_be_the_right_model_kind(tmp_path):
    """--init of train-slow takes a slow model, of train-fast / distill a fast one, and the
    teacher is slow: a mix-up fails on the driver, before Ray starts any worker."""
    from thinkfast_pipelines.train import distill, train_fast, train_slow
    from thinkfast.data.tokenizer import WordTokenizer
    from thinkfast.errors import CheckpointError
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel

    tok = WordTokenizer.build(["a red circle", "a blue square"])
    fast, slow = str(tmp_path / "fast"), str(tmp_path / "slow")
    FastModel.from_preset("tiny", tokenizer=tok).save_pretrained(fast)
    SlowModel.from_preset("tiny", tokenizer=tok).save_pretrained(slow)
    corpus, out = str(tmp_path / "corpus"), str(tmp_path / "out")
    with pytest.raises(CheckpointError, match="--init .* is not a slow model"):
        train_slow(corpus, out, init=fast, preset="tiny")
    with pytest.raises(CheckpointError, match="--init .* is not a fast model"):
        train_fast(corpus, out, init=slow, preset="tiny")
    with pytest.raises(CheckpointError, match="--teacher .* is not a slow model"):
        distill(corpus, out, teacher=fast, preset="tiny")
    with pytest.raises(CheckpointError, match="no config.json"):
        train_slow(corpus, out, init=str(tmp_path), preset="tiny")
