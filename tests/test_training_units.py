"""thinkfast.training without Ray: data order, decode layout, the in-process trainer,
the generated CLI flags, and the library's independence from Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from thinkfast.errors import ThinkfastError

FIT = {"preset": "tiny", "batch_size": 8, "epochs": 2, "seed": 0, "torch_threads": 1, "lr": 3e-3, "warmup_steps": 1,
       "val_images": 16, "val_pool": 8}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    from thinkfast.data.synth import SynthConfig, write_synth

    out = str(tmp_path_factory.mktemp("training_units") / "corpus")
    write_synth(out, SynthConfig(num_images=48, captions_per_image=2, image_size=32, image_format="png",
                                 val_fraction=0.15, test_fraction=0.1, seed=4))
    return out


def _rows(keys: list[str]) -> dict[str, np.ndarray]:
    n = len(keys)
    return {"key": np.array(keys, dtype=object), "captions": np.array([json.dumps([k]) for k in keys], dtype=object),
            "pixels": np.arange(n, dtype=np.float16).reshape(n, 1, 1, 1) * np.ones((1, 3, 2, 2), np.float16),
            "reject": np.array([""] * n, dtype=object)}


def test_data_order_is_a_function_of_seed_and_epoch_not_of_arrival_order():
    from thinkfast.training.data import ShardRows

    keys = [f"k{i:02d}" for i in range(20)]
    a = ShardRows(_rows(keys))
    b = ShardRows.concat([_rows(keys[13:][::-1]), _rows([]), _rows(keys[:13])])  # shuffled, in pieces
    order = lambda rows, epoch, seed=0, start=0: [list(x["key"]) for x in rows.batches(epoch, 4, seed, start)]
    assert order(a, 0) == order(b, 0) and order(a, 1) == order(b, 1)
    assert order(a, 0) != order(a, 1) and order(a, 0) != order(a, 0, seed=1)
    assert len(order(a, 0)) == 5 and sorted(k for batch in order(a, 0) for k in batch) == keys
    assert order(a, 1, start=2) == order(a, 1)[2:]  # a resumed epoch continues where it stopped
    # two ranks: step s of both together is the permutation's rows [8s, 8s+8), split in halves
    ranks = [[list(x["key"]) for x in a.batches(1, 4, 0, rank=r, world=2)] for r in (0, 1)]
    single = [list(x["key"]) for x in a.batches(1, 8, 0)]
    assert [r0 + r1 for r0, r1 in zip(*ranks)] == single and len(single) == 2
    first = next(a.batches(0, 4, 0))
    assert [float(p[0, 0, 0]) for p in first["pixels"]] == [float(k[1:]) for k in first["key"]]  # rows stay whole


def test_decode_split_keeps_rejects_and_gives_c_order_pixels(corpus):
    from thinkfast.data import reader
    from thinkfast.training.data import decode_split, inspect_corpus, to_pairs

    info = inspect_corpus(corpus)
    rows = reader.read_table(corpus, columns=info.columns.read_columns()).to_pylist()
    train = [r for r in rows if r["split"] == "train"][:4]
    train[1] = {**train[1], info.columns.media: b"not an image"}
    train[2] = {**train[2], info.columns.captions: []}
    out = decode_split(train + [r for r in rows if r["split"] == "val"][:1], info.columns, "train", 32, 1, False)
    assert list(out["key"]) == [str(r["key"]) for r in train]  # the val row is left out, rejects keep their place
    assert out["reject"][0] == "" and out["reject"][1] and out["reject"][2].startswith("no_captions")
    assert out["pixels"].dtype == np.float16 and out["pixels"].flags["C_CONTIGUOUS"]
    pairs = to_pairs(out, seed=0, epoch=0)
    assert pairs.keys == [out["key"][0], out["key"][3]] and pairs.pixels.is_contiguous()
    exploded = decode_split(train[:1], info.columns, "train", 32, 1, True)
    assert len(exploded["key"]) == 2 and [len(json.loads(c)) for c in exploded["captions"]] == [1, 1]


def test_fit_in_process_is_bit_reproducible_and_saves_a_loadable_model(corpus, tmp_path):
    from thinkfast.models.fast import FastModel
    from thinkfast.training import TRAINING_FILE, fit

    threads = torch.get_num_threads()
    first = fit("fast", corpus, str(tmp_path / "a"), **FIT)
    second = fit("fast", corpus, str(tmp_path / "b"), **FIT)
    assert torch.get_num_threads() == threads  # restored
    assert first.trainer == "inprocess" and first.starts == [0]
    assert len(first.losses) == first.steps == 2 * first.history[0]["step"] and first.steps > 0
    assert first.losses == second.losses  # bit-equal
    assert all(np.isfinite(first.losses)) and "val_r1" in first.history[-1]
    saved = json.loads((tmp_path / "a" / TRAINING_FILE).read_text())
    assert saved["losses"] == first.losses and saved["config"]["batch_size"] == 8
    model = FastModel.from_pretrained(str(tmp_path / "a"))
    again = FastModel.from_pretrained(str(tmp_path / "b"))
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), again.state_dict().values()))


def test_fit_slow_then_distill_from_it(corpus, tmp_path):
    from thinkfast.training import fit

    slow = fit("slow", corpus, str(tmp_path / "slow"), **{**FIT, "epochs": 1})
    assert slow.steps > 0 and "val_r1" in slow.history[-1] and "train_caption" in slow.history[-1]
    student = fit("distill", corpus, str(tmp_path / "student"), teacher=slow.out, **{**FIT, "epochs": 1})
    assert "train_distill" in student.history[-1] and all(np.isfinite(student.losses))
    with pytest.raises(ThinkfastError, match="needs teacher"):
        fit("distill", corpus, str(tmp_path / "x"), **FIT)
    from thinkfast.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not a fast model"):
        fit("fast", corpus, str(tmp_path / "x"), init=slow.out, **FIT)
    from thinkfast.training import build_config

    with pytest.raises(ThinkfastError, match="not both"):
        fit("fast", corpus, str(tmp_path / "x"), build_config({"preset": "tiny"}), epochs=1)


def test_cli_flags_are_generated_from_train_config(tmp_path):
    from thinkfast.training import TrainConfig, build_config
    from thinkfast.utils.options import given
    from thinkfast_pipelines.cli import build_parser

    def parse(command: str, *flags: str):
        return build_parser(command).parse_args([command, "--corpus", "c", "--out", "o", *flags])

    args = parse("distill", "--alpha", "2", "--group-size", "3", "--gpu", "--no-cache-decoded",
                 "--data-order", "stream", "--batch-size", "12", "--workers", "3", "--epochs", "5")
    assert given(TrainConfig, args) == {"alpha": 2.0, "group_size": 3, "use_gpu": True, "cache_decoded": False,
                                        "data_order": "stream", "batch_size": 12, "workers": 3, "epochs": 5}
    for command in ("train-slow", "train-fast"):
        with pytest.raises(SystemExit):  # distill-only fields are not flags of the other two
            parse(command, "--alpha", "2")
        assert given(TrainConfig, parse(command)) == {}  # nothing given: every field None
    with pytest.raises(SystemExit):  # test hooks are not flags
        parse("train-fast", "--fail-at-step", "3")
    # defaults < preset < config file < flags
    path = tmp_path / "train.yaml"
    path.write_text("preset: tiny\nepochs: 7\nbatch_size: 10\n")
    config = build_config(given(TrainConfig, parse("train-fast", "--epochs", "9")), str(path))
    assert (config.preset, config.epochs, config.batch_size, config.lr) == ("tiny", 9, 10, 3e-3)


def test_library_training_imports_no_ray_and_no_pipelines():
    code = ("import sys, thinkfast.training, thinkfast.training.fit, thinkfast.training.loop, "
            "thinkfast.training.validate, thinkfast.training.objectives, thinkfast.training.data; "
            "bad = [m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'thinkfast_pipelines', 'benchmarks'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_accuracy_inprocess_trainer_is_the_library_fit(corpus, tmp_path):
    """benchmarks/accuracy.py --trainer inprocess trains through thinkfast.training.fit
    (no objective, lr or tau of its own): the models it trains carry fit's training.json."""
    import dataclasses
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy.py"
    spec = importlib.util.spec_from_file_location("accuracy_for_training_units", path)
    acc = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = acc  # dataclasses look their module up while the file runs
    spec.loader.exec_module(acc)
    cfg = dataclasses.replace(acc.QUICK, batch_size=8, slow_epochs=1, fast_epochs=1, image_size=32)
    runs = acc.train_models(corpus, str(tmp_path / "models"), cfg, video=False, trainer="inprocess")
    assert set(runs) == {"slow_all", "slow_fine", "slow_coarse", "fast_nce", "fast_distilled"}
    for name, run in runs.items():
        saved = json.loads((Path(run["dir"]) / "training.json").read_text())
        assert saved["trainer"] == "inprocess" and saved["steps"] == run["steps"] > 0, name
        assert saved["config"]["lr"] == 3e-3  # the tiny preset's, through build_config
