"""The benchmark harness runs end to end in --quick mode and prints a
well-formed table.  Timings are never asserted: this machine's load decides
them."""

import os
import re
import subprocess
import sys
import types

from csd_testing import env_with_this_csd_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench_loss.py")
HEADER = ["N×V", "dtype", "w", "pass", "csd_ext ms", "eager ms", "compile ms", "vs eager", "vs compile",
          "csd_ext GB/s", "roofline", "extra MiB csd_ext / eager / compile", "grad check"]
TIME = re.compile(r"^\d+\.\d+ \(\d+\.\d+–\d+\.\d+\)$")
RATIO = re.compile(r"^\d+\.\d×$")
MEM = re.compile(r"^-?\d+\.\d / -?\d+\.\d / -?\d+\.\d$")


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
        for cell in r[4:7]:
            assert TIME.match(cell), cell
        assert RATIO.match(r[7]) and RATIO.match(r[8]), r
        assert re.match(r"^\d+(\.\d+)?$", r[9]) and re.match(r"^\d+%$", r[10]), r
        assert MEM.match(r[11]), r[11]
    assert rows[0][12].startswith("ok"), "the baselines' gradients must match csd_ext's"
    report = out.read_text()
    for section in ("## Run", "## Method", "## Results", "## Linear growth", "cpu_kernel_isa"):
        assert section in report
    assert (tmp_path / "RESULTS_time_vs_size.png").stat().st_size > 1000


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
                         "eager": {"latency_ms": {"fwd": [0.5]}}}}]
    table = report.format_latency_table({"rows": rows}).splitlines()
    assert _cells(table[0]) == ["N×V", "dtype", "w", "pass", "csd_ext ms", "eager ms", "compile ms"]
    assert _cells(table[2]) == ["8×4096", "bf16", "SS", "fwd+bwd", "0.30 (0.20–0.40)", "—", "—"]
    assert _cells(table[3]) == ["8×4096", "bf16", "SS", "fwd", "0.10 (0.10–0.10)", "0.50 (0.50–0.50)", "—"]
    assert report.format_latency_table({"rows": [{**rows[0], "results": {"csd_ext": {}}}]}) == ""
