"""``thinkfast demo``: the whole method end to end on generated data, on local Ray.

    thinkfast demo                 # small preset: minutes on 2 CPU cores
    thinkfast demo --tiny          # tiny preset (CI): the same stages in a few minutes
    thinkfast demo --keep-serving  # leave the search page up and print its URL
    thinkfast demo --real          # real photos (Debian's Tux Paint stamps) on pretrained parts

Stages (each one the project's own public function, so the demo is also their smoke
test): synth a corpus → train the slow model (L_CA) → train the fast model (L_DE) → distil
the slow model into it (L_DE + α·L_distill) → embed the corpus (fast vectors + slow
tokens) → build the sharded FAISS index → evaluate (fast vs slow vs re-ranked) → start
the Ray Serve service and answer a few example queries (printed with their top results
and per-stage timings) → stop it. Progress is printed per stage and a summary table at the
end; everything lands under ``--workdir`` (``demo_summary.json`` included).

Ray: an already-initialised Ray (a test session, a cluster) is reused and left running;
otherwise a local one is started and shut down at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from thinkfast.utils.paths import user_paths
from thinkfast.errors import ThinkfastError
from thinkfast.utils import fs
from thinkfast.utils.options import add_config_arguments, config_from_args, option

logger = logging.getLogger(__name__)

APP_NAME = "thinkfast-demo"
FREE_QUERIES = ("a red circle to the left of a blue square", "a small green triangle")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run."""

    preset: str = option("small", "model preset (tiny | small | paper)")
    images: int = option(2000, "generated images, all splits")
    captions_per_image: int = option(3, "captions per generated image")
    image_size: int = option(64, "generated image side (the preset's input size)")
    slow_epochs: int = option(12, "epochs of L_CA (val R@1 plateaus after ~5 on this corpus)")
    fast_epochs: int = option(12, "epochs of L_DE before distillation (val R@1 plateaus around 12-15)")
    distill_epochs: int = option(2, "epochs of L_DE + alpha L_distill from the fast model (B^2 teacher scores)")
    batch_size: int = option(64, "pairs per worker per step")
    distill_batch_size: int | None = option(
        None, "pairs per step while distilling (default: batch_size); the teacher scores B^2 pairs a step")
    workers: int = option(1, "Ray Train workers (on 2 cores one 2-thread worker takes twice the steps per epoch)")
    embed_actors: int = option(1, "model replicas in the embed actor pool")
    shards: int = option(2, "FAISS index shards (one Retriever deployment each)")
    rerank: tuple[int, ...] = option((5, 10, 20, 50), "K values the evaluation reports")
    serve_rerank: int = option(20, "K of the example queries sent to the service")
    max_eval_queries: int | None = option(None, "cap on evaluation queries (default: every test caption)")
    seed: int = option(0, "corpus and training seed")


# --real: the Tux Paint photos on the photo preset (pretrained EfficientNet-Lite0 and MiniLM,
# frozen, trained on cached trunk features); images / captions_per_image do not apply
REAL = DemoConfig(preset="photo", images=0, captions_per_image=1, image_size=224, slow_epochs=10, fast_epochs=6,
                  distill_epochs=2, batch_size=64, distill_batch_size=32, workers=1, shards=2, rerank=(5, 10, 20), serve_rerank=20)
REAL_QUERIES = ("a zebra", "a red apple", "a musical instrument")

TINY = DemoConfig(preset="tiny", images=64, captions_per_image=2, image_size=32, slow_epochs=1, fast_epochs=1,
                  distill_epochs=1, batch_size=16, workers=1, shards=2, rerank=(5, 10), serve_rerank=10)


@dataclass
class StageRecord:
    """One finished stage, for the progress lines and the summary table."""

    stage: str  # stage name
    seconds: float  # wall time
    detail: str  # one line on what it produced


class StageFailed(ThinkfastError):
    """A demo stage failed: names the stage and its root cause in one line."""

    exit_code = 1  # not bad input: the CLI exits 1 and names the log


class _Progress:
    """Runs the stages in order, printing ``[i/n] stage ...`` and their outcome; a failure
    becomes one :class:`StageFailed` line (the traceback goes to the log)."""

    def __init__(self, names: list[str], echo: Callable[[str], None]) -> None:
        self.names, self.echo, self.records = names, echo, []  # type: ignore[var-annotated]

    def run(self, name: str, fn: Callable[[], tuple[Any, str]]) -> Any:
        i = self.names.index(name) + 1
        self.echo(f"[{i}/{len(self.names)}] {name} ...")
        start = time.perf_counter()
        try:
            value, detail = fn()
        except (KeyboardInterrupt, StageFailed):
            raise
        except Exception as exc:
            from thinkfast_pipelines.console import failure_reason

            logger.error("stage %d/%d (%s) failed", i, len(self.names), name, exc_info=True)
            raise StageFailed(f"stage {i}/{len(self.names)} ({name}) failed: {failure_reason(exc)}") from exc
        record = StageRecord(name, time.perf_counter() - start, detail)
        self.records.append(record)
        self.echo(f"[{i}/{len(self.names)}] {name}: {detail} ({record.seconds:.1f} s)")
        return value


STAGES = ["synth", "train-slow", "train-fast", "distill", "embed", "index", "eval", "serve", "queries"]
REAL_STAGES = ["corpus", *STAGES[1:]]


def _example_queries(corpus: str, free: tuple[str, ...] = FREE_QUERIES, n: int = 3) -> list[str]:
    """A few test-split captions (their images are in the index) plus free-form queries."""
    from thinkfast.data.reader import read_table

    table = read_table(corpus, columns=["captions"], filter_split="test")
    captions = list(dict.fromkeys(caps[0] for caps in table.column("captions").to_pylist() if caps))[:n]
    return captions + list(free)  # distinct captions: stamps may share one ("A frog." twice)


def _unseen_rows(corpus: str, nce: dict[str, Any], report: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluation rows over the unseen-concept test queries (``thinkfast.evaluation.unseen``)."""
    from thinkfast.evaluation.unseen import subset_rows, unseen_mask
    from thinkfast.training.data import inspect_corpus

    mask = unseen_mask(report["queries"], inspect_corpus(corpus).train_captions)
    ranks = {**nce["ranks"], **report["ranks"]}
    return subset_rows({"methods": report["methods"], "ranks": ranks}, mask)


def _scenes(corpus: str) -> dict[str, dict[str, Any]]:
    """key -> the generated scene (what each image shows), for checking example results."""
    import json

    from thinkfast.data.reader import read_table

    table = read_table(corpus, columns=["key", "scene"])
    return {k: json.loads(s) for k, s in zip(table.column("key").to_pylist(), table.column("scene").to_pylist()) if s}


def _correct_results(query: str, keys: list[str], scenes: dict[str, dict[str, Any]]) -> int | None:
    """How many results satisfy the query (``thinkfast.evaluation.precision``); None when the
    query is outside that grammar."""
    from thinkfast.evaluation.precision import parse_query, satisfies

    constraints = parse_query(query)
    if constraints is None:
        return None
    return sum(1 for k in keys if k in scenes and satisfies(constraints, scenes[k]))


@user_paths("workdir", "stamps_dir")
def demo(
    workdir: str = "runs/demo",
    *,
    tiny: bool = False,
    real: bool = False,
    stamps_dir: str | None = None,
    keep_serving: bool = False,
    port: int = 8000,
    config: DemoConfig | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every stage under ``workdir``; returns (and writes) the summary.

    ``config`` overrides the preset sizes (``TINY`` with ``tiny=True``, ``REAL`` with
    ``real=True``). ``real``: the Tux Paint photos (``thinkfast corpus tuxpaint``, fetched
    into ``~/.cache/thinkfast``, or read from ``stamps_dir``, an unpacked copy) instead of
    a generated corpus. With ``keep_serving`` the
    service stays up (blocking until Ctrl-C) after the summary."""
    import ray

    from thinkfast_pipelines.embed import EmbedConfig, embed
    from thinkfast_pipelines.evaluate import evaluate, format_table
    from thinkfast_pipelines.index import build_index
    from thinkfast_pipelines.ray_utils import init_ray
    from thinkfast_pipelines.search import print_results, search
    from thinkfast_pipelines.serve import serve
    from thinkfast_pipelines.synth import synth
    from thinkfast_pipelines.train import distill, train_fast, train_slow

    from thinkfast_pipelines.corpus import tuxpaint_corpus

    cfg = config or (REAL if real else TINY if tiny else DemoConfig())
    os.makedirs(workdir, exist_ok=True)
    paths = {name: os.path.join(workdir, name) for name in ("corpus", "slow", "fast_nce", "fast", "emb", "index")}
    owns_ray = not ray.is_initialized()
    # 4 logical CPUs on a 2-core machine: Ray Data's read stage never starves behind the
    # embed actor pool and Train workers (STACK_NOTES pitfall 1); a joined cluster keeps its own
    init_ray(num_cpus=None if os.environ.get("RAY_ADDRESS") else max(4, os.cpu_count() or 1))
    progress = _Progress(REAL_STAGES if real else STAGES, echo)
    train = {"preset": cfg.preset, "batch_size": cfg.batch_size, "workers": cfg.workers, "seed": cfg.seed}
    started = time.perf_counter()
    url = None
    try:
        if real:
            res = progress.run("corpus", lambda: _detail(
                tuxpaint_corpus(paths["corpus"], stamps_dir=stamps_dir),
                lambda r: f"{r.num_rows} Tux Paint stamps, splits {r.splits}, rejected {r.rejected}"))
        else:
            res = progress.run("synth", lambda: _detail(
                synth(paths["corpus"], images=cfg.images, captions_per_image=cfg.captions_per_image,
                      image_size=cfg.image_size, seed=cfg.seed, overwrite=True),
                lambda r: f"{r.num_rows} images, splits {r.splits}"))
        progress.run("train-slow", lambda: _detail(
            train_slow(paths["corpus"], paths["slow"], epochs=cfg.slow_epochs, **train), _trained))
        progress.run("train-fast", lambda: _detail(
            train_fast(paths["corpus"], paths["fast_nce"], epochs=cfg.fast_epochs, **train), _trained))
        progress.run("distill", lambda: _detail(
            distill(paths["corpus"], paths["fast"], teacher=paths["slow"], init=paths["fast_nce"],
                    epochs=cfg.distill_epochs,
                    **{**train, "batch_size": cfg.distill_batch_size or cfg.batch_size}), _trained))
        progress.run("embed", lambda: _detail(
            embed(paths["corpus"], paths["emb"], paths["fast"], paths["slow"],
                  config=EmbedConfig(actors=cfg.embed_actors, progress=False)),
            lambda m: f"counts {m.get('counts', {})}"))
        progress.run("index", lambda: _detail(
            build_index(paths["emb"], paths["index"], shards=cfg.shards),
            lambda m: f"{getattr(m, 'count', '?')} vectors in {cfg.shards} shards ({getattr(m, 'factory', '?')})"))

        def run_eval() -> tuple[dict[str, Any], str]:
            nce = evaluate(paths["corpus"], paths["fast_nce"], None, rerank=[], max_queries=cfg.max_eval_queries,
                           fast_name="fast (NCE)", per_query_ranks=real)
            beta = 0.0  # generated captions use only words the slow model was trained on
            if real:  # val concepts are new words to the slow model: how much the fast score counts is chosen on val
                from thinkfast.evaluation.beta import choose_and_save_beta

                chosen = choose_and_save_beta(paths["corpus"], paths["fast"], paths["slow"], k=max(cfg.rerank))
                beta = chosen.beta  # also saved as slow/rerank_config.json: a later `thinkfast serve` uses it
                echo(f"  beta = {beta:g} (val R@1 at K={max(cfg.rerank)} for beta {chosen.r1_by_beta})")
            report = evaluate(paths["corpus"], paths["fast"], paths["slow"], index=paths["index"],
                              embeddings=paths["emb"], rerank=cfg.rerank, max_queries=cfg.max_eval_queries,
                              beta=beta, fast_name="fast distilled", per_query_ranks=real,
                              out=os.path.join(workdir, "eval.json"))
            report["methods"] = nce["methods"] + report["methods"]
            echo(format_table(report))
            if real:
                report["unseen"] = _unseen_rows(paths["corpus"], nce, report)
                if report["unseen"]:
                    echo(f"the {report['unseen'][0]['queries']} test queries none of whose words occur in a "
                         "training caption:")
                    echo(format_table({"methods": report["unseen"]}))
            best = report["methods"][-1]
            return report, f"{report['num_queries']} queries; {best['method']} R@1 {best['R@1']:.1f}"

        report = progress.run("eval", run_eval)

        def run_serve() -> tuple[str, str]:
            args = {"fast": paths["fast"], "slow": paths["slow"], "index": paths["index"],
                    "embeddings": paths["emb"], "corpus": paths["corpus"], "beta": report["beta"]}
            try:
                base = serve(args, port=port, name=APP_NAME)
            except ThinkfastError:
                raise  # bad artifacts: retrying cannot help
            except Exception as exc:  # noqa: BLE001 - Serve's HTTP proxy can die starting on a saturated machine
                echo(f"serve: the HTTP proxy failed to start ({type(exc).__name__}); retrying once")
                logger.warning("serve start failed, retrying once: %s", exc)
                base = serve(args, port=port, name=APP_NAME)
            return base, f"listening on {base}/"

        url = progress.run("serve", run_serve)

        def run_queries() -> tuple[list[dict[str, Any]], str]:
            answers = []
            scenes = {} if real else _scenes(paths["corpus"])
            for query in _example_queries(paths["corpus"], REAL_QUERIES if real else FREE_QUERIES):
                data = search(query, url, k=5, rerank=cfg.serve_rerank)
                print_results(data)
                top = [r["key"] for r in data["results"]]
                correct = _correct_results(query, top, scenes)
                if correct is not None:
                    echo(f"  {correct}/{len(top)} of these show what the query asks (checked against the scenes)")
                answers.append({"query": query, "top": top, "correct_in_top": correct,
                                "timings_ms": data["timings_ms"]})
            mean_total = sum(a["timings_ms"]["total"] for a in answers) / len(answers)
            return answers, f"{len(answers)} queries answered, mean {mean_total:.0f} ms"

        answers = progress.run("queries", run_queries)
        summary = {
            "workdir": workdir, "config": asdict(cfg), "url": url, "corpus": {"rows": res.num_rows, "splits": res.splits},
            "stages": [asdict(r) for r in progress.records], "eval": report, "queries": answers,
            "seconds": round(time.perf_counter() - started, 1),
        }
        fs.write_json(os.path.join(workdir, "demo_summary.json"), summary)
        echo(summary_table(progress.records))
        echo(f"total {summary['seconds']:.0f} s; summary in {os.path.join(workdir, 'demo_summary.json')}")
        if keep_serving:
            echo(f"search page: {url}/   (Ctrl-C to stop)")
            _wait_forever()
        return summary
    finally:
        _stop(url, owns_ray)


def _detail(value: Any, describe: Callable[[Any], str]) -> tuple[Any, str]:
    return value, describe(value)


def _trained(result: Any) -> str:
    last = result.history[-1] if result.history else {}
    loss = last.get("train_loss")
    val = last.get("val_r1")
    parts = [f"{result.steps} steps"]
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    if val is not None:
        parts.append(f"val R@1 {val:.1f}")
    return ", ".join(parts)


def summary_table(records: list[StageRecord]) -> str:
    """The end-of-run table: one line per stage with its time and outcome."""
    lines = [f"{'stage':<11} {'seconds':>8}  result", f"{'-' * 11} {'-' * 8}  {'-' * 40}"]
    lines += [f"{r.stage:<11} {r.seconds:>8.1f}  {r.detail}" for r in records]
    lines.append(f"{'total':<11} {sum(r.seconds for r in records):>8.1f}")
    return "\n".join(lines)


def _wait_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _stop(url: str | None, owns_ray: bool) -> None:
    """Delete the demo's Serve app (and Ray, if the demo started it)."""
    import ray

    if url is not None:
        try:
            from ray import serve as ray_serve

            ray_serve.delete(APP_NAME)
        except Exception as exc:  # noqa: BLE001 - best effort at shutdown
            logger.warning("could not delete the demo app: %s", exc)
    if owns_ray and ray.is_initialized():
        if url is not None:
            from ray import serve as ray_serve

            ray_serve.shutdown()
        ray.shutdown()


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="tiny preset and corpus (CI): a few minutes")
    parser.add_argument("--real", action="store_true",
                        help="real photos (Debian's Tux Paint stamps, fetched into ~/.cache/thinkfast) on the "
                             "photo preset: pretrained EfficientNet-Lite0 and MiniLM, frozen, cached trunk features")
    parser.add_argument("--workdir", default=None,
                        help="where the corpus, models, index, reports and log go (default runs/demo, "
                             "runs/demo-real with --real)")
    parser.add_argument("--stamps-dir", help="--real: an unpacked Tux Paint stamps directory instead of fetching it")
    parser.add_argument("--keep-serving", action="store_true", help="keep the search service up and print its URL")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the search service")
    parser.add_argument("--epochs", type=int, help="override the epochs of every training stage")
    sizes = parser.add_argument_group("sizes (defaults: the full demo; --tiny starts from the CI sizes)")
    add_config_arguments(sizes, DemoConfig)


def workdir_of(args: argparse.Namespace) -> str:
    """``--workdir``, else the default of the demo chosen (the two never share a directory)."""
    return args.workdir or ("runs/demo-real" if args.real else "runs/demo")


def run(args: argparse.Namespace) -> int:
    if args.tiny and args.real:
        raise ThinkfastError("--tiny and --real are two different demos; choose one")
    cfg = config_from_args(DemoConfig, args, base=REAL if args.real else TINY if args.tiny else DemoConfig())
    if args.epochs:
        cfg = replace(cfg, slow_epochs=args.epochs, fast_epochs=args.epochs, distill_epochs=args.epochs)
    if cfg.images < 20 and not args.real:
        raise ThinkfastError("--images must be at least 20 (each split needs a few images)")
    demo(workdir_of(args), tiny=args.tiny, real=args.real, stamps_dir=args.stamps_dir, keep_serving=args.keep_serving, port=args.port, config=cfg)
    return 0
