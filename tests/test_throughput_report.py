"""benchmarks/throughput.py's pure parts: the headline JSON it assembles from the section
records, and the py-spy profile summary. Nothing here is timed or starts Ray."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def tp():
    spec = importlib.util.spec_from_file_location("throughput_under_test", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_ratio_is_pipeline_over_bare_and_none_when_missing(tp):
    assert tp.ratio(30.0, 40.0) == 0.75
    assert tp.ratio(None, 40.0) is None
    assert tp.ratio(30.0, None) is None
    assert tp.ratio(30.0, 0.0) is None


def test_assemble_puts_the_five_figures_on_top(tp):
    sections = {
        "embed": {"pipeline_images_per_s": 100.0, "bare_images_per_s": 400.0, "pipeline_peak_mb": 3000.0,
                  "bare_peak_mb": 700.0},
        "train": {"ray_pairs_per_s": 24.0, "bare_pairs_per_s": 40.0},
        "shards": {"sharded_qps": 507.0, "single_qps": 1437.0},
        "serve": {"overhead_p50_ms_k10": 17.0, "qps_c8_fast_only": 40.0},
    }
    out = tp.assemble(sections, (2.5, 1.0, 0.5), (1.0, 1.0, 1.0), ["--quick"], {"cpus": 2})
    assert out["ratios"] == {"embed": 0.25, "train": 0.6, "shards": 0.353}
    assert out["serve_overhead_ms"] == 17.0 and out["serve_qps_c8"] == 40.0
    assert out["embed_peak_mb"] == 3000.0 and out["bare_peak_mb"] == 700.0
    assert out["loaded"] is True  # started at load 2.5
    assert out["load_avg_start"] == [2.5, 1.0, 0.5] and out["argv"] == ["--quick"]


def test_assemble_with_a_failed_section_keeps_the_others(tp):
    out = tp.assemble({"train": {"error": "RuntimeError: x"}, "shards": {"sharded_qps": 8.0, "single_qps": 10.0}},
                      (0.5, 0, 0), (0.5, 0, 0), [], {})
    assert out["ratios"] == {"embed": None, "train": None, "shards": 0.8}
    assert out["loaded"] is False
    assert out["sections"]["train"]["error"].startswith("RuntimeError")


def test_top_functions_self_and_total(tp, tmp_path):
    raw = tmp_path / "p.txt"
    raw.write_text(
        "process 1:\"python\";main (a/run.py:10);step (a/loop.py:5);conv (t/nn.py:7) 6\n"
        "process 1:\"python\";main (a/run.py:10);step (a/loop.py:6);conv (t/nn.py:9) 2\n"
        "process 1:\"python\";main (a/run.py:11);decode (b/img.py:3) 2\n"
        "garbage line without a count\n"
    )
    top = tp.top_functions(raw, n=3)
    assert top["samples"] == 10
    assert top["self"] == [("conv (nn.py)", 80.0), ("decode (img.py)", 20.0)]
    total = dict(top["total"])
    assert total["main (run.py)"] == 100.0  # once per sample though it is on every stack
    assert len(top["total"]) == 3
    assert top["processes"] == [("python", 100.0)]
