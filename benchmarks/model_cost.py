"""Per-pair cost of the slow scorer vs the fast dual encoder (the reason re-ranking pays).

For a preset (``small`` by default) with its real vocabulary (built from a generated
corpus, so caption lengths and the decoders' output size are the demo's), it measures on
this machine, in inference mode, median of several repeats after a warm-up:

* fast per pair: one query embedding against N cached image embeddings (an exact
  ``(1, d) x (d, N)`` product, what stage 1 does without FAISS);
* slow per pair: ``SlowModel.score`` of one query against K candidates from cached fp16
  phi(x) tokens (``thinkfast.rerank.slow_scores_for_pairs``: fp16 -> fp32, one batched pass);
* the query-side and indexing-side encoders for context: ``encode_text`` of one query,
  ``encode_image`` / ``encode_visual`` per image in batches.

Weights are random: cost does not depend on their values. The machine may be shared, so
the load average before and after is recorded with the numbers.

    python benchmarks/model_cost.py            # small preset, N=100k, K in 10/100/1000
    python benchmarks/model_cost.py --quick    # fewer repeats and sizes
    python benchmarks/model_cost.py --train-steps 400 --out benchmarks/results/model_cost_train.json

``--train-steps N`` also trains both models of the preset for N steps (batch 32, plain
torch, no Ray) on a generated corpus and reports CPU seconds per training step and the
test split's R@1/5/10 for fast, slow (exhaustive) and fast top-10 re-ranked by slow:
what the cost buys, measured by the same script.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("model_cost")

RESULTS = REPO / "benchmarks" / "results" / "model_cost.json"


# CPU seconds (this process, all threads) of every timeit() call, by label: on a shared
# machine wall time includes waiting for other processes, CPU time mostly does not
CPU_SECONDS: dict[str, float] = {}


def timeit(fn: Callable[[], Any], repeats: int, warmup: int = 1, label: str | None = None) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs; the
    median CPU seconds go to ``CPU_SECONDS[label]``."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    if label:
        CPU_SECONDS[label] = statistics.median(cpus)
    return statistics.median(walls)


def corpus_captions(num_images: int, image_size: int) -> list[str]:
    """Captions of a generated corpus (the demo's vocabulary and caption lengths)."""
    from thinkfast.data.synth import SynthConfig, generate_table, plan_groups

    config = SynthConfig(num_images=num_images, image_size=image_size, seed=0)
    table = generate_table(config, plan_groups(config))
    return [c for caps in table.column("captions").to_pylist() for c in caps]


def measure(preset: str, num_embeddings: int, ks: list[int], repeats: int, batch: int) -> dict[str, Any]:
    import torch

    from thinkfast.data.tokenizer import WordTokenizer
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.rerank import slow_scores_for_pairs

    torch.manual_seed(0)
    probe = SlowModel.preset_config(preset)
    captions = corpus_captions(200, probe.image_size)
    tokenizer = WordTokenizer.build(captions, max_length=probe.max_text_length)
    fast = FastModel.from_preset(preset, tokenizer=tokenizer, load_pretrained=False).eval()
    slow = SlowModel.from_preset(preset, tokenizer=tokenizer, load_pretrained=False).eval()
    size = slow.config.image_size
    num_tokens = slow.num_visual_tokens(size)
    query_text = max(captions[:50], key=len)  # a long caption: the pessimistic case for the decoders
    fast_query = fast.tokenize([query_text])
    slow_query = slow.tokenize([query_text])
    query_length = int(slow_query["attention_mask"].sum())
    rng = np.random.default_rng(0)

    out: dict[str, Any] = {
        "preset": preset,
        "image_size": size,
        "embed_dim": fast.config.embed_dim,
        "visual_tokens_T": num_tokens,
        "token_width_D": slow.config.width,
        "token_cache_bytes_per_image": num_tokens * slow.config.width * 2,
        "vocab_size": tokenizer.vocab_size,
        "query_tokens": query_length,
        "fast_params": sum(p.numel() for p in fast.parameters()),
        "slow_params": sum(p.numel() for p in slow.parameters()),
    }

    with torch.inference_mode():
        # ---- stage 1: fast dot products against N cached embeddings
        embeddings = rng.standard_normal((num_embeddings, fast.config.embed_dim)).astype(np.float32)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        query_vec = fast.encode_text(**fast_query).numpy()  # (1, d)
        fast_s = timeit(lambda: query_vec @ embeddings.T, repeats, label="fast")
        out["fast_dot_s_per_pair"] = fast_s / num_embeddings
        out["fast_dot_cpu_s_per_pair"] = CPU_SECONDS["fast"] / num_embeddings
        out["fast_dot_N"] = num_embeddings
        out["fast_dot_total_s"] = fast_s

        # ---- stage 2: slow scores from cached fp16 tokens
        slow_rows = []
        for k in ks:
            tokens = rng.standard_normal((k, num_tokens, slow.config.width)).astype(np.float16)  # (K, T, D)
            seconds = timeit(lambda: slow_scores_for_pairs(slow, tokens, [0] * k, [slow_query]), max(2, repeats // 2),
                             label=f"slow{k}")
            slow_rows.append({"K": k, "total_s": seconds, "s_per_pair": seconds / k,
                              "cpu_s_per_pair": CPU_SECONDS[f"slow{k}"] / k})
        out["slow_score"] = slow_rows
        best = min(r["s_per_pair"] for r in slow_rows)
        out["slow_s_per_pair_best"] = best
        out["slow_over_fast_ratio"] = best / out["fast_dot_s_per_pair"]
        best_cpu = min(r["cpu_s_per_pair"] for r in slow_rows)
        out["slow_cpu_s_per_pair_best"] = best_cpu
        out["slow_over_fast_cpu_ratio"] = best_cpu / out["fast_dot_cpu_s_per_pair"]

        # ---- encoders, for context
        out["fast_encode_text_s_per_query"] = timeit(lambda: fast.encode_text(**fast_query), repeats)
        pixels = torch.randn(batch, 3, size, size)
        out["fast_encode_image_s_per_image"] = timeit(lambda: fast.encode_image(pixels), max(2, repeats // 2)) / batch
        out["slow_encode_visual_s_per_image"] = timeit(lambda: slow.encode_visual(pixels), max(2, repeats // 2)) / batch
    return out


def train_check(preset: str, steps: int, num_images: int = 1000, batch: int = 32, rerank_k: int = 10) -> dict[str, Any]:
    """Train fast (NCE) and slow (caption loss) for ``steps`` each; R@K on the test split."""
    import random

    import torch

    from thinkfast.data.image import decode_image, preprocess_image
    from thinkfast.data.synth import SynthConfig, generate_table, plan_groups
    from thinkfast.data.tokenizer import WordTokenizer
    from thinkfast.losses import caption_loss, nce_loss
    from thinkfast.metrics import ranks_from_rankings, ranks_from_scores, retrieval_metrics
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast.rerank import ExactIndex, rerank_many

    torch.manual_seed(0)
    rng = random.Random(0)
    size = SlowModel.preset_config(preset).image_size
    config = SynthConfig(num_images=num_images, image_size=size, seed=0)
    rows = generate_table(config, plan_groups(config)).to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    tokenizer = WordTokenizer.build([c for r in train for c in r["captions"]])

    def pixels(items: list[dict]) -> torch.Tensor:
        return torch.stack([preprocess_image(decode_image(r["jpg"]), size) for r in items])

    train_pixels, test_pixels = pixels(train), pixels(test)
    slow = SlowModel.from_preset(preset, tokenizer=tokenizer, load_pretrained=False)
    fast = FastModel.from_preset(preset, tokenizer=tokenizer, load_pretrained=False)
    out: dict[str, Any] = {"train_images": len(train), "test_queries": len(test), "steps": steps, "batch": batch}
    for name, model, lr in (("slow", slow, 2e-3), ("fast", fast, 1e-3)):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        model.train()
        cpu_start, losses = time.process_time(), []
        for _ in range(steps):
            idx = rng.sample(range(len(train)), batch)
            tokens = model.tokenize([rng.choice(train[i]["captions"]) for i in idx])
            a, b = model(train_pixels[idx], **tokens)
            loss = caption_loss(a, b, tokens["attention_mask"]) if name == "slow" else nce_loss(a, b, temperature=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.eval()
        out[f"{name}_cpu_s_per_step"] = (time.process_time() - cpu_start) / steps
        out[f"{name}_loss_first_last"] = [losses[0], float(np.mean(losses[-20:]))]
    captions = [r["captions"][0] for r in test]
    keys = [r["key"] for r in test]
    targets = list(range(len(test)))
    with torch.inference_mode():
        images = fast.encode_image(test_pixels).numpy()
        texts = fast.encode_text(**fast.tokenize(captions)).numpy()
        out["fast"] = retrieval_metrics(ranks_from_scores(texts @ images.T, targets))
        visual = slow.encode_visual(test_pixels)
        out["slow_exhaustive"] = retrieval_metrics(ranks_from_scores(slow.score_matrix(visual, **slow.tokenize(captions)).numpy(), targets))
        cached = dict(zip(keys, visual.half().numpy()))
        cand_keys, cand_scores = ExactIndex(keys, images).search(texts, rerank_k)
        hits = rerank_many(slow, lambda ks: np.stack([cached[k] for k in ks]), [slow.tokenize([c]) for c in captions],
                           [list(k) for k in cand_keys], [list(s) for s in cand_scores], k=rerank_k)
        # answers outside the fast top-K keep their fast rank (> K): R@k for k <= K is exact
        fast_ranks = ranks_from_scores(texts @ images.T, targets)
        ranks = ranks_from_rankings([[h.key for h in hs] for hs in hits], keys)
        ranks = np.where(np.isinf(ranks), fast_ranks, ranks)
        out[f"fast_then_slow_top{rerank_k}"] = retrieval_metrics(ranks)
    return out


def print_table(r: dict[str, Any]) -> None:
    def us(x: float) -> str:
        return f"{x * 1e6:12.3f} us"

    print(f"\nmodel cost, preset={r['preset']} ({r['image_size']} px, T={r['visual_tokens_T']} tokens x D={r['token_width_D']}, "
          f"d={r['embed_dim']}, vocab={r['vocab_size']}, query of {r['query_tokens']} tokens), "
          f"torch threads={r['torch_threads']}, load avg {r['loadavg_before'][0]:.1f} -> {r['loadavg_after'][0]:.1f}")
    print(f"{'what':<48}{'wall per pair':>16}{'CPU per pair':>16}")
    print(f"{'fast dot product (N=' + str(r['fast_dot_N']) + ')':<48}{us(r['fast_dot_s_per_pair'])}{us(r['fast_dot_cpu_s_per_pair'])}")
    for row in r["slow_score"]:
        print(f"{'slow score from cached tokens (K=' + str(row['K']) + ')':<48}{us(row['s_per_pair'])}{us(row['cpu_s_per_pair'])}")
    print(f"{'slow / fast per-pair cost ratio (best K)':<48}{r['slow_over_fast_ratio']:>15,.0f}x{r['slow_over_fast_cpu_ratio']:>15,.0f}x")
    print(f"{'(per item below: wall)':<48}")
    print(f"{'fast encode_text (1 query)':<48}{us(r['fast_encode_text_s_per_query'])}")
    print(f"{'fast encode_image (per image, batched)':<48}{us(r['fast_encode_image_s_per_image'])}")
    print(f"{'slow encode_visual (per image, batched)':<48}{us(r['slow_encode_visual_s_per_image'])}")
    print(f"token cache: {r['token_cache_bytes_per_image'] / 1024:.1f} KiB per image (fp16); "
          f"params fast {r['fast_params']:,} slow {r['slow_params']:,}")
    if "train_check" in r:
        t = r["train_check"]
        print(f"\ntraining {t['steps']} steps of {t['batch']} ({t['train_images']} train images): CPU s/step "
              f"slow {t['slow_cpu_s_per_step']:.3f}, fast {t['fast_cpu_s_per_step']:.3f}; {t['test_queries']} test queries")
        print(f"{'ranking':<28}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'median':>8}")
        for name in ("fast", "slow_exhaustive", next(k for k in t if k.startswith("fast_then_slow"))):
            m = t[name]
            print(f"{name:<28}{m['R@1']:>8.1f}{m['R@5']:>8.1f}{m['R@10']:>8.1f}{m['median_rank']:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "paper"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller N and K")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--train-steps", type=int, default=0, help="also train both models this many steps and report R@K")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    n, ks, repeats = (20_000, [10, 100], 5) if args.quick else (100_000, [10, 100, 1000], 11)
    before = os.getloadavg()
    result = measure(args.preset, n, ks, repeats, batch=16 if args.quick else 64)
    if args.train_steps:
        result["train_check"] = train_check(args.preset, args.train_steps)
    result.update({
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "quick": args.quick,
        "loadavg_before": list(before),
        "loadavg_after": list(os.getloadavg()),
        "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
