"""Absurd model configs (issue 20, item 3): every field of a model config is checked for
type and range, and the parameter count is estimated from the config arithmetic, before
anything is allocated. A ``config.json`` edited by hand or by an attacker fails with one
``CheckpointError`` naming the file and the field, in well under a second.

Each refusal runs inside :func:`bounded_cost`, which lowers the address-space limit of this
process to what it already maps plus 1 GiB for the duration of the call. On the code before
the fix the same cases allocated 196 GB or grew to 7.3 GB; under the guard they fail fast
with a torch/allocator error instead (not a ``CheckpointError``), so a regression is caught
without taking the machine down. The peak-RSS growth and the wall time are asserted too.

No Ray here; the one CLI case runs ``thinkfast serve`` in a subprocess that fails before Ray
starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from thinkfast.data.tokenizer import WordTokenizer, minilm_path
from thinkfast.errors import CheckpointError, ThinkfastError
from thinkfast.models.bounds import DEFAULT_MAX_PARAMS, MAX_PARAMS_ENV, estimate_params
from thinkfast.models.config import DecoderConfig, FastConfig, SlowConfig, TextConfig, VisionConfig
from thinkfast.models.fast import FastModel
from thinkfast.models.slow import SlowModel

CAPTIONS = ["a red circle left of a blue square", "two yellow squares", "a green triangle"]
HEADROOM_BYTES = 1 << 30  # address space a refused load may map on top of what the process has
MAX_RSS_GROWTH_MB = 100
MAX_SECONDS = 1.0


def _vm_size_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def bounded_cost() -> Iterator[None]:
    """Run the body with at most 1 GiB more address space, then assert it took < 1 s and
    grew the peak RSS by < 100 MB: "allocates nothing" made checkable."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size_bytes() + HEADROOM_BYTES
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    elapsed = time.perf_counter() - started
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kb) / 1024
    assert elapsed < MAX_SECONDS, f"refusal took {elapsed:.2f} s"
    assert growth_mb < MAX_RSS_GROWTH_MB, f"peak RSS grew by {growth_mb:.0f} MB"


# ---------------------------------------------------------------- checkpoints to damage

@pytest.fixture(scope="module")
def tokenizer() -> WordTokenizer:
    return WordTokenizer.build(CAPTIONS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer: WordTokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bounds")
    FastModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(str(root / "fast"))
    SlowModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(str(root / "slow"))
    return {"fast": root / "fast", "slow": root / "slow"}


def _tiny_bert_dir(root: Path) -> Path:
    """A tiny random BERT (the MiniLM tokenizer, 1 layer of width 32): an HF text tower that
    costs nothing to build."""
    from transformers import BertConfig

    src = Path(minilm_path())
    out = root / "tiny-bert"
    out.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=37, max_position_embeddings=64).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bounds-hf")
    bert = _tiny_bert_dir(root)
    config = dataclasses.replace(FastModel.preset_config("tiny"), text=TextConfig(kind="hf", hf_name_or_path=str(bert)))
    FastModel.from_config(config, load_pretrained=False).save_pretrained(str(root / "fast-hf"))
    return root / "fast-hf"


def _damaged(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None], file: str = "config.json") -> Path:
    """A copy of checkpoint ``src`` at ``dst`` whose ``file`` went through ``edit``."""
    shutil.copytree(src, dst)
    path = dst / file
    payload = json.loads(path.read_text())
    edit(payload["config"] if file == "config.json" else payload)
    path.write_text(json.dumps(payload))  # NaN is written as the JSON extension NaN, as an editor could
    return dst


def _set(dotted: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        *parents, leaf = dotted.split(".")
        for p in parents:
            cfg = cfg[p]
        cfg[leaf] = value
    return edit


def _delete(dotted: str) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        *parents, leaf = dotted.split(".")
        for p in parents:
            cfg = cfg[p]
        del cfg[leaf]
    return edit


MODELS = {"fast": FastModel, "slow": SlowModel}

# (model, field, absurd value, what the one line must say after "<dir>/config.json: ")
ABSURD = [
    ("fast", "text.hidden_size", 10**9, r"text\.hidden_size = 1000000000 is out of range \[1, 8192\]"),
    ("slow", "width", 10**9, r"width = 1000000000 is out of range \[4, 8192\]"),
    ("slow", "decoder.num_layers", 10**6, r"decoder\.num_layers = 1000000 is out of range \[1, 128\]"),
    ("fast", "embed_dim", -5, r"embed_dim = -5 is out of range \[1, 8192\]"),
    ("slow", "decoder.ffn_size", -2048, r"decoder\.ffn_size = -2048 is out of range"),
    ("fast", "vision.embedding_size", "64", r"vision\.embedding_size = '64' must be an integer, got str"),
    ("slow", "max_frames", "8", r"max_frames = '8' must be an integer, got str"),
    ("fast", "image_size", 32 * 10**6, r"image_size = 32000000 is out of range \[32, 4096\]"),
    ("slow", "image_size", 32 * 10**6, r"image_size = 32000000 is out of range \[32, 4096\]"),
    ("fast", "max_text_length", 10**9, r"max_text_length = 1000000000 is out of range \[1, 2048\]"),
    ("slow", "max_text_length", 10**9, r"max_text_length = 1000000000 is out of range \[1, 2048\]"),
    ("slow", "max_frames", True, r"max_frames = True must be an integer, got bool"),
    ("fast", "vision.depths", [1, 1, True, 1], r"vision\.depths\[2\] = True must be an integer, got bool"),
    ("fast", "text.dropout", math.nan, r"text\.dropout = nan must be a finite number"),
    ("slow", "decoder.dropout", math.inf, r"decoder\.dropout = inf must be a finite number"),
    ("slow", "width", 32.0, r"width = 32\.0 must be an integer, got float"),
    ("fast", "vision.hidden_sizes", [8, 16.5, 16, 32], r"vision\.hidden_sizes\[1\] = 16\.5 must be an integer"),
    ("fast", "vision.hidden_sizes", [8, 16, 32], r"vision\.hidden_sizes must have 4 items, got 3"),
    ("fast", "vision.depths", [1, 1, 1, 10**6], r"vision\.depths\[3\] = 1000000 is out of range \[1, 128\]"),
    ("slow", "decoder.num_heads", 0, r"decoder\.num_heads = 0 is out of range \[1, 128\]"),
    ("slow", "decoder.num_heads", 5, r"width 32 must be divisible by 4 and by decoder\.num_heads 5"),
    ("slow", "levels", [32, 64], r"levels\[1\] = 64 must be one of \[32, 16, 8, 4\]"),
    ("fast", "vision.layer_type", "huge", r"vision\.layer_type = 'huge' must be one of \['basic', 'bottleneck'\]"),
    ("fast", "vision.downsample_in_bottleneck", 1, r"vision\.downsample_in_bottleneck = 1 must be true or false"),
    ("fast", "text", "bow", r"text must be a JSON object, got str"),
    ("slow", "vocab_size", -1, r"vocab_size = -1 is out of range \[0, 2000000\]"),
    ("fast", "text.vocab_size", 10**12, r"text\.vocab_size = 1000000000000 is out of range"),
    ("slow", "hf_tokenizer", 5, r"hf_tokenizer = 5 must be a string or null"),
    ("fast", "text.pooling", None, r"text\.pooling = None must be one of"),
]


@pytest.mark.parametrize(("kind", "field", "value", "message"), ABSURD, ids=[f"{k}-{f}={v!r}"[:60] for k, f, v, _ in ABSURD])
def test_absurd_field_is_one_checkpoint_error_naming_file_and_field(tmp_path, checkpoints, kind, field, value, message) -> None:
    bad = _damaged(checkpoints[kind], tmp_path / kind, _set(field, value))
    with bounded_cost():
        with pytest.raises(CheckpointError) as info:
            MODELS[kind].from_pretrained(str(bad))
    text = str(info.value)
    assert text.startswith(f"{bad / 'config.json'}: "), text
    assert re.search(message, text), text
    assert "\n" not in text


@pytest.mark.parametrize(("kind", "field", "message"), [
    ("fast", "embed_dim", r"config\.json: embed_dim is missing"),
    ("slow", "decoder", r"config\.json: decoder is missing"),
    ("fast", "text.hidden_size", r"config\.json: text\.hidden_size is missing"),
])
def test_missing_field_is_refused(tmp_path, checkpoints, kind, field, message) -> None:
    """Policy: a checkpoint's config.json must hold every field (save_pretrained writes all
    of them); a missing one is never filled with a preset's default, which would build a
    model the weights were not trained for, or one far larger."""
    bad = _damaged(checkpoints[kind], tmp_path / kind, _delete(field))
    with bounded_cost():
        with pytest.raises(CheckpointError, match=message):
            MODELS[kind].from_pretrained(str(bad))


def test_unknown_field_is_refused(tmp_path, checkpoints) -> None:
    """Policy: unknown fields are errors at every level (a newer checkpoint, or a typo that
    would otherwise silently leave the default in place)."""
    bad = _damaged(checkpoints["fast"], tmp_path / "nested", _set("text.hiden_size", 10**9))
    with bounded_cost():
        with pytest.raises(CheckpointError, match=r"config\.json: unknown TextConfig fields \['hiden_size'\] in text"):
            FastModel.from_pretrained(str(bad))
    bad = _damaged(checkpoints["slow"], tmp_path / "top", _set("num_decoders", 10**6))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown SlowConfig fields \['num_decoders'\]"):
        SlowModel.from_pretrained(str(bad))


def test_config_that_is_not_an_object_is_refused(tmp_path, checkpoints) -> None:
    bad = tmp_path / "fast"
    shutil.copytree(checkpoints["fast"], bad)
    payload = json.loads((bad / "config.json").read_text())
    payload["config"] = [1, 2, 3]
    (bad / "config.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match=r"config\.json: FastConfig must be a JSON object, got list"):
        FastModel.from_pretrained(str(bad))
    (bad / "config.json").write_text(json.dumps({**payload, "padding": "x" * (2 << 20)}))  # 2 MiB
    with bounded_cost():
        with pytest.raises(CheckpointError, match=r"config\.json is larger than 1048576 bytes"):
            FastModel.from_pretrained(str(bad))


# ---------------------------------------------------------------- parameter budget

def test_in_range_fields_that_multiply_to_an_absurd_model_hit_the_parameter_budget(tmp_path, checkpoints) -> None:
    """Each field within its bounds, the product not: 2M words x 8192 wide = 16e9 parameters."""
    def huge_text(cfg: dict[str, Any]) -> None:
        cfg["text"].update(vocab_size=2_000_000, hidden_size=8192, mlp_hidden_size=8192)

    bad = _damaged(checkpoints["fast"], tmp_path / "fast", huge_text)
    with bounded_cost():
        with pytest.raises(CheckpointError) as info:
            FastModel.from_pretrained(str(bad))
    assert re.search(rf"config\.json: the model would have 16,\d{{3}},\d{{3}},\d{{3}} parameters .*above the limit of "
                     rf"{DEFAULT_MAX_PARAMS:,}.*{MAX_PARAMS_ENV}", str(info.value)), str(info.value)

    def huge_decoder(cfg: dict[str, Any]) -> None:
        cfg.update(width=8192)
        cfg["decoder"].update(num_layers=128, num_heads=128, ffn_size=32768)

    bad = _damaged(checkpoints["slow"], tmp_path / "slow", huge_decoder)
    with bounded_cost():
        with pytest.raises(CheckpointError, match=r"parameters .*above the limit"):
            SlowModel.from_pretrained(str(bad))


def test_the_user_can_lower_and_raise_the_limit(monkeypatch, checkpoints, tokenizer) -> None:
    monkeypatch.setenv(MAX_PARAMS_ENV, "1000")
    with pytest.raises(CheckpointError, match=r"above the limit of 1,000 "):
        FastModel.from_pretrained(str(checkpoints["fast"]))
    loaded = FastModel.from_pretrained(str(checkpoints["fast"]), max_params=10**8)  # the argument wins over the env
    assert sum(p.numel() for p in loaded.parameters()) == estimate_params(loaded.config)
    with pytest.raises(CheckpointError, match="above the limit of 1,000 "):
        SlowModel.from_preset("tiny", tokenizer=tokenizer)
    SlowModel.from_preset("tiny", tokenizer=tokenizer, max_params=10**8)
    monkeypatch.setenv(MAX_PARAMS_ENV, "1e8")
    FastModel.from_pretrained(str(checkpoints["fast"]))
    monkeypatch.setenv(MAX_PARAMS_ENV, "lots")
    with pytest.raises(ThinkfastError, match=f"{MAX_PARAMS_ENV}='lots' must be a positive integer"):
        FastModel.from_pretrained(str(checkpoints["fast"]))
    monkeypatch.delenv(MAX_PARAMS_ENV)
    with pytest.raises(ThinkfastError, match="max_params"):
        FastModel.from_pretrained(str(checkpoints["fast"]), max_params=0)


def _built(kind: str, preset: str, tokenizer: WordTokenizer) -> torch.nn.Module:
    tok = None if preset == "paper" else tokenizer
    return MODELS[kind].from_preset(preset, tokenizer=tok, load_pretrained=False)


def _hf_dict(model: torch.nn.Module) -> dict[str, Any] | None:
    encoder = getattr(model, "text_encoder", None)
    return encoder.hf_config.to_dict() if hasattr(encoder, "hf_config") else None


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_parameter_estimate_is_exact_for_every_preset(kind, preset, tokenizer) -> None:
    """The estimate mirrors the modules term by term (ResNet convs + BatchNorm affine, FPN,
    decoders, bag-of-words, BERT), so the tolerance is zero: a layout change in thinkfast or
    in transformers' ResNet/BERT shows up here as the exact count difference, and the default
    limit stays meaningful. ``paper`` (ResNet-50 + MiniLM, 47M / 126M) sits 8x under it."""
    model = _built(kind, preset, tokenizer)
    real = sum(p.numel() for p in model.parameters())
    assert estimate_params(model.config, _hf_dict(model)) == real
    assert real * 5 < DEFAULT_MAX_PARAMS


def test_parameter_estimate_of_an_hf_text_tower(hf_checkpoint) -> None:
    model = FastModel.from_pretrained(str(hf_checkpoint))
    assert estimate_params(model.config, _hf_dict(model)) == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- the HF text tower's own config

@pytest.mark.parametrize(("field", "value", "message"), [
    ("hidden_size", 10**9, r"hidden_size = 1000000000 is out of range \[1, 8192\]"),
    ("num_hidden_layers", 10**6, r"num_hidden_layers = 1000000 is out of range \[1, 128\]"),
    ("intermediate_size", "37", r"intermediate_size = '37' must be an integer, got str"),
    ("vocab_size", -3, r"vocab_size = -3 is out of range"),
    ("num_attention_heads", 3, r"hidden_size 32 must be divisible by num_attention_heads 3"),
    ("max_position_embeddings", 8, r"max_position_embeddings = 8 is below the model's max_text_length 32"),
])
def test_absurd_hf_text_encoder_config_is_refused(tmp_path, hf_checkpoint, field, value, message) -> None:
    bad = _damaged(hf_checkpoint, tmp_path / "fast-hf", _set(field, value), file="text_encoder/config.json")
    with bounded_cost():
        with pytest.raises(CheckpointError) as info:
            FastModel.from_pretrained(str(bad))
    text = str(info.value)
    assert text.startswith(f"{bad / 'text_encoder' / 'config.json'}: "), text
    assert re.search(message, text), text


# ---------------------------------------------------------------- every way a config is made

def test_direct_construction_and_presets_are_validated_too(tokenizer) -> None:
    with bounded_cost():
        with pytest.raises(CheckpointError, match=r"^vision\.embedding_size = -1 is out of range"):
            VisionConfig(embedding_size=-1)
        with pytest.raises(CheckpointError, match=r"^text\.hidden_size = '64' must be an integer"):
            TextConfig(hidden_size="64")  # type: ignore[arg-type]
        with pytest.raises(CheckpointError, match=r"^decoder\.num_layers = 1000000 is out of range"):
            DecoderConfig(num_layers=10**6)
        with pytest.raises(CheckpointError, match=r"^image_size = 32000000 is out of range"):
            FastModel.from_preset("tiny", tokenizer=tokenizer, image_size=32 * 10**6)
        with pytest.raises(CheckpointError, match=r"^width = True must be an integer, got bool"):
            dataclasses.replace(SlowModel.preset_config("tiny"), width=True)
        with pytest.raises(CheckpointError, match=r"^vision\.hidden_sizes \[8, 16, 16, 2\] must be >= 4 for bottleneck"):
            VisionConfig(hidden_sizes=(8, 16, 16, 2))
        with pytest.raises(CheckpointError, match=r"^vision must be a VisionConfig, got dict"):
            FastConfig(vision={"embedding_size": 8})  # type: ignore[arg-type]
        big = dataclasses.replace(FastModel.preset_config("tiny"),
                                  text=TextConfig(vocab_size=2_000_000, hidden_size=8192, mlp_hidden_size=8192))
        with pytest.raises(CheckpointError, match="above the limit"):
            FastModel(big, tokenizer)
    # JSON-style lists become the tuples the frozen (hashable) config holds
    vision = VisionConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic")  # type: ignore[arg-type]
    assert vision.hidden_sizes == (8, 16, 16, 32) and hash(vision)
    assert SlowConfig(levels=[16, 32]).levels == (16, 32)  # type: ignore[arg-type]


def test_presets_and_hub_references_still_pass() -> None:
    """Bounds never touch the network: hub ids are strings like any other."""
    for name in ("tiny", "small", "paper"):
        FastModel.preset_config(name)
        SlowModel.preset_config(name)
    assert SlowModel.preset_config("paper").vision.pretrained == "microsoft/resnet-50"
    assert VisionConfig(pretrained="some-org/some-resnet").pretrained == "some-org/some-resnet"
    with pytest.raises(CheckpointError, match="vision.pretrained"):
        VisionConfig(pretrained="x" * 5000)


# ---------------------------------------------------------------- S3: refused before any download

def test_s3_checkpoint_is_checked_before_its_weights_are_downloaded(s3_bucket, checkpoints, tokenizer) -> None:
    from thinkfast.utils import fs

    uri = f"{s3_bucket}/models/bad-fast"
    FastModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(uri)
    payload = json.loads(fs.read_bytes(fs.join(uri, "config.json")))
    payload["config"]["text"]["hidden_size"] = 10**9
    fs.write_bytes(fs.join(uri, "config.json"), json.dumps(payload).encode())
    fs.write_bytes(fs.join(uri, "model.safetensors"), b"")  # would fail differently if it were read
    with pytest.raises(CheckpointError, match=re.escape(f"{uri}/config.json: text.hidden_size = 1000000000 is out of range")):
        FastModel.from_pretrained(uri)


# ---------------------------------------------------------------- thinkfast serve: before Ray

def _serve_inputs(root: Path, fast: Path, slow: Path):
    from thinkfast_pipelines.serve.args import ServeArgs

    (root / "index").mkdir(exist_ok=True)
    (root / "index" / "manifest.json").write_text("{}")
    (root / "emb" / "tokens").mkdir(parents=True, exist_ok=True)
    (root / "emb" / "tokens" / "manifest.json").write_text("{}")
    (root / "corpus.parquet").write_bytes(b"PAR1")
    return ServeArgs(fast=str(fast), slow=str(slow), index=str(root / "index"),
                     embeddings=str(root / "emb"), corpus=str(root / "corpus.parquet"))


def test_serve_check_inputs_validates_both_model_configs(tmp_path, checkpoints, hf_checkpoint) -> None:
    from thinkfast_pipelines.serve.run import check_inputs

    check_inputs(_serve_inputs(tmp_path, checkpoints["fast"], checkpoints["slow"]))  # good ones pass
    check_inputs(_serve_inputs(tmp_path, hf_checkpoint, checkpoints["slow"]))
    bad_fast = _damaged(checkpoints["fast"], tmp_path / "bad-fast", _set("text.hidden_size", 10**9))
    with bounded_cost():
        with pytest.raises(CheckpointError, match=re.escape(f"{bad_fast}/config.json: text.hidden_size = 1000000000")):
            check_inputs(_serve_inputs(tmp_path, bad_fast, checkpoints["slow"]))
    bad_slow = _damaged(checkpoints["slow"], tmp_path / "bad-slow", _set("decoder.num_layers", 10**6))
    with pytest.raises(CheckpointError, match=re.escape(f"{bad_slow}/config.json: decoder.num_layers = 1000000")):
        check_inputs(_serve_inputs(tmp_path, checkpoints["fast"], bad_slow))
    bad_hf = _damaged(hf_checkpoint, tmp_path / "bad-hf", _set("num_hidden_layers", 10**6), file="text_encoder/config.json")
    with pytest.raises(CheckpointError, match=re.escape(f"{bad_hf}/text_encoder/config.json: num_hidden_layers")):
        check_inputs(_serve_inputs(tmp_path, bad_hf, checkpoints["slow"]))
    # a slow checkpoint handed as --fast is named too
    with pytest.raises(CheckpointError, match=f"{checkpoints['slow']} holds a 'slow' model, not a 'fast' model"):
        check_inputs(_serve_inputs(tmp_path, checkpoints["slow"], checkpoints["slow"]))


def test_thinkfast_serve_on_a_bad_checkpoint_is_one_line_exit_2(tmp_path, checkpoints) -> None:
    bad = _damaged(checkpoints["fast"], tmp_path / "bad-fast", _set("text.hidden_size", 10**9))
    args = _serve_inputs(tmp_path, bad, checkpoints["slow"])
    proc = subprocess.run(
        [sys.executable, "-m", "thinkfast_pipelines.cli", "--log-file", str(tmp_path / "serve.log"), "serve", "--fast", args.fast, "--slow", args.slow,
         "--index", args.index, "--embeddings", args.embeddings, "--corpus", args.corpus, "--detach"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("thinkfast serve: logs in ")]
    assert lines == [f"thinkfast serve: error: {bad}/config.json: text.hidden_size = 1000000000 is out of range [1, 8192]"], lines
