"""Run every benchmark of the project in one go and put their JSON side by side.

Each issue's benchmark is its own script under ``benchmarks/`` that prints a table and
writes JSON under ``benchmarks/results/``. This entry point runs them one after the other
in fresh subprocesses (so one script's Ray or memory cannot skew the next), with
``--quick`` when asked (minutes in all) or without it (the full table), and collects:
the exit status, the wall time, the tail of the output, and every JSON file the script
wrote or updated. The combined record goes to ``benchmarks/results/run_all[_quick].json``.

A benchmark that is missing or fails is recorded as such (never hidden) and the rest
still run; the exit status is non-zero when any failed.

    python benchmarks/run_all.py --quick
    python benchmarks/run_all.py --only index_bench serve_bench
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"

# (script stem, what it measures); run in this order (cheap first)
BENCHMARKS: tuple[tuple[str, str], ...] = (
    ("synth_bench", "generated corpus: images per second"),
    ("model_cost", "slow vs fast per-pair cost (small preset)"),
    ("index_bench", "FAISS shards: build time, recall, queries per second"),
    ("embed_bench", "Ray Data embedding throughput vs a bare torch loop"),
    ("train_bench", "Ray Train steps per second (1, 2 workers) vs a bare loop"),
    ("serve_bench", "Serve latency p50/p95/p99 and QPS, autoscaling"),
    ("accuracy", "the paper's experiment: R@K and cost per query"),
)

# environment every benchmark subprocess gets (quiet, offline, reproducible Ray)
BENCH_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_DEDUP_LOGS": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
}


@dataclass(frozen=True)
class BenchOutcome:
    """What one benchmark script did."""

    name: str  # script stem
    status: str  # "ok" | "failed" | "missing" | "timeout"
    returncode: int | None  # process exit status (None when it never ran or timed out)
    seconds: float  # wall time of the subprocess
    json_files: dict[str, object]  # results/<file>.json it wrote -> parsed content
    output_tail: str  # last lines of stdout+stderr (the printed table, or the error)


def _json_snapshot() -> dict[str, float]:
    """mtime of every JSON under results/, to see which ones a script writes."""
    if not RESULTS.exists():
        return {}
    return {str(p): p.stat().st_mtime for p in RESULTS.rglob("*.json")}


def run_one(name: str, quick: bool, timeout_s: float, extra: list[str]) -> BenchOutcome:
    """Run ``benchmarks/<name>.py`` in a subprocess and collect the JSON it writes."""
    script = BENCH_DIR / f"{name}.py"
    if not script.exists():
        logger.warning("%s: %s does not exist", name, script)
        return BenchOutcome(name, "missing", None, 0.0, {}, f"{script} not found")
    cmd = [sys.executable, str(script), *(["--quick"] if quick else []), *extra]
    before = _json_snapshot()
    env = {**os.environ, **BENCH_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    logger.info("running %s", " ".join(cmd))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        status = "ok" if proc.returncode == 0 else "failed"
        returncode: int | None = proc.returncode
        output = (proc.stdout or "") + (proc.stderr or "")
    except subprocess.TimeoutExpired as exc:
        status, returncode = "timeout", None
        output = _text(exc.stdout) + _text(exc.stderr) + f"\n[timed out after {timeout_s:.0f} s]"
    seconds = time.perf_counter() - start
    after = _json_snapshot()
    written = sorted(p for p, mtime in after.items() if before.get(p) != mtime and not p.endswith("run_all.json") and "run_all_" not in p)
    files: dict[str, object] = {}
    for path in written:
        try:
            files[os.path.relpath(path, REPO)] = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            files[os.path.relpath(path, REPO)] = {"unreadable": str(exc)}
    tail = "\n".join(output.strip().splitlines()[-40:])
    logger.info("%s: %s in %.1f s, wrote %d JSON file(s)", name, status, seconds, len(files))
    return BenchOutcome(name, status, returncode, seconds, files, tail)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def run_all(
    quick: bool = True,
    only: list[str] | None = None,
    skip: list[str] | None = None,
    timeout_s: float = 1800.0,
    out: str | None = None,
) -> dict[str, object]:
    """Run the selected benchmarks; return (and write) the combined record."""
    names = [n for n, _ in BENCHMARKS]
    unknown = sorted(set(only or []) - set(names)) + sorted(set(skip or []) - set(names))
    if unknown:
        raise SystemExit(f"run_all: unknown benchmark(s) {unknown}; known: {names}")
    selected = [n for n in names if (not only or n in only) and n not in (skip or [])]
    outcomes = [run_one(n, quick, timeout_s, []) for n in selected]
    record = {
        "quick": quick,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "benchmarks": {
            o.name: {
                "status": o.status,
                "returncode": o.returncode,
                "seconds": round(o.seconds, 2),
                "json": o.json_files,
                "output_tail": o.output_tail,
            }
            for o in outcomes
        },
    }
    target = Path(out) if out else RESULTS / ("run_all_quick.json" if quick else "run_all.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    print(f"\n{'benchmark':<14} {'status':<8} {'seconds':>8}  json written")
    for o in outcomes:
        print(f"{o.name:<14} {o.status:<8} {o.seconds:>8.1f}  {', '.join(o.json_files) or '-'}")
    print(f"\ncombined record: {target}")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: minutes in all (passed to each script)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--skip", nargs="+", metavar="NAME", help="skip these benchmarks")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per benchmark")
    parser.add_argument("--out", help="combined JSON path (default benchmarks/results/run_all[_quick].json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = run_all(args.quick, args.only, args.skip, args.timeout, args.out)
    failed = [n for n, r in record["benchmarks"].items() if r["status"] != "ok"]  # type: ignore[union-attr]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
