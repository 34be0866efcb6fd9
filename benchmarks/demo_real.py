"""``thinkfast demo --real`` as a user runs it, timed and checked: the heavy end-to-end variant
the test suite cannot afford (it trains three models on 224 px pretrained towers and starts
the service; minutes on 2 cores).

    python benchmarks/demo_real.py                    # into runs/demo-real-bench
    python benchmarks/demo_real.py --workdir /tmp/x

Runs the command line in a subprocess (``.venv/bin/thinkfast`` next to this interpreter),
then checks what the demo promises: every stage ran, the evaluation has every row (and the
unseen-concept rows), the example photo queries were answered, and ``fast/``, ``slow/`` and
``fast_nce/`` load as models. Prints the stage table and writes
``benchmarks/results/demo_real.json`` with the load average at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"


def check(workdir: Path) -> list[str]:
    """What is wrong with a finished demo --real workdir (empty when nothing is)."""
    from thinkfast.models.fast import FastModel
    from thinkfast.models.slow import SlowModel
    from thinkfast_pipelines.demo import REAL_QUERIES, REAL_STAGES

    summary = json.loads((workdir / "demo_summary.json").read_text())
    problems = []
    if [s["stage"] for s in summary["stages"]] != REAL_STAGES:
        problems.append(f"stages {[s['stage'] for s in summary['stages']]}")
    methods = [m["method"] for m in summary["eval"]["methods"]]
    if methods[:3] != ["fast (NCE)", "fast distilled", "slow"] or not any("rerank@" in m for m in methods):
        problems.append(f"evaluation rows {methods}")
    if not summary["eval"].get("unseen"):
        problems.append("no unseen-concept rows")
    asked = {a["query"]: a for a in summary["queries"]}
    if not set(REAL_QUERIES) <= set(asked) or not all(a["top"] for a in asked.values()):
        problems.append("example queries unanswered")
    for name in ("fast", "fast_nce"):
        if FastModel.from_pretrained(str(workdir / name)).config.vision.backbone != "efficientnet_lite0":
            problems.append(f"{name} is not the photo preset")
    if SlowModel.from_pretrained(str(workdir / "slow")).config.vision.frozen_stages != 4:
        problems.append("slow is not the photo preset")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo-real-bench")
    parser.add_argument("--out", default=str(RESULTS / "demo_real.json"))
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    exe = Path(sys.executable).with_name("thinkfast")
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run([str(exe), "demo", "--real", "--workdir", str(workdir)], text=True, capture_output=True)
    seconds = time.perf_counter() - started
    print(proc.stdout[-6000:])
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    problems = check(workdir)
    summary = json.loads((workdir / "demo_summary.json").read_text())
    result = {"seconds": round(seconds, 1), "stages": summary["stages"], "eval": summary["eval"]["methods"],
              "unseen": summary["eval"].get("unseen"), "beta": summary["eval"]["beta"], "problems": problems,
              "terminal_lines": len(proc.stdout.splitlines()),
              "stderr": proc.stderr.splitlines()[-20:],  # what a user's terminal shows besides stdout
              "load_average": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"demo --real: {seconds:.0f} s, load average {result['load_average']}; problems: {problems or 'none'}")
    print(f"wrote {args.out}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
