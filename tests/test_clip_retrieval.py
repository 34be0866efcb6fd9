"""clip-retrieval's layout out (``thinkfast export``) and in (``thinkfast index --embeddings``).

The layout is checked against the real tools: autofaiss 2.18's own ``build_index`` on the
exported ``img_emb/`` must return the neighbours thinkfast's exact search returns, and
thinkfast must read what clip-retrieval 2.45's own writer (``OutputSink``) wrote.
autofaiss 2.18 pins numpy < 2 (this project: 2.4), so both run in their own venv under
``~/.cache/thinkfast/venvs/autofaiss-2.18``, created once (8-15 s here: pip from this venv,
``--no-compile``) and reused; ``pyarrow==15.0.2`` is pinned beside autofaiss because
today's resolution picks pyarrow 26, which refuses numpy 1.26 at import, and clip-retrieval
goes in ``--no-deps`` (its pins would pull torch 2.14 and CUDA). No Ray here.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thinkfast.index.sharded import ShardedIndex
from thinkfast.store import (
    EmbedCounts, EmbedManifest, FastModelRecord, StoreError, read_embeddings, write_embed_manifest, write_embeddings,
)
from thinkfast.store.clip_retrieval import export_clip_retrieval, iter_clip_embeddings, list_parts
from thinkfast_pipelines import cli
from thinkfast_pipelines import index as index_cli

N, DIM, IDENTITY = 230, 24, "fast-test-identity-0123"
AUTOFAISS_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "thinkfast" / "venvs" / "autofaiss-2.18"
AUTOFAISS_PINS = ("autofaiss==2.18.0", "pyarrow==15.0.2")
CLIP_RETRIEVAL_NO_DEPS = ("clip-retrieval==2.45.0",)  # only its writer runs: numpy, pandas, fsspec


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def emb(tmp_path):
    """A small embed output: fast/ in two parts, texts/ (two captions for most keys, none
    for k0005), a corpus with captions and urls, and a manifest naming the fast model."""
    keys = [f"k{i:04d}" for i in range(N)]
    vectors = _vectors(N, 0)
    root = tmp_path / "emb"
    write_embeddings(str(root / "fast"), keys[:100], vectors[:100])
    write_embeddings(str(root / "fast"), keys[100:], vectors[100:])
    text_keys = [k for k in keys if k != "k0005"]
    rows = [(k, i, f"caption {i} of {k}") for k in text_keys for i in (1, 0)]  # index 1 first: order must not matter
    text_vectors = _vectors(len(rows), 1)
    (root / "texts").mkdir()
    pq.write_table(pa.table({
        "key": [r[0] for r in rows], "caption_index": pa.array([r[1] for r in rows], pa.int32()),
        "caption": [r[2] for r in rows],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(text_vectors.reshape(-1)), DIM),
    }), root / "texts" / "part-0.parquet")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"key": keys, "caption": [f"corpus caption of {k}" for k in keys],
                             "url": [f"http://127.0.0.1/{k}.jpg" for k in keys]}), corpus / "part-0.parquet")
    write_embed_manifest(str(root), EmbedManifest(
        corpus=str(corpus), corpus_files=1, image_size=32, counts=EmbedCounts(rows_in=N, embedded=N),
        fast=FastModelRecord(uri="fast", identity=IDENTITY, dim=DIM)))
    first = {r[0]: text_vectors[j] for j, r in enumerate(rows) if r[1] == 0}
    return {"root": str(root), "keys": keys, "vectors": vectors, "first_text": first}


def _concat_clip(out: Path, sub: str = "img_emb") -> tuple[np.ndarray, pa.Table]:
    """Rows in the order autofaiss and clip-retrieval's back-end number them: sorted file names."""
    vectors = np.concatenate([np.load(p) for p in sorted((out / sub).glob("*.npy"))])
    meta = pa.concat_tables([pq.read_table(p) for p in sorted((out / "metadata").glob("*.parquet"))])
    return vectors, meta


def test_export_writes_clip_retrievals_layout_row_for_row(emb, tmp_path):
    out = tmp_path / "clip"
    summary = export_clip_retrieval(emb["root"], str(out), dtype="float16", rows_per_file=20)
    assert (summary.count, summary.dim, summary.parts, summary.texts) == (N, DIM, 12, True)
    assert summary.captions_from == "texts" and summary.fast_model_identity == IDENTITY
    names = sorted(p.name for p in (out / "img_emb").iterdir())
    assert names[:2] == ["img_emb_00.npy", "img_emb_01.npy"] and names[-1] == "img_emb_11.npy"  # padded: sorts as numbers
    assert sorted(p.name for p in (out / "metadata").iterdir())[-1] == "metadata_11.parquet"
    image, meta = _concat_clip(out)
    text, _ = _concat_clip(out, "text_emb")
    assert image.dtype == np.float16 and text.dtype == np.float16
    assert meta.column_names == ["image_path", "caption", "key", "url"]
    keys = meta.column("key").to_pylist()
    assert sorted(keys) == emb["keys"]
    position = {k: i for i, k in enumerate(emb["keys"])}
    expected = _unit(emb["vectors"])[[position[k] for k in keys]]
    np.testing.assert_allclose(image.astype(np.float32), expected, atol=2e-3)
    i5 = keys.index("k0005")
    assert not text[i5].any() and meta.column("caption")[i5].as_py() is None  # no caption: a zero row, kept aligned
    i7 = keys.index("k0007")
    np.testing.assert_allclose(text[i7].astype(np.float32), _unit(emb["first_text"]["k0007"][None])[0], atol=2e-3)
    assert meta.column("caption")[i7].as_py() == "caption 0 of k0007"
    assert meta.column("image_path")[i7].as_py() == "http://127.0.0.1/k0007.jpg"
    assert json.loads((out / "thinkfast_export.json").read_text())["fast_model_identity"] == IDENTITY
    with pytest.raises(StoreError, match="--overwrite"):
        export_clip_retrieval(emb["root"], str(out))
    assert export_clip_retrieval(emb["root"], str(out), overwrite=True, rows_per_file=1000).parts == 1
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy"]  # no stale parts left


def _clip_dir(root: Path, parts: list[tuple[np.ndarray, dict]], name_width: int = 1) -> Path:
    """A directory as ``clip-retrieval inference`` writes it (np.save + pandas-style Parquet)."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for i, (vectors, columns) in enumerate(parts):
        np.save(root / "img_emb" / f"img_emb_{str(i).zfill(name_width)}.npy", vectors)
        pq.write_table(pa.table(columns), root / "metadata" / f"metadata_{str(i).zfill(name_width)}.parquet")
    return root


def test_import_takes_keys_from_metadata_and_refuses_a_count_mismatch(tmp_path):
    a, b = _vectors(5, 2).astype(np.float16), _vectors(3, 3).astype(np.float16)
    with_key = _clip_dir(tmp_path / "with_key", [(a, {"image_path": [f"p{i}" for i in range(5)],
                                                      "key": [f"{i:09d}" for i in range(5)]}),
                                                 (b, {"image_path": ["q0", "q1", "q2"], "key": ["x", "y", "z"]})])
    keys, vectors = read_embeddings(str(with_key))
    assert keys == ["000000000", "000000001", "000000002", "000000003", "000000004", "x", "y", "z"]
    np.testing.assert_array_equal(vectors, np.concatenate([a, b]).astype(np.float32))
    assert [len(k) for k, _ in iter_clip_embeddings(str(with_key), batch_size=2)] == [2, 2, 1, 2, 1]
    no_key = _clip_dir(tmp_path / "no_key", [(a, {"image_path": [f"/img/{i}.jpg" for i in range(5)]})])
    assert read_embeddings(str(no_key))[0][0] == "/img/0.jpg"
    short = _clip_dir(tmp_path / "short", [(a, {"image_path": [f"p{i}" for i in range(5)]}),
                                           (b, {"image_path": ["q0", "q1"]})])
    with pytest.raises(StoreError, match=r"img_emb_1\.npy has 3 rows but .*metadata_1\.parquet has 2"):
        read_embeddings(str(short))
    (tmp_path / "orphan" / "img_emb").mkdir(parents=True)
    np.save(tmp_path / "orphan" / "img_emb" / "img_emb_0.npy", a)
    with pytest.raises(StoreError, match="no metadata/"):
        list_parts(str(tmp_path / "orphan"))


def test_export_then_index_answers_like_the_original_index(emb, tmp_path):
    """CLI both ways: ``thinkfast export`` -> ``thinkfast index --embeddings CLIPDIR``."""
    out, log = tmp_path / "clip", str(tmp_path / "cli.log")
    assert cli.main(["--log-file", log, "export", "--format", "clip-retrieval", emb["root"], str(out),
                     "--rows-per-file", "64"]) == 0
    assert cli.main(["--log-file", log, "index", "--local", "--embeddings", str(out),
                     "--out", str(tmp_path / "imported")]) == 0
    assert not (tmp_path / "imported" / "_clip_retrieval_import").exists()  # the staging copy is gone
    original = index_cli.build_index(emb["root"], str(tmp_path / "original"), use_ray=False)
    imported = ShardedIndex.load(str(tmp_path / "imported"))
    assert imported.model_identity == original.model_identity == IDENTITY  # carried by thinkfast_export.json
    assert imported.factory == original.factory and len(imported) == N
    queries = _vectors(12, 4)
    ref = ShardedIndex.load(str(tmp_path / "original")).search(queries, k=10)
    got = imported.search(queries, k=10)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], atol=1e-5)
    assert cli.main(["--log-file", log, "index", "--local", "--embeddings", str(out), "--model-identity", "other",
                     "--out", str(tmp_path / "relabelled")]) == 0
    assert ShardedIndex.load(str(tmp_path / "relabelled")).model_identity == "other"


def test_an_imported_index_records_the_fast_model_it_is_told(tmp_path, models):
    """clip-retrieval records no model; --model-identity-from FAST records FAST's identity,
    which serve and eval then check their --fast against."""
    from thinkfast.models.fast import FastModel

    clip = _clip_dir(tmp_path / "clip", [(_unit(_vectors(6, 7)), {"image_path": [f"p{i}" for i in range(6)]})])
    assert cli.main(["--log-file", str(tmp_path / "cli.log"), "index", "--local", "--embeddings", str(clip),
                     "--model-identity-from", models[0], "--out", str(tmp_path / "index")]) == 0
    identity = FastModel.from_pretrained(models[0]).identity
    assert ShardedIndex.load(str(tmp_path / "index")).model_identity == identity


def test_export_and_import_on_s3(emb, s3_bucket, tmp_path):
    out = f"{s3_bucket}/clip"
    summary = export_clip_retrieval(emb["root"], out, rows_per_file=100)
    assert summary.parts == 3
    keys, vectors = read_embeddings(out)
    position = {k: i for i, k in enumerate(emb["keys"])}
    np.testing.assert_allclose(vectors, _unit(emb["vectors"])[[position[k] for k in keys]], atol=1e-6)
    index_cli.build_index(out, f"{s3_bucket}/index", use_ray=False)
    assert len(ShardedIndex.load(f"{s3_bucket}/index", cache_dir=str(tmp_path / "cache"))) == N


# --------------------------------------------------------------------------- autofaiss and clip-retrieval themselves

# Runs in the tools' venv: (1) clip-retrieval 2.45's own OutputSink (clip_inference/writer.py,
# loaded by path: the package's __init__ imports its Flask back-end) writes a layout with
# --enable_metadata as `clip-retrieval inference` does; (2) autofaiss' build_index indexes
# every img_emb/ folder and answers the queries.
_TOOLS_SCRIPT = r"""
import importlib.util, json, sys
import numpy as np
from autofaiss import build_index
cfg = json.loads(sys.argv[1])
w = cfg["write"]
spec = importlib.util.spec_from_file_location("writer", w["writer"])
writer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(writer)
vectors, keys = np.load(w["vectors"]), w["keys"]
bounds = np.linspace(0, len(keys), w["parts"] + 1).astype(int)
for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
    sink = writer.OutputSink(w["out"], False, True, True, i, w["parts"])
    sink.add({"image_embs": vectors[a:b], "image_filename": [f"{k}.jpg" for k in keys[a:b]],
              "metadata": [json.dumps({"key": k, "url": "http://127.0.0.1/" + k}) for k in keys[a:b]]})
    sink.flush()
queries = np.load(cfg["queries"]).astype("float32")
out = {}
for name, folder in cfg["indexes"].items():
    index, _ = build_index(embeddings=folder, file_format="npy", index_key="Flat", save_on_disk=False,
                           max_index_memory_usage="1G", current_memory_available="2G", metric_type="ip", verbose=40)
    scores, ids = index.search(queries, 10)
    out[name] = {"ids": ids.tolist(), "scores": scores.tolist()}
print(json.dumps(out))
"""


def tools_python() -> Path:
    """The tools' venv python, created on first use under a file lock (so parallel
    sessions share one) and marked complete only once pip succeeded."""
    python, marker = AUTOFAISS_VENV / "bin" / "python", AUTOFAISS_VENV / ".complete"
    wanted = " ".join(AUTOFAISS_PINS + CLIP_RETRIEVAL_NO_DEPS)
    AUTOFAISS_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(str(AUTOFAISS_VENV) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == wanted:
            return python
        subprocess.run(["rm", "-rf", str(AUTOFAISS_VENV)], check=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(AUTOFAISS_VENV)], check=True)
        pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile"]
        for args in (list(AUTOFAISS_PINS), ["--no-deps", *CLIP_RETRIEVAL_NO_DEPS]):
            done = subprocess.run(pip + args, capture_output=True, text=True)
            if done.returncode:
                pytest.fail(f"could not install {args} into {AUTOFAISS_VENV}: {done.stderr[-2000:]}")
        marker.write_text(wanted)
    return python


def test_autofaiss_and_clip_retrieval_agree_with_thinkfast(emb, tmp_path):
    """autofaiss on thinkfast's export finds thinkfast's exact neighbours; thinkfast reads
    what clip-retrieval's own writer wrote and finds autofaiss' neighbours on it."""
    exports = {}
    for dtype in ("float32", "float16"):
        exports[dtype] = tmp_path / dtype
        export_clip_retrieval(emb["root"], str(exports[dtype]), dtype=dtype, rows_per_file=50)
    queries = _unit(_vectors(16, 5))
    np.save(tmp_path / "queries.npy", queries)
    foreign = _unit(_vectors(N, 6)).astype(np.float16)  # what clip-retrieval stores: normalised float16
    np.save(tmp_path / "foreign.npy", foreign)
    python = tools_python()
    writer = next((python.parent.parent / "lib").glob("python3*/site-packages/clip_retrieval/clip_inference/writer.py"))
    cfg = {"queries": str(tmp_path / "queries.npy"),
           "write": {"writer": str(writer), "out": str(tmp_path / "foreign"), "vectors": str(tmp_path / "foreign.npy"),
                     "keys": emb["keys"], "parts": 3},
           "indexes": {**{d: str(p / "img_emb") for d, p in exports.items()}, "foreign": str(tmp_path / "foreign/img_emb")}}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    done = subprocess.run([str(python), "-c", _TOOLS_SCRIPT, json.dumps(cfg)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    exact = ShardedIndex.build(emb["keys"], emb["vectors"], str(tmp_path / "exact"), factory="Flat")
    ref_keys, ref_scores = exact.search(queries, k=10)
    for dtype, folder in exports.items():
        _, meta = _concat_clip(folder)
        got = np.array(meta.column("key").to_pylist(), dtype=object)[np.array(found[dtype]["ids"])]
        if dtype == "float32":
            np.testing.assert_array_equal(got, ref_keys)
            np.testing.assert_allclose(found[dtype]["scores"], ref_scores, atol=1e-5)
        else:  # float16 rounding: the same neighbours as thinkfast's index of the same float16 export
            imported = ShardedIndex.build(*read_embeddings(str(folder)), str(tmp_path / "exact16"), factory="Flat")
            np.testing.assert_array_equal(got, imported.search(queries, k=10)[0])
            assert np.mean(got == ref_keys) > 0.9  # and nearly those of the float32 vectors
    # clip-retrieval's own files: names img_emb_0..2, metadata with img2dataset's key flattened in
    assert sorted(p.name for p in (tmp_path / "foreign" / "metadata").iterdir())[0] == "metadata_0.parquet"
    keys, vectors = read_embeddings(str(tmp_path / "foreign"))
    assert keys == emb["keys"]
    np.testing.assert_array_equal(vectors, foreign.astype(np.float32))
    index_cli.build_index(str(tmp_path / "foreign"), str(tmp_path / "foreign_index"), use_ray=False, factory="Flat")
    imported = ShardedIndex.load(str(tmp_path / "foreign_index"))
    assert imported.model_identity is None  # clip-retrieval records no model: serve cannot check --fast
    got = np.array(keys, dtype=object)[np.array(found["foreign"]["ids"])]
    np.testing.assert_array_equal(imported.search(queries, k=10)[0], got)
