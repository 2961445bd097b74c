"""The benchmark harness runs end to end in --quick mode and prints a
well-formed table.  Timings are never asserted: this machine's load decides
them."""

import os
import re
import subprocess
import sys

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
