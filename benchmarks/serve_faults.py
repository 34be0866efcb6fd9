"""Fault injection against the search service: SIGKILL a replica under a bounded load loop
and count what the clients saw.

A few client threads send ``POST /search`` back to back; after a warm-up one replica of
a stage (a retriever, the re-ranker, ...) is SIGKILLed, the load goes on, and every answer
is recorded with its status, latency and ``Retry-After``. The numbers that matter:

* failures when another replica of the killed stage exists (the target is 0: the
  ingress retries an idempotent stage call on another replica),
* the slowest answer (no request may wait past ``limits.request_timeout_s``),
* with a single replica: only 503s with ``Retry-After`` (never a 500 or a hang) until
  Serve has restarted it, and how long that took.

``tests/test_serve_faults.py`` runs short trials of this harness in CI; this script runs
longer, parameterised ones and prints a table:

    python benchmarks/serve_faults.py                        # every scenario, 3 trials each
    python benchmarks/serve_faults.py --trials 5 --after 15  # longer
    python benchmarks/serve_faults.py --scenario rerank-2

Writes ``benchmarks/results/serve_faults.json`` (with the load average at start and end:
on a small shared machine the numbers depend on it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("serve_faults")

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Artifacts:
    corpus: str
    fast: str
    slow: str
    embeddings: str
    index: str
    captions: list[str]  # one per item, used as queries


def build_artifacts(root: str, images: int = 16) -> Artifacts:
    """A tiny corpus, untrained tiny models, embeddings and a one-shard index, made by the
    real pipeline (needs a running Ray). One shard, so "another replica of the retriever"
    means another replica of the same shard."""
    import torch

    from thinkfast import FastModel, SlowModel
    from thinkfast.data.reader import read_table
    from thinkfast.data.tokenizer import WordTokenizer
    from thinkfast_pipelines.embed import EmbedConfig, embed
    from thinkfast_pipelines.index import build_index
    from thinkfast_pipelines.synth import synth

    corpus, emb, index = (os.path.join(root, name) for name in ("corpus", "emb", "index"))
    fast, slow = os.path.join(root, "fast"), os.path.join(root, "slow")
    if not os.path.exists(os.path.join(index, "manifest.json")):
        synth(corpus, images=images, captions_per_image=2, image_size=32, seed=11, image_format="png", workers=1)
        table = read_table(corpus, columns=["captions"])
        tokenizer = WordTokenizer.build([c for caps in table.column("captions").to_pylist() for c in caps])
        torch.manual_seed(0)
        FastModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(fast)
        SlowModel.from_preset("tiny", tokenizer=tokenizer).save_pretrained(slow)
        embed(corpus, emb, fast=fast, slow=slow, config=EmbedConfig(batch_size=16, progress=False))
        build_index(emb, index, shards=1, factory="Flat")
    captions = [caps[0] for caps in read_table(corpus, columns=["captions"]).column("captions").to_pylist()]
    return Artifacts(corpus, fast, slow, emb, index, captions)


def service_args(
    art: Artifacts, replicas: int = 2, limits: dict[str, Any] | None = None, ingress: dict[str, Any] | None = None
) -> dict[str, Any]:
    """ServeArgs for a small service whose retriever and re-ranker have ``replicas`` replicas
    each (0.1 CPU per replica, so it fits beside the tests' other Ray work)."""
    return {
        "fast": art.fast, "slow": art.slow, "index": art.index, "embeddings": art.embeddings, "corpus": art.corpus,
        "ingress": {"num_cpus": 0.1, **(ingress or {})},
        "encoder": {"num_cpus": 0.1},
        "retriever": {"num_cpus": 0.1, "num_replicas": replicas},
        "catalog": {"num_cpus": 0.1},
        "reranker": {"num_cpus": 0.1, "min_replicas": replicas, "max_replicas": replicas, "max_batch_size": 4,
                     "batch_wait_timeout_s": 0.01, "max_ongoing_requests": 16},
        **({"limits": limits} if limits else {}),
    }


def replica_pids(app: str, deployment: str) -> list[int]:
    """Process ids of the live replicas of ``deployment`` in ``app``, from the GCS actor
    table (works without the dashboard, which the tests do not start)."""
    from ray._private import state

    wanted = f"ServeReplica:{app}:{deployment}"
    return sorted(
        int(a["Pid"]) for a in state.actors().values()
        if a["ActorClassName"] == wanted and a["State"] == "ALIVE" and a["Pid"]
    )


def running_replicas(app: str, deployment: str) -> int:
    """Replicas Serve reports RUNNING for ``deployment`` (what routing uses)."""
    from ray import serve

    try:
        status = serve.status().applications[app].deployments[deployment]
    except KeyError:
        return 0
    return int(status.replica_states.get("RUNNING", 0))


@dataclass
class Answer:
    sent: float  # seconds since the kill (negative: before it)
    latency_s: float
    status: int | None  # None: no HTTP answer before the client's timeout, or a dropped connection
    retry_after: str | None
    detail: str = ""


@dataclass
class Trial:
    scenario: str
    deployment: str
    replicas: int
    clients: int
    answers: list[Answer] = field(default_factory=list)
    killed_pid: int = 0
    recovered_s: float | None = None  # kill -> Serve reports every replica RUNNING again
    first_ok_after_kill_s: float | None = None  # kill -> the first 200 to a request sent after it

    def summary(self) -> dict[str, Any]:
        after = [a for a in self.answers if a.sent >= 0]
        codes: dict[str, int] = {}
        for a in self.answers:
            codes[str(a.status)] = codes.get(str(a.status), 0) + 1
        return {
            "scenario": self.scenario,
            "deployment": self.deployment,
            "replicas": self.replicas,
            "clients": self.clients,
            "requests": len(self.answers),
            "ok": sum(a.status == 200 for a in self.answers),
            "failed": sum(a.status != 200 for a in self.answers),
            "status_counts": codes,
            "no_answer": sum(a.status is None for a in self.answers),
            "server_errors_5xx_not_503": sum(a.status is not None and a.status >= 500 and a.status != 503
                                             for a in self.answers),
            "503_without_retry_after": sum(a.status == 503 and not a.retry_after for a in self.answers),
            "max_latency_s": round(max((a.latency_s for a in self.answers), default=0.0), 3),
            "max_latency_after_kill_s": round(max((a.latency_s for a in after), default=0.0), 3),
            "recovered_s": None if self.recovered_s is None else round(self.recovered_s, 2),
            "first_ok_after_kill_s": None if self.first_ok_after_kill_s is None else round(self.first_ok_after_kill_s, 2),
            "details": sorted({a.detail for a in self.answers if a.detail})[:5],
        }


def _client(url: str, queries: list[str], stop: threading.Event, out: list[Answer], t_kill: list[float],
            client_timeout_s: float, offset: int, rerank: int) -> None:
    import requests

    session = requests.Session()
    n = offset
    while not stop.is_set():
        query = queries[n % len(queries)]
        n += 1
        t0 = time.monotonic()
        status, retry_after, detail = None, None, ""
        try:
            resp = session.post(url + "/search", json={"query": query, "k": 3, "rerank": rerank},
                                timeout=client_timeout_s)
            status, retry_after = resp.status_code, resp.headers.get("Retry-After")
            if status != 200:
                try:
                    detail = str(resp.json().get("detail", ""))[:200]
                except ValueError:
                    detail = resp.text[:200]
        except requests.RequestException as exc:
            detail = type(exc).__name__
        t1 = time.monotonic()
        base = t_kill[0] if t_kill else float("inf")
        out.append(Answer(sent=t0 - base, latency_s=t1 - t0, status=status, retry_after=retry_after, detail=detail))
        if status == 503:
            time.sleep(0.05)  # a polite client would wait Retry-After; keep the loop bounded but busy


def kill_trial(url: str, app: str, deployment: str, queries: list[str], *, scenario: str = "", replicas: int = 2,
               clients: int = 4, warmup_s: float = 1.5, after_s: float = 6.0, recover_within_s: float = 45.0,
               client_timeout_s: float = 30.0, rerank: int = 8, freeze_s: float = 1.0, mode: str = "kill",
               wait_recovery: bool = True) -> Trial:
    """Load ``url`` with ``clients`` threads, SIGKILL one replica of ``deployment`` after
    ``warmup_s``, keep loading for ``after_s`` (longer, up to ``recover_within_s``, until a
    request sent after the kill is answered 200), then wait for Serve to report the
    deployment's ``replicas`` RUNNING again.

    With ``freeze_s`` > 0 the replica is first stopped (SIGSTOP) for that long, then
    killed: on these tiny models a stage call lasts milliseconds, so a bare SIGKILL rarely
    finds a request in flight, while a real replica dying under load (an OOM kill, a node
    lost) has requests on it. Frozen, it still holds the calls routed to it, which then
    die with it, as in the issue's measurement.

    ``mode="hang"`` only stops the replica (SIGSTOP) and leaves it so: a replica that hangs
    (a wedged process, a lost node) without dying. Serve's health check has to find and
    replace it; until then its calls never answer.

    ``wait_recovery=False`` returns when the load ends (``recovered_s`` stays None): a
    short test need not wait for the restart of a stage that had a twin."""
    if mode not in ("kill", "hang"):
        raise ValueError(f"mode must be kill or hang, not {mode!r}")
    trial = Trial(scenario or deployment, deployment, replicas, clients)
    pids = replica_pids(app, deployment)
    if len(pids) != replicas:
        raise RuntimeError(f"{deployment}: {len(pids)} live replicas, expected {replicas}")
    stop = threading.Event()
    t_kill: list[float] = []
    threads = [threading.Thread(target=_client, args=(url, queries, stop, trial.answers, t_kill, client_timeout_s, i,
                                                      rerank), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    trial.killed_pid = pids[0]
    t_kill.append(time.monotonic())
    if mode == "hang":
        os.kill(pids[0], signal.SIGSTOP)
    else:
        if freeze_s > 0:
            os.kill(pids[0], signal.SIGSTOP)
            time.sleep(freeze_s)
        os.kill(pids[0], signal.SIGKILL)
    # answers sent before the kill carry sent = -inf (no kill time yet): set to -1 below
    deadline = t_kill[0] + recover_within_s
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = time.monotonic()
        ok_after = [a for a in list(trial.answers) if a.status == 200 and 0 <= a.sent]
        if now - t_kill[0] >= after_s and ok_after:
            break
    stop.set()
    for t in threads:
        t.join(timeout=client_timeout_s + 5)
    for a in trial.answers:
        if a.sent == float("-inf"):
            a.sent = -1.0
    ok_after = [a for a in trial.answers if a.status == 200 and a.sent >= 0]
    if ok_after:
        trial.first_ok_after_kill_s = min(a.sent + a.latency_s for a in ok_after)
    try:
        if wait_recovery:
            _wait_recovered(trial, app, deployment, replicas, t_kill[0], deadline)
    finally:
        if mode == "hang" and trial.killed_pid in replica_pids(app, deployment):
            os.kill(trial.killed_pid, signal.SIGKILL)  # never leave a stopped process behind
    return trial


def _wait_recovered(trial: Trial, app: str, deployment: str, replicas: int, t_kill: float, deadline: float) -> None:
    while time.monotonic() < deadline:
        pids_now = replica_pids(app, deployment)
        if len(pids_now) >= replicas and trial.killed_pid not in pids_now and running_replicas(app, deployment) >= replicas:
            trial.recovered_s = time.monotonic() - t_kill
            return
        time.sleep(0.25)


def flood(url: str, queries: list[str], concurrent: int, timeout_s: float = 30.0, rerank: int = 8) -> list[Answer]:
    """``concurrent`` requests at once (one thread each, released together): what a
    bounded queue answers is a quick 503 with Retry-After, not a growing wait."""
    import requests

    barrier = threading.Barrier(concurrent)
    out: list[Answer] = []

    def one(i: int) -> None:
        barrier.wait()
        t0 = time.monotonic()
        try:
            resp = requests.post(url + "/search", json={"query": queries[i % len(queries)], "k": 3, "rerank": rerank},
                                 timeout=timeout_s)
            answer = Answer(0.0, time.monotonic() - t0, resp.status_code, resp.headers.get("Retry-After"),
                            "" if resp.status_code == 200 else resp.text[:200])
        except requests.RequestException as exc:
            answer = Answer(0.0, time.monotonic() - t0, None, None, type(exc).__name__)
        out.append(answer)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s + 5)
    return out


SCENARIOS = {
    # name: (deployment, replicas of the retriever and the re-ranker, replicas of the victim, kill or hang)
    "retriever-2": ("Retriever_0", 2, 2, "kill"),
    "rerank-2": ("Reranker", 2, 2, "kill"),
    "retriever-2-hang": ("Retriever_0", 2, 2, "hang"),
    "rerank-2-hang": ("Reranker", 2, 2, "hang"),
    "encoder-1": ("TextEncoder", 2, 1, "kill"),  # the encoder always has one replica here
    "retriever-1": ("Retriever_0", 1, 1, "kill"),
    "rerank-1": ("Reranker", 1, 1, "kill"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="default: all")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--after", type=float, default=8.0, help="seconds of load after each kill")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--freeze", type=float, default=1.0, help="seconds the replica is SIGSTOPped before SIGKILL")
    parser.add_argument("--limits", type=json.loads, default=None,
                        help='ServeArgs.limits as JSON, e.g. {"request_timeout_s": 8}; default: ServeArgs\' defaults')
    parser.add_argument("--workdir", default=None, help="keep artifacts here (reused when present)")
    parser.add_argument("--out", default=str(RESULTS / "serve_faults.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import ray
    from ray import serve as ray_serve

    from thinkfast_pipelines.serve import serve

    load_start = os.getloadavg()
    workdir = args.workdir or tempfile.mkdtemp(prefix="serve_faults_")
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024 * 1024)
    art = build_artifacts(workdir, images=args.images)
    rows: list[dict[str, Any]] = []
    try:
        by_replicas: dict[int, list[str]] = {}
        for name in args.scenario or list(SCENARIOS):
            by_replicas.setdefault(SCENARIOS[name][1], []).append(name)
        for replicas, names in sorted(by_replicas.items(), reverse=True):
            app = f"faults-{replicas}"
            url = serve(service_args(art, replicas, limits=args.limits), host="127.0.0.1", port=8123, name=app)
            for name in names:
                deployment, _, victims, mode = SCENARIOS[name]
                for i in range(args.trials):
                    trial = kill_trial(url, app, deployment, art.captions, scenario=name, replicas=victims,
                                       clients=args.clients, after_s=args.after, freeze_s=args.freeze, mode=mode)
                    row = {**trial.summary(), "trial": i}
                    rows.append(row)
                    print(json.dumps(row))
            ray_serve.delete(app)
    finally:
        ray_serve.shutdown()
        ray.shutdown()
    load_end = os.getloadavg()
    header = f"{'scenario':<13} {'trial':>5} {'req':>5} {'ok':>5} {'fail':>5} {'5xx!503':>7} {'max s':>7} {'1st ok s':>8} {'recov s':>8}"
    print(header)
    for r in rows:
        print(f"{r['scenario']:<13} {r['trial']:>5} {r['requests']:>5} {r['ok']:>5} {r['failed']:>5} "
              f"{r['server_errors_5xx_not_503']:>7} {r['max_latency_s']:>7} {str(r['first_ok_after_kill_s']):>8} "
              f"{str(r['recovered_s']):>8}")
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_start": load_start,
                          "loadavg_end": load_end}, "args": vars(args), "trials": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}; load average {load_start[0]:.2f} -> {load_end[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
