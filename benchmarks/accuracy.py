"""The paper's experiment on the generated corpus: does thinking fast and slow pay off?

    python benchmarks/accuracy.py            # the `small` preset: the table in docs/RESULTS.md
    python benchmarks/accuracy.py --quick    # tiny preset, a few minutes: the code path only

Generates a corpus (``thinkfast.data.synth``), trains with the project's own training
functions (``thinkfast_pipelines.train``: Ray Train; ``--trainer inprocess``: the library's
``thinkfast.training.fit``, the same step and schedule in one process, for when Ray workers
cannot start in time), then evaluates with ``thinkfast_pipelines.evaluate``
(the ``thinkfast eval`` code path, which re-ranks through ``thinkfast.rerank`` like the
service) on the test split, every caption a query:

* images: fast (NCE only) · fast distilled · slow exhaustive (fine-grained tokens) ·
  slow exhaustive with coarse tokens (stride 32 only: the paper's 49-token baseline, vs
  the stride-16 map: its 196 tokens, scaled to the corpus's image size) · fast distilled
  + slow re-rank at each K (β tuned on the val split);
* video (generated clips): fast (NCE) mean-pooled over frames vs slow with frame tokens,
  and the fast top-K re-ranked by the slow model at each K (no distillation run for
  video: it would double the training time for a claim the image table already tests).

Prints the table, writes ``benchmarks/results/accuracy[_quick].json`` and two plots
(recall vs K, latency vs K), and states for each of the paper's claims whether it held.
Numbers are measured, never asserted; wall times are on whatever this machine is doing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("benchmarks.accuracy")

RESULTS = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class ExperimentConfig:
    """Sizes and schedule of one run of the experiment."""

    preset: str = "small"  # model preset of every model (tiny | small | paper)
    images: int = 2000  # generated images, all splits (10 % val, 10 % test)
    captions_per_image: int = 3  # captions per image: every test caption is a query
    image_size: int = 64  # generated image side (the small preset's input size)
    slow_epochs: int = 12  # epochs of L_CA for each slow model (the small preset's default schedule)
    fast_epochs: int = 12  # epochs of L_DE (and of L_DE + alpha L_distill, from scratch: same steps)
    batch_size: int = 64  # pairs per worker per step (in-batch negatives, B_i)
    video_batch_size: int = 32  # the same for the video models (320 train clips: 10 steps per epoch)
    workers: int = 1  # Ray Train workers (1 worker x 2 threads beats 2 DDP ranks on 2 cores)
    alpha: float = 1.0  # weight of L_distill
    hard_negatives: bool = False  # also distil with B_i built from the NCE model's index neighbours
    group_size: int = 4  # images per neighbour group with hard_negatives (each B_i: 3 hard + 60 in-batch)
    fine_levels: tuple[int, ...] = (16,)  # fine-grained tokens: stride 16 (196 tokens at 224 px)
    coarse_levels: tuple[int, ...] = (32,)  # coarse tokens: stride 32 only (49 tokens at 224 px)
    all_levels: tuple[int, ...] = (32, 16, 8)  # the presets' default pyramid: strides 32+16+8 (84 tokens at 64 px)
    rerank: tuple[int, ...] = (5, 10, 20, 50)  # K of the two-stage rows
    betas: tuple[float, ...] = (0.0, 1.0, 5.0, 20.0)  # beta grid tuned on val (R@1 at K=10)
    max_queries: int | None = None  # cap on test queries (None: every caption)
    video_clips: int = 400  # generated clips for the video variant (0 skips it)
    video_epochs: int = 20  # epochs for each video model (200 steps)
    num_frames: int = 4  # frames sampled per clip (training, embedding and evaluation)
    seed: int = 0  # corpus and training seed


QUICK = ExperimentConfig(preset="tiny", images=120, captions_per_image=2, image_size=32, slow_epochs=1, fast_epochs=1,
                         batch_size=16, video_batch_size=16, workers=1, rerank=(5, 10), betas=(0.0, 5.0), video_clips=60,
                         video_epochs=1,
                         num_frames=2, fine_levels=(16,), coarse_levels=(32,))


# --------------------------------------------------------------------------- stages


def make_corpus(out: str, cfg: ExperimentConfig, video: bool) -> dict[str, Any]:
    """Generate the images (or clips) corpus; returns its split counts."""
    from thinkfast.data.synth import SynthConfig, write_synth

    synth_cfg = SynthConfig(num_images=cfg.video_clips if video else cfg.images,
                            captions_per_image=cfg.captions_per_image, image_size=cfg.image_size,
                            video=video, num_frames=max(cfg.num_frames, 4), seed=cfg.seed)
    result = write_synth(out, synth_cfg, overwrite=True)
    return {"rows": result.num_rows, "splits": result.splits, "hard_pairs": result.hard_pairs,
            "seconds": round(result.seconds, 2)}


def _train_kwargs(cfg: ExperimentConfig, epochs: int, video: bool = False) -> dict[str, Any]:
    batch = cfg.video_batch_size if video else cfg.batch_size
    return {"preset": cfg.preset, "epochs": epochs, "batch_size": batch, "workers": cfg.workers,
            "num_frames": cfg.num_frames, "seed": cfg.seed}


def _fresh_slow(corpus: str, out: str, cfg: ExperimentConfig, levels: tuple[int, ...]) -> str:
    """An untrained slow model with the given FPN levels and the corpus's train vocabulary,
    saved as the starting point of ``train_slow(init=...)``."""
    from thinkfast import SlowModel
    from thinkfast.data.reader import read_table
    from thinkfast.data.tokenizer import WordTokenizer

    table = read_table(corpus, columns=["captions"], filter_split="train")
    captions = [c for caps in table.column("captions").to_pylist() for c in caps]
    model = SlowModel.from_preset(cfg.preset, tokenizer=WordTokenizer.build(captions), levels=tuple(levels))
    model.save_pretrained(out)
    return out


def _trainers(trainer: str) -> dict[str, Callable[..., Any]]:
    """objective -> a function ``(corpus, out, **kwargs) -> TrainResult``: the Ray Train
    functions, or the library's in-process trainer with the same keywords (same config,
    objectives, schedule and data order; one process, no checkpoints)."""
    if trainer == "ray":
        from thinkfast_pipelines.train import distill, train_fast, train_slow

        return {"slow": train_slow, "fast": train_fast, "distill": distill}
    from thinkfast.training import fit

    return {kind: functools.partial(fit, kind) for kind in ("slow", "fast", "distill")}


def _finished(model_dir: str) -> dict[str, Any] | None:
    """The ``training.json`` of a finished run in ``model_dir`` (None when absent)."""
    path = os.path.join(model_dir, "training.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def train_models(corpus: str, workdir: str, cfg: ExperimentConfig, video: bool, reuse: bool = False,
                 trainer: str = "ray") -> dict[str, Any]:
    """Train slow (fine, and coarse for images), fast NCE and fast distilled; returns model
    dirs and each run's seconds and history. ``reuse`` keeps models a previous (interrupted)
    run of the same workdir finished, so a long experiment can be resumed. ``trainer``:
    ray (``thinkfast_pipelines.train``) or inprocess (``thinkfast.training.fit``)."""
    train = _trainers(trainer)
    slow_epochs = cfg.video_epochs if video else cfg.slow_epochs
    fast_epochs = cfg.video_epochs if video else cfg.fast_epochs
    runs: dict[str, Any] = {}

    def record(name: str, run: Callable[[str], Any]) -> None:
        out = os.path.join(workdir, name)
        done = _finished(out) if reuse else None
        if done is None:
            result = run(out)
            done = {"out": result.out, "seconds": result.seconds, "steps": result.steps, "history": result.history}
        else:
            logger.info("reusing %s from a previous run", out)
        runs[name] = {"dir": done["out"], "seconds": round(done["seconds"], 1), "steps": done["steps"],
                      "history": done["history"], "trainer": trainer}
        logger.info("trained %s in %.1f s (%d steps)", name, done["seconds"], done["steps"])

    # the whole pyramid is the slow model (teacher, re-ranker); fine / coarse only: the token ablation (images)
    variants = [("slow_all", cfg.all_levels)] + ([] if video else [("slow_fine", cfg.fine_levels),
                                                                   ("slow_coarse", cfg.coarse_levels)])
    for name, levels in variants:
        record(name, lambda out, levels=levels: train["slow"](
            corpus, out, init=_fresh_slow(corpus, out + "-init", cfg, levels), **_train_kwargs(cfg, slow_epochs, video)))
    record("fast_nce", lambda out: train["fast"](corpus, out, **_train_kwargs(cfg, fast_epochs, video)))
    if video:  # the video claim is fast (mean-pooled frames) vs slow (frame tokens): no distillation run
        return runs
    record("fast_distilled", lambda out: train["distill"](corpus, out, teacher=runs["slow_all"]["dir"], alpha=cfg.alpha,
                                                          **_train_kwargs(cfg, fast_epochs)))
    if cfg.hard_negatives:
        record("fast_distilled_hn", lambda out: _distill_hard_negatives(corpus, out, workdir, runs, cfg, fast_epochs))
    return runs


def _distill_hard_negatives(corpus: str, out: str, workdir: str, runs: dict[str, Any], cfg: ExperimentConfig,
                            epochs: int) -> Any:
    """The paper's other B_i source: embed the corpus with the NCE model, index it, and
    distil (from scratch, same schedule) with batches of index-neighbour groups."""
    from thinkfast_pipelines.embed import embed
    from thinkfast_pipelines.index import build_index
    from thinkfast_pipelines.train import distill

    emb, index = os.path.join(workdir, "emb_nce"), os.path.join(workdir, "index_nce")
    embed(corpus, emb, runs["fast_nce"]["dir"], None)
    build_index(emb, index)
    return distill(corpus, out, teacher=runs["slow_all"]["dir"], alpha=cfg.alpha, hard_negatives=index,
                   embeddings=emb, group_size=cfg.group_size, **_train_kwargs(cfg, epochs))


def tune_beta(corpus: str, runs: dict[str, Any], cfg: ExperimentConfig) -> tuple[float, list[dict[str, Any]]]:
    """β of ``h + β·s_fast`` chosen on the val split (R@1, then R@5, at K=10): DESIGN says
    K and β are configuration tuned on validation, never on the test queries."""
    from thinkfast_pipelines.evaluate import evaluate, load_gallery

    fast, slow = _models(runs, "fast_distilled", "slow_all")
    gallery = load_gallery(corpus, "val", cfg.num_frames, check_decode_size=fast.config.image_size)
    k = min(10, len(gallery.keys))
    trials = []
    for beta in cfg.betas:
        report = evaluate(corpus, fast, slow, split="val", rerank=[k], beta=beta, exhaustive=False,
                          gallery=gallery, max_queries=cfg.max_queries, seed=cfg.seed)
        row = report["methods"][-1]
        trials.append({"beta": beta, "K": k, "R@1": row["R@1"], "R@5": row["R@5"]})
    best = max(trials, key=lambda t: (t["R@1"], t["R@5"], -t["beta"]))
    logger.info("beta tuned on val: %s (%s)", best["beta"], trials)
    return float(best["beta"]), trials


_LOADED: dict[str, Any] = {}


def _models(runs: dict[str, Any], fast_name: str, slow_name: str) -> tuple[Any, Any]:
    from thinkfast import FastModel, SlowModel

    for name, cls in ((fast_name, FastModel), (slow_name, SlowModel)):
        path = runs[name]["dir"]
        if path not in _LOADED:
            _LOADED[path] = cls.from_pretrained(path).eval()
    return _LOADED[runs[fast_name]["dir"]], _LOADED[runs[slow_name]["dir"]]


def evaluate_images(corpus: str, runs: dict[str, Any], cfg: ExperimentConfig, beta: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The image table: every row the issue asks for, on one shared test gallery. The slow
    model of the two-stage rows (and the distillation teacher) is the whole pyramid, as in
    the demo and the service; fine-only and coarse-only are the token-count ablations."""
    from thinkfast_pipelines.evaluate import evaluate, load_gallery

    fast_nce, slow = _models(runs, "fast_nce", "slow_all")
    fast_dist, slow_fine = _models(runs, "fast_distilled", "slow_fine")
    _, slow_coarse = _models(runs, "fast_distilled", "slow_coarse")
    gallery = load_gallery(corpus, "test", cfg.num_frames, check_decode_size=fast_nce.config.image_size)
    common = {"gallery": gallery, "max_queries": cfg.max_queries, "seed": cfg.seed, "beta": beta,
              "per_query_ranks": True}
    a = evaluate(corpus, fast_nce, slow, rerank=[], fast_name="fast (NCE)",
                 slow_name=f"slow exhaustive, all levels ({slow.num_visual_tokens()} tokens)", **common)
    rows, ranks = list(a["methods"]), dict(a["ranks"])
    for model, label in ((slow_fine, "fine"), (slow_coarse, "coarse")):
        r = evaluate(corpus, fast_dist, model, rerank=[], fast_name="fast distilled",
                     slow_name=f"slow exhaustive, {label} ({model.num_visual_tokens()} tokens)", **common)
        rows.append(r["methods"][1])
        ranks[r["methods"][1]["method"]] = r["ranks"][r["methods"][1]["method"]]
    b = evaluate(corpus, fast_dist, slow, rerank=cfg.rerank, exhaustive=False, fast_name="fast distilled",
                 slow_name="slow", **common)
    rows += b["methods"]
    ranks.update(b["ranks"])
    if "fast_distilled_hn" in runs:
        fast_hn, _ = _models(runs, "fast_distilled_hn", "slow_all")
        d = evaluate(corpus, fast_hn, None, rerank=[], fast_name="fast distilled, hard negatives", **common)
        rows.append(d["methods"][0])
        ranks.update(d["ranks"])
    a["ranks"] = ranks
    return rows, a


def evaluate_video(corpus: str, runs: dict[str, Any], cfg: ExperimentConfig, beta: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The video table: fast mean-pooled over frames vs slow over frame tokens, and the
    fast model's top-K re-ranked by the slow one."""
    from thinkfast_pipelines.evaluate import evaluate, load_gallery

    fast, slow = _models(runs, "fast_nce", "slow_all")
    gallery = load_gallery(corpus, "test", cfg.num_frames, check_decode_size=fast.config.image_size)
    t = slow.num_visual_tokens(num_frames=cfg.num_frames)
    report = evaluate(corpus, fast, slow, rerank=cfg.rerank, gallery=gallery, max_queries=cfg.max_queries,
                      seed=cfg.seed, beta=beta, fast_name="video fast (NCE, mean over frames)",
                      slow_name=f"video slow exhaustive ({t} frame tokens)", per_query_ranks=True)
    for row in report["methods"]:
        if "rerank@" in row["method"]:
            new = f"video fast + slow rerank@{row['K']}"
            report["ranks"][new] = report["ranks"].pop(row["method"])
            row["method"] = new
    return report["methods"], report


# --------------------------------------------------------------------------- verdicts


def _row(rows: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    for r in rows:
        if r["method"].startswith(prefix):
            return r
    raise KeyError(prefix)


def sign_test(ranks_a: list[int], ranks_b: list[int]) -> dict[str, Any]:
    """Paired comparison at R@1 on the same queries: queries A ranks first and B does not
    (won), the reverse (lost), and the exact two-sided sign-test p-value over the n = won +
    lost discordant queries (ties carry no information)."""
    from math import comb

    won = sum(1 for a, b in zip(ranks_a, ranks_b) if a == 1 and b > 1)
    lost = sum(1 for a, b in zip(ranks_a, ranks_b) if a > 1 and b == 1)
    n = won + lost
    p = min(1.0, 2 * sum(comb(n, i) for i in range(min(won, lost) + 1)) / 2 ** n) if n else 1.0
    return {"won": won, "lost": lost, "p": float(f"{p:.3g}")}


def _paired(claim: dict[str, Any], ranks: dict[str, list[int]] | None, a: str, b: str) -> dict[str, Any]:
    """Add the sign test of method ``a`` against ``b`` to a claim (when ranks are known)."""
    if ranks and a in ranks and b in ranks:
        test = sign_test(ranks[a], ranks[b])
        claim["sign_test"] = test
        claim["significant"] = bool(claim["held"] and test["p"] < 0.05)
        p = f"= {test['p']:.2g}" if test["p"] >= 1e-4 else "< 0.0001"
        claim["evidence"] += f"; per query at R@1 {test['won']} won / {test['lost']} lost, sign test p {p}"
    return claim


def _recovery_claim(rows: list[dict[str, Any]], slow: dict[str, Any], gallery_size: int,
                    prefix: str = "") -> dict[str, Any]:
    """Does some K at most a quarter of the gallery re-rank to within 1 R@1 point of slow
    exhaustive ranking (or above it)? The smallest such K is the evidence."""
    claim = f"{prefix}re-ranking a small K recovers slow accuracy at a fraction of its cost"
    reranked = [r for r in rows if "rerank@" in r["method"]]
    good = [r for r in reranked if r["R@1"] >= slow["R@1"] - 1.0]
    if not good:
        top = max(reranked, key=lambda r: r["R@1"]) if reranked else None
        return {"claim": claim, "held": False,
                "evidence": "no K reached slow R@1 - 1" + (f"; best K={top['K']} R@1 {top['R@1']:.1f} vs slow "
                                                             f"{slow['R@1']:.1f}" if top else "")}
    best = min(good, key=lambda r: r["K"])
    return {"claim": claim, "held": best["K"] <= max(1, gallery_size // 4),
            "evidence": (f"K={best['K']}: R@1 {best['R@1']:.1f} vs slow {slow['R@1']:.1f}, "
                         f"{best['slow_evals_per_query']:g} vs {slow['slow_evals_per_query']:g} slow evals/query, "
                         f"{best['ms_per_query']:.1f} vs {slow['ms_per_query']:.1f} ms/query")}


def check_video_claims(rows: list[dict[str, Any]], gallery_size: int,
                       ranks: dict[str, list[int]] | None = None) -> list[dict[str, Any]]:
    """The video variant: slow over frame tokens vs fast mean-pooled, and re-ranking."""
    fast, slow = _row(rows, "video fast (NCE"), _row(rows, "video slow exhaustive")
    claims = [_paired({"claim": "video: slow (frame tokens) beats fast (mean-pooled frames)",
                       "held": slow["R@1"] > fast["R@1"],
                       "evidence": f"R@1 slow {slow['R@1']:.1f} vs fast {fast['R@1']:.1f}"},
                      ranks, slow["method"], fast["method"])]
    claims.append(_recovery_claim(rows, slow, gallery_size, "video: "))
    return claims


def check_claims(rows: list[dict[str, Any]], gallery_size: int,
                 ranks: dict[str, list[int]] | None = None) -> list[dict[str, Any]]:
    """The paper's claims, each as measured here (held or not, with the numbers and, given
    per-query ranks, a paired sign test: is the difference more than noise?). ``slow`` is
    the whole-pyramid model (teacher and re-ranker); fine vs coarse is the token ablation."""
    fast, dist = _row(rows, "fast (NCE)"), _row(rows, "fast distilled")
    slow = _row(rows, "slow exhaustive, all levels")
    fine, coarse = _row(rows, "slow exhaustive, fine"), _row(rows, "slow exhaustive, coarse")
    best_fast = max((fast, dist), key=lambda r: r["R@1"])
    claims = [
        _paired({"claim": "slow beats fast", "held": slow["R@1"] > max(fast["R@1"], dist["R@1"]),
                 "evidence": f"R@1 slow {slow['R@1']:.1f} vs fast {fast['R@1']:.1f} / distilled {dist['R@1']:.1f}"},
                ranks, slow["method"], best_fast["method"]),
        _paired({"claim": "fine-grained beats coarse", "held": fine["R@1"] > coarse["R@1"],
                 "evidence": f"R@1 {fine['method']} {fine['R@1']:.1f} vs {coarse['method']} {coarse['R@1']:.1f}"},
                ranks, fine["method"], coarse["method"]),
        _paired({"claim": "distillation improves fast", "held": dist["R@1"] > fast["R@1"],
                 "evidence": f"R@1 distilled {dist['R@1']:.1f} vs NCE only {fast['R@1']:.1f}"},
                ranks, dist["method"], fast["method"]),
    ]
    hard = [r for r in rows if r["method"] == "fast distilled, hard negatives"]
    if hard:
        claims.append(_paired({"claim": "distillation with hard negatives improves fast",
                               "held": hard[0]["R@1"] > fast["R@1"],
                               "evidence": f"R@1 distilled (hard negatives) {hard[0]['R@1']:.1f} vs NCE only "
                                           f"{fast['R@1']:.1f}"},
                              ranks, hard[0]["method"], fast["method"]))
    claims.append(_recovery_claim(rows, slow, gallery_size))
    claims.append(_paired({"claim": "more visual tokens: all pyramid levels beat the fine level alone",
                           "held": slow["R@1"] > fine["R@1"],
                           "evidence": f"R@1 {slow['method']} {slow['R@1']:.1f} vs {fine['method']} {fine['R@1']:.1f}"},
                          ranks, slow["method"], fine["method"]))
    return claims


# --------------------------------------------------------------------------- outputs


def plot(rows: list[dict[str, Any]], path_prefix: Path, title: str) -> list[str]:
    """recall vs K and latency vs K (PNG); fast and slow exhaustive as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    reranked = sorted((r for r in rows if "rerank@" in r["method"]), key=lambda r: r["K"])
    if not reranked:
        return []
    fast = next(r for r in rows if r["method"].startswith(("fast distilled", "video fast (NCE")))
    slow = next(r for r in rows if "slow exhaustive" in r["method"])
    ks = [r["K"] for r in reranked]
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric, colour in (("R@1", "C0"), ("R@5", "C1"), ("R@10", "C2")):
        ax.plot(ks, [r[metric] for r in reranked], "o-", color=colour, label=f"re-ranked {metric}")
        ax.axhline(slow[metric], color=colour, ls="--", lw=1, label=f"slow exhaustive {metric}")
        ax.axhline(fast[metric], color=colour, ls=":", lw=1, label=f"fast {metric}")
    ax.set_xscale("log")
    ax.minorticks_off()  # only the measured K values as ticks
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (candidates re-ranked by the slow model)")
    ax.set_ylabel("recall (%)")
    ax.set_title(f"{title}: recall vs K")
    ax.legend(fontsize=6, ncol=3, loc="lower right")
    fig.tight_layout()
    written.append(str(path_prefix) + "_recall_vs_k.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [r["ms_per_query"] for r in reranked], "o-", label="fast + slow re-rank")
    ax.axhline(slow["ms_per_query"], color="C3", ls="--", label=f"slow exhaustive ({slow['slow_evals_per_query']:g} evals)")
    ax.axhline(fast["ms_per_query"], color="C2", ls=":", label="fast only")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the measured K values as ticks
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (candidates re-ranked by the slow model)")
    ax.set_ylabel("wall time per query (ms, amortised)")
    ax.set_title(f"{title}: latency vs K")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(str(path_prefix) + "_latency_vs_k.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def markdown(result: dict[str, Any]) -> str:
    """The tables and verdicts as Markdown (what docs/RESULTS.md holds)."""
    from thinkfast_pipelines.evaluate import format_table

    out = []
    for name in ("images", "video"):
        part = result.get(name)
        if not part:
            continue
        out.append(f"### {name}: {part['num_queries']} queries over {part['gallery_size']} test items, "
                   f"beta = {part['beta']:g}\n")
        out.append(format_table({"methods": part["rows"]}))
        out.append("")
    if result.get("claims"):
        out.append("| claim | held? | evidence |\n|---|---|---|")
        for c in result["claims"]:
            held = "yes" if c["held"] else "no"
            if c["held"] and "sign_test" in c and not c["significant"]:
                held = "yes, within noise"  # the paired sign test cannot tell it from chance (p >= 0.05)
            out.append(f"| {c['claim']} | {held} | {c['evidence']} |")
    return "\n".join(out)


# --------------------------------------------------------------------------- driver


def run_experiment(cfg: ExperimentConfig, workdir: str, video: bool = True, plots_prefix: Path | None = None,
                   out: Path | None = None, reuse: bool = False, trainer: str = "ray") -> dict[str, Any]:
    """Everything: corpora, training, β tuning, evaluation, verdicts, plots. Returns the record
    (also written to ``out`` after each part, so a long run keeps what it measured)."""
    started = time.perf_counter()
    result: dict[str, Any] = {"config": dataclasses.asdict(cfg), "workdir": workdir}
    if trainer == "ray":
        from thinkfast_pipelines.ray_utils import init_ray

        init_ray()
    corpus = os.path.join(workdir, "corpus")
    result["corpus"] = _corpus(corpus, cfg, False, reuse)
    result["trainer"] = ("thinkfast_pipelines.train (Ray Train)" if trainer == "ray"
                         else "thinkfast.training.fit (in-process)")
    runs = train_models(corpus, os.path.join(workdir, "models"), cfg, video=False, reuse=reuse, trainer=trainer)
    beta, trials = tune_beta(corpus, runs, cfg)
    rows, report = evaluate_images(corpus, runs, cfg, beta)
    result["images"] = {"rows": rows, "beta": beta, "beta_trials": trials, "gallery_size": report["gallery_size"],
                        "num_queries": report["num_queries"], "rejected": report["rejected_count"],
                        "training": {k: {kk: v[kk] for kk in ("seconds", "steps", "history")} for k, v in runs.items()}}
    result["images"]["ranks"] = report["ranks"]
    result["claims"] = check_claims(rows, report["gallery_size"], report["ranks"])
    if plots_prefix is not None:
        result["plots"] = plot(rows, plots_prefix, "images")
    _save(result, out)
    if video and cfg.video_clips > 0:
        vcorpus = os.path.join(workdir, "video_corpus")
        result["video_corpus"] = _corpus(vcorpus, cfg, True, reuse)
        vruns = train_models(vcorpus, os.path.join(workdir, "video_models"), cfg, video=True, reuse=reuse,
                             trainer=trainer)
        vrows, vreport = evaluate_video(vcorpus, vruns, cfg, beta)
        result["video"] = {"rows": vrows, "beta": beta, "gallery_size": vreport["gallery_size"],
                           "num_queries": vreport["num_queries"], "rejected": vreport["rejected_count"],
                           "training": {k: {kk: v[kk] for kk in ("seconds", "steps", "history")} for k, v in vruns.items()},
                           "ranks": vreport["ranks"]}
        result["claims"] += check_video_claims(vrows, vreport["gallery_size"], vreport["ranks"])
        if plots_prefix is not None:
            result["plots"] += plot(vrows, Path(str(plots_prefix) + "_video"), "video")
    result["seconds"] = round(time.perf_counter() - started, 1)
    _save(result, out)
    return result


def _corpus(out: str, cfg: ExperimentConfig, video: bool, reuse: bool) -> dict[str, Any]:
    """Generate the corpus, or with ``reuse`` keep the one already there (same seed and sizes)."""
    manifest = os.path.join(out, "_synth.json")
    if reuse and os.path.exists(manifest):
        with open(manifest) as f:
            done = json.load(f)
        return {"rows": done["num_rows"], "splits": done["splits"], "hard_pairs": done["hard_pairs"],
                "seconds": done["seconds"], "reused": True}
    return make_corpus(out, cfg, video)


def _save(result: dict[str, Any], out: Path | None) -> None:
    """The record as indented JSON; the per-query ranks (one int per query and method) go
    to a compact ``<out>_ranks.json`` next to it, named in the record."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    ranks = {part: result[part]["ranks"] for part in ("images", "video") if "ranks" in result.get(part, {})}
    record = {k: ({kk: vv for kk, vv in v.items() if kk != "ranks"} if k in ranks else v) for k, v in result.items()}
    if ranks:
        ranks_path = out.with_name(out.stem + "_ranks.json")
        ranks_path.write_text(json.dumps(ranks, separators=(",", ":")))
        record["ranks_file"] = ranks_path.name
    out.write_text(json.dumps(record, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset and corpus: the code path in minutes")
    parser.add_argument("--workdir", default=None, help="corpora and models go here (default runs/accuracy[_quick])")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/accuracy[_quick].json)")
    parser.add_argument("--no-video", action="store_true", help="skip the video variant")
    parser.add_argument("--images", type=int, help="override the number of generated images")
    parser.add_argument("--epochs", type=int, help="override every model's epochs")
    parser.add_argument("--max-queries", type=int, help="cap the number of test queries")
    parser.add_argument("--video-clips", type=int, help="override the number of generated clips (0: no video)")
    parser.add_argument("--workers", type=int, help="override the Ray Train workers")
    parser.add_argument("--reuse", action="store_true", help="resume: keep the corpora and finished models in --workdir")
    parser.add_argument("--trainer", choices=("ray", "inprocess"), default="ray",
                        help="ray: thinkfast_pipelines.train (default); inprocess: thinkfast.training.fit, the same "
                             "training in one process (no Ray workers to start)")
    parser.add_argument("--hard-negatives", action="store_true",
                        help="also distil with B_i from the NCE model's index neighbours (Ray trainer only)")
    args = parser.parse_args(argv)
    if args.hard_negatives and args.trainer != "ray":
        parser.error("--hard-negatives needs --trainer ray (the in-process trainer has no index-neighbour batches)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(name, value)
    cfg = QUICK if args.quick else ExperimentConfig()
    overrides: dict[str, Any] = {}
    if args.images:
        overrides["images"] = args.images
    if args.epochs:
        overrides.update(slow_epochs=args.epochs, fast_epochs=args.epochs, video_epochs=args.epochs)
    if args.max_queries:
        overrides["max_queries"] = args.max_queries
    if args.video_clips is not None:
        overrides["video_clips"] = args.video_clips
    if args.workers:
        overrides["workers"] = args.workers
    if args.hard_negatives:
        overrides["hard_negatives"] = True
    cfg = dataclasses.replace(cfg, **overrides)
    suffix = "_quick" if args.quick else ""
    workdir = args.workdir or str(REPO / "runs" / f"accuracy{suffix}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"accuracy{suffix}.json"
    result = run_experiment(cfg, workdir, video=not args.no_video, plots_prefix=RESULTS / f"accuracy{suffix}", out=out,
                            reuse=args.reuse, trainer=args.trainer)
    print(markdown(result))
    print(f"\n{result['seconds']:.0f} s in all; JSON: {out}; plots: {', '.join(result.get('plots', []))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
