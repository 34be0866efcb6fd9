"""``thinkfast eval`` on a tiny generated corpus: the table is complete, re-ranking every
candidate reproduces exhaustive slow ranking (one code path, ``thinkfast.rerank``), the
embed/index artifacts give the same numbers as in-process embedding, and bad input fails
with one clear line. Models are untrained (values are not the point; agreement is)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import thinkfast.evaluate as ev
from thinkfast_pipelines.cli import main as cli_main

METRIC_KEYS = {"method", "R@1", "R@5", "R@10", "median_rank", "slow_evals_per_query", "ms_per_query", "queries"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A 60-image generated corpus (32 px, 2 captions) and untrained tiny models on disk."""
    from thinkfast import FastModel, SlowModel
    from thinkfast.data.reader import read_table
    from thinkfast.data.synth import SynthConfig, write_synth
    from thinkfast.data.tokenizer import WordTokenizer

    root = tmp_path_factory.mktemp("eval")
    corpus = str(root / "corpus")
    write_synth(corpus, SynthConfig(num_images=60, captions_per_image=2, image_size=32, test_fraction=0.3, seed=3))
    captions = [c for caps in read_table(corpus, columns=["captions"]).column("captions").to_pylist() for c in caps]
    tokenizer = WordTokenizer.build(captions)
    FastModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(str(root / "fast"))
    SlowModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(str(root / "slow"))
    return {"root": root, "corpus": corpus, "fast": str(root / "fast"), "slow": str(root / "slow")}


def test_report_is_complete_and_rerank_all_equals_exhaustive(artifacts):
    out = artifacts["root"] / "report.json"
    report = ev.evaluate(artifacts["corpus"], artifacts["fast"], artifacts["slow"], rerank=[3, 1000], out=str(out))
    n, q = report["gallery_size"], report["num_queries"]
    assert n >= 10 and q == 2 * n
    names = [m["method"] for m in report["methods"]]
    assert names == ["fast", "slow", "fast+slow rerank@3", "fast+slow rerank@1000"]
    for m in report["methods"]:
        assert METRIC_KEYS <= set(m)
        assert 0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 100
        assert 1 <= m["median_rank"] <= n
        assert m["queries"] == q
    fast, slow, k3, kall = report["methods"]
    assert fast["slow_evals_per_query"] == 0 and slow["slow_evals_per_query"] == n
    assert k3["slow_evals_per_query"] == 3 and kall["slow_evals_per_query"] == n
    # with beta = 0, re-ranking the whole gallery through thinkfast.rerank is exhaustive slow ranking
    for key in ("R@1", "R@5", "R@10", "median_rank"):
        assert kall[key] == slow[key], key
    # outside its 3 candidates an answer keeps its fast rank, so R@10 can only move within the top 3
    assert k3["R@10"] == fast["R@10"]
    assert json.loads(out.read_text())["methods"] == report["methods"]


def test_rerank_ranks_place_answers_outside_candidates_by_fast_order():
    """Hand-made case: 4 images; the answer of query 0 is outside its 2 candidates."""

    class FakeSlow:
        def tokenize(self, texts):
            import torch

            return {"input_ids": torch.ones(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long)}

    fast_scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.9, 0.8]], dtype=np.float32)
    queries = ev.Queries(texts=["q0", "q1"], target=np.array([3, 3]))
    keys = ["a", "b", "c", "d"]
    candidates = ev.exact_candidates(fast_scores, 2)
    slow_h = {"a": -5.0, "b": -1.0, "c": -3.0, "d": -2.0}

    import thinkfast.rerank as rr

    original = rr.slow_scores_for_pairs
    rr.slow_scores_for_pairs = lambda model, tokens, index, queries, max_pairs=None: np.asarray(tokens)[:, 0, 0].astype(np.float64)
    try:
        getter = lambda ks: np.array([[[slow_h[k]]] for k in ks], dtype=np.float16)  # noqa: E731
        ranks, evals = ev.rerank_ranks(FakeSlow(), queries, keys, fast_scores, getter, candidates, beta=0.0)
    finally:
        rr.slow_scores_for_pairs = original
    # query 0: candidates a, b re-ranked (b first); d is 4th by fast order -> rank 2 + 1 + 1 (c above it)
    # query 1: candidates c, d; slow prefers d -> rank 1
    assert ranks.tolist() == [4, 1] and evals == 2


@pytest.mark.ray
def test_embeddings_and_index_match_in_process(artifacts, ray_session):
    from thinkfast_pipelines.embed import embed
    from thinkfast_pipelines.index import build_index

    emb = str(artifacts["root"] / "emb")
    idx = str(artifacts["root"] / "index")
    embed(artifacts["corpus"], emb, artifacts["fast"], artifacts["slow"])
    build_index(emb, idx, shards=2)
    # over every split the gallery is exactly what the index holds: same candidates, same numbers
    common = {"split": None, "rerank": [5], "max_queries": 40}
    local = ev.evaluate(artifacts["corpus"], artifacts["fast"], artifacts["slow"], **common)
    stored = ev.evaluate(artifacts["corpus"], artifacts["fast"], artifacts["slow"], embeddings=emb, index=idx, **common)
    assert stored["gallery_size"] == local["gallery_size"] == 60 and stored["rejected_count"] == 0
    assert stored["methods"][-1]["foreign_candidates"] == 0
    for a, b in zip(local["methods"], stored["methods"]):
        assert a["method"] == b["method"]
        for key in ("R@1", "R@5", "R@10"):  # fp16 tokens may flip one near-tie, not more
            assert math.isclose(a[key], b[key], abs_tol=100.0 / 40 + 1e-6), (a, b)
    # on the test split the index (built over every split) also returns other splits' keys:
    # they are skipped and counted, and each query still gets its best 5 test-split images
    test_only = ev.evaluate(artifacts["corpus"], artifacts["fast"], artifacts["slow"], embeddings=emb, index=idx,
                            rerank=[5], exhaustive=False)
    exact = ev.evaluate(artifacts["corpus"], artifacts["fast"], artifacts["slow"], embeddings=emb,
                        rerank=[5], exhaustive=False)
    assert test_only["methods"][-1]["foreign_candidates"] > 0
    assert test_only["methods"][-1]["slow_evals_per_query"] == exact["methods"][-1]["slow_evals_per_query"] == 5
    for key in ("R@1", "R@5", "R@10"):  # Flat index = the exact top 5 of the split
        assert math.isclose(test_only["methods"][-1][key], exact["methods"][-1][key], abs_tol=1e-6)


def test_cli_prints_table_and_rejects_bad_input(artifacts, tmp_path, capsys):
    code = cli_main(["eval", "--corpus", artifacts["corpus"], "--fast", artifacts["fast"], "--rerank", "2",
                     "--max-queries", "8", "--out", str(tmp_path / "r.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| fast |" in printed and "8 queries" in printed
    assert cli_main(["eval", "--corpus", str(tmp_path / "nope"), "--fast", artifacts["fast"]]) == 2
    assert "thinkfast eval: error:" in capsys.readouterr().err
    assert cli_main(["eval", "--corpus", artifacts["corpus"], "--fast", str(tmp_path)]) == 2
    assert cli_main(["eval", "--corpus", artifacts["corpus"], "--fast", artifacts["fast"], "--split", "nosuch"]) == 2
    assert "no rows in split" in capsys.readouterr().err


def test_video_corpus_fast_pools_frames_slow_sees_frame_tokens(tmp_path):
    from thinkfast import FastModel, SlowModel, encode
    from thinkfast.data.reader import read_table
    from thinkfast.data.synth import SynthConfig, write_synth
    from thinkfast.data.tokenizer import WordTokenizer

    corpus = str(tmp_path / "clips")
    write_synth(corpus, SynthConfig(num_images=16, captions_per_image=2, image_size=32, video=True, num_frames=4,
                                    test_fraction=0.5, seed=1))
    captions = [c for caps in read_table(corpus, columns=["captions"]).column("captions").to_pylist() for c in caps]
    tokenizer = WordTokenizer.build(captions)
    fast = FastModel.from_preset("tiny", tokenizer=tokenizer)
    slow = SlowModel.from_preset("tiny", tokenizer=tokenizer)
    report = ev.evaluate(corpus, fast, slow, rerank=[2], num_frames=3)
    assert report["video"] and report["num_frames"] == 3
    assert [m["method"] for m in report["methods"]] == ["fast", "slow", "fast+slow rerank@2"]
    gallery = ev.load_gallery(corpus, "test", num_frames=3)
    tokens = encode.visual_tokens(slow, gallery.pixels(slow.config.image_size))
    assert tokens.shape[:2] == (len(gallery.keys), slow.num_visual_tokens(num_frames=3))  # tokens of every frame


def _accuracy_module():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy.py"
    spec = importlib.util.spec_from_file_location("thinkfast_bench_accuracy", path)
    acc = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = acc
    spec.loader.exec_module(acc)
    return acc


def test_sign_test_matches_hand_computed_binomial():
    acc = _accuracy_module()
    # 8 queries only A ranks first, 2 only B, 3 both, 2 neither: n = 10 discordant
    a = [1] * 8 + [3] * 2 + [1] * 3 + [2] * 2
    b = [2] * 8 + [1] * 2 + [1] * 3 + [5] * 2
    test = acc.sign_test(a, b)
    assert (test["won"], test["lost"]) == (8, 2)
    assert test["p"] == pytest.approx(2 * (1 + 10 + 45) / 1024, rel=1e-2)  # 2 P(X <= 2), X ~ Bin(10, 1/2)
    assert acc.sign_test(a, a) == {"won": 0, "lost": 0, "p": 1.0}
    claim = acc._paired({"claim": "x", "held": True, "evidence": "e"}, {"A": a, "B": b}, "A", "B")
    assert claim["significant"] is False and "8 won / 2 lost" in claim["evidence"]
    rows = [{"method": "video fast (NCE, mean over frames)", "R@1": 20.0, "K": None, "slow_evals_per_query": 0},
            {"method": "video slow exhaustive (8 frame tokens)", "R@1": 66.7, "slow_evals_per_query": 40},
            {"method": "video fast + slow rerank@5", "R@1": 60.0, "K": 5, "slow_evals_per_query": 5},
            {"method": "video fast + slow rerank@10", "R@1": 66.0, "K": 10, "slow_evals_per_query": 10}]
    for r in rows:
        r["ms_per_query"] = 1.0
    video = acc.check_video_claims(rows, 40, {rows[0]["method"]: [2, 2, 1], rows[1]["method"]: [1, 1, 1]})
    assert [c["held"] for c in video] == [True, True] and video[0]["sign_test"] == {"won": 2, "lost": 0, "p": 0.5}
    assert "K=10" in video[1]["evidence"]  # the smallest K within 1 point of slow
    # K=10 is no "small K" over a 30-clip gallery (more than a quarter of it)
    assert acc.check_video_claims(rows, 30)[1]["held"] is False


@pytest.mark.slow
@pytest.mark.ray
def test_accuracy_experiment_tiny_produces_complete_table(ray_session, tmp_path):
    """benchmarks/accuracy.py's code path on a tiny corpus: every row and claim of the table is
    there. Values are measured, not asserted. Trained in-process (``--trainer inprocess``, which
    tests/test_training_equivalence.py shows gives Ray Train's losses), to keep the suite's budget."""
    import dataclasses
    from pathlib import Path

    acc = _accuracy_module()
    # hard negatives need Ray Train's index-neighbour batches: tests/test_train_distill_sources.py covers them
    cfg = dataclasses.replace(acc.QUICK, images=60, betas=(0.0, 1.0), hard_negatives=False)
    result = acc.run_experiment(cfg, str(tmp_path / "work"), video=False, plots_prefix=tmp_path / "acc",
                                out=tmp_path / "acc.json", trainer="inprocess")
    methods = [r["method"] for r in result["images"]["rows"]]
    assert methods[0] == "fast (NCE)" and methods[1].startswith("slow exhaustive, all levels")
    assert methods[2].startswith("slow exhaustive, fine") and methods[3].startswith("slow exhaustive, coarse")
    assert methods[4] == "fast distilled"
    assert methods[5:] == [f"fast distilled+slow rerank@{k}" for k in cfg.rerank]
    for row in result["images"]["rows"]:
        assert METRIC_KEYS <= set(row) and row["queries"] == result["images"]["num_queries"]
    assert [c["claim"] for c in result["claims"]][:3] == ["slow beats fast", "fine-grained beats coarse",
                                                          "distillation improves fast"]
    ranks = result["images"]["ranks"]  # every row's per-query ranks: the claims' sign tests use them
    assert set(methods) <= set(ranks) and all(len(ranks[m]) == result["images"]["num_queries"] for m in methods)
    assert all("sign_test" in c for c in result["claims"][:3])
    assert result["claims"][4]["claim"].startswith("more visual tokens")
    assert len(result["claims"]) == 5 and all(isinstance(c["held"], bool) for c in result["claims"])
    assert result["images"]["beta"] in cfg.betas
    assert all(Path(p).stat().st_size > 0 for p in result["plots"]) and len(result["plots"]) == 2
    assert "| claim | held? |" in acc.markdown(result)
    saved = json.loads((tmp_path / "acc.json").read_text())
    assert saved["claims"] == result["claims"] and "ranks" not in saved["images"]
    assert json.loads((tmp_path / saved["ranks_file"]).read_text())["images"] == ranks
