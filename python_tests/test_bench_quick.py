"""The benchmark harness runs end to end in --quick mode and prints a
well-formed table.  Timings are never asserted: this machine's load decides
them."""

import os
import re
import subprocess
import sys
import types

import pytest
import torch

from csd_testing import env_with_this_csd_ext, make_labels, make_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench_loss.py")
HEADER = ["N×V", "dtype", "w", "pass", "csd_ext ms", "paper eager ms", "paper compile ms", "lean eager ms",
          "lean compile ms", "vs best eager", "vs best compile", "csd_ext GB/s", "roofline",
          "extra MiB csd_ext / paper eager / paper compile / lean eager / lean compile", "grad check"]
TIME = re.compile(r"^\d+\.\d+ \(\d+\.\d+–\d+\.\d+\)$")
RATIO = re.compile(r"^\d+\.\d× \((paper|lean)\)$")
MEM = re.compile(r"^-?\d+\.\d( / -?\d+\.\d){4}$")


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_quick_benchmark_prints_a_well_formed_table(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--output", str(out)], capture_output=True,
                          text=True, env=env_with_this_csd_ext(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert _cells(table[0]) == HEADER
    assert set(table[1].replace("|", "")) == {"-"}
    rows = [_cells(line) for line in table[2:]]
    assert [r[3] for r in rows] == ["fwd+bwd", "fwd"]  # one configuration, both passes
    for r in rows:
        assert len(r) == len(HEADER), r
        assert r[0] == "64×4096" and r[1] == "bf16" and r[2] == "SS"
        for cell in r[4:9]:
            assert TIME.match(cell), cell
        assert RATIO.match(r[9]) and RATIO.match(r[10]), r
        assert re.match(r"^\d+(\.\d+)?$", r[11]) and re.match(r"^\d+%$", r[12]), r
        assert MEM.match(r[13]), r[13]
    assert rows[0][14].startswith("ok"), "the baselines' gradients must match csd_ext's"
    report = out.read_text()
    for section in ("## Run", "## Method", "## Results", "## Linear growth", "cpu_kernel_isa"):
        assert section in report
    assert (tmp_path / "RESULTS_time_vs_size.png").stat().st_size > 1000


def test_speedups_are_against_the_faster_formulation():
    """vs best compile divides by the faster of paper and lean (lean here)."""
    report = _import_bench("bench_report")
    res = {c: {"times_ms": {"fwdbwd": [ms]}} for c, ms in
           (("csd_ext", 10.0), ("paper_eager", 400.0), ("paper_compile", 80.0), ("lean_eager", 300.0),
            ("lean_compile", 40.0))}
    row = {"N": 8, "V": 64, "dtype": "bf16", "weighting": "SS", "results": res,
           "bytes": {"fwdbwd": 1e6, "fwd": 1e6}, "bandwidth": {"read_gbs": 10.0, "copy_gbs": 10.0}}
    args = types.SimpleNamespace(device="cpu", hbm_gbs=None)
    cells = report.table_rows({"rows": [row]}, args)[0]["cells"]
    assert cells["x_compile"] == "4.0× (lean)" and cells["x_eager"] == "30.0× (lean)"
    res["paper_compile"]["times_ms"]["fwdbwd"] = [20.0]
    cells = report.table_rows({"rows": [row]}, args)[0]["cells"]
    assert cells["x_compile"] == "2.0× (paper)"


@pytest.mark.parametrize("weighting", ["SS", "TS", "US", "MM"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_formulation_has_csd_ext_gradient(weighting, dtype):
    """The lean contender is a fair one: its gradient is csd_ext's, up to
    rounding (fp32 accumulation; in bf16 the lean g and its product with the
    token weight are each rounded to bf16, two half-ulps of 2^-8)."""
    import csd_ext

    lean = _import_bench("lean")
    for temperature in (1.0, 2.0):
        z, t = make_logits((2, 3, 257), dtype=dtype, seed=7)
        labels = make_labels((2, 3), seed=7)
        labels[0, 0] = 5  # at least one valid token
        grads = []
        for fn in (lambda a, b: lean.lean_csd(a, b, labels, weighting, 0.15, temperature),
                   lambda a, b: csd_ext.csd_loss(a, b, labels, weighting=weighting, alpha=0.15,
                                                 temperature=temperature)):
            leaf = z.detach().requires_grad_(True)
            fn(leaf, t).backward()
            grads.append(leaf.grad.double())
        ours, theirs = grads[1], grads[0]
        assert ours.abs().max() > 0
        if dtype == torch.float32:
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6 * ours.abs().max().item())
        else:
            ulp = 2.0 ** -8
            assert ((theirs - ours).abs() <= 1.5 * ulp * ours.abs() + 1e-3 * ulp * ours.abs().max()).all()


def _import_bench(name):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_timer_times_a_batch_per_call(monkeypatch):
    """A batched sample runs prepare + call `batch` times and reports the time
    per call (on CUDA this keeps the GPU queue full; the logic is the same).
    The clock is faked: 9 ms pass between its two readings."""
    worker = _import_bench("bench_worker")
    readings = iter([100.0, 100.009])
    monkeypatch.setattr(worker, "time", types.SimpleNamespace(perf_counter=lambda: next(readings)))
    calls = []
    ms = worker.Timer("cpu", batch=3)(lambda: calls.append("call"), lambda: calls.append("prepare"))
    assert calls == ["prepare", "call"] * 3
    assert abs(ms - 3.0) < 1e-9, "the time is per call, not per batch"


def test_latency_table_lists_single_call_times():
    report = _import_bench("bench_report")
    rows = [{"N": 8, "V": 4096, "dtype": "bf16", "weighting": "SS",
             "results": {"csd_ext": {"latency_ms": {"fwdbwd": [0.3, 0.2, 0.4], "fwd": [0.1]}},
                         "paper_eager": {"latency_ms": {"fwd": [0.5]}}}}]
    table = report.format_latency_table({"rows": rows}).splitlines()
    assert _cells(table[0]) == ["N×V", "dtype", "w", "pass", "csd_ext ms", "paper eager ms", "paper compile ms",
                                "lean eager ms", "lean compile ms"]
    assert _cells(table[2]) == ["8×4096", "bf16", "SS", "fwd+bwd", "0.30 (0.20–0.40)", "—", "—", "—", "—"]
    assert _cells(table[3]) == ["8×4096", "bf16", "SS", "fwd", "0.10 (0.10–0.10)", "0.50 (0.50–0.50)", "—", "—",
                                "—"]
    assert report.format_latency_table({"rows": [{**rows[0], "results": {"csd_ext": {}}}]}) == ""
