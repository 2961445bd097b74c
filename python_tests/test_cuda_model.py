"""The analytic CUDA model's arithmetic (benchmarks/cuda_model.py), on
hand-checkable numbers; and that its committed build facts parse and give a
finite prediction for every path and shape."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import cuda_model as cm  # noqa: E402


def test_blocks_per_sm_from_registers():
    assert cm.blocks_per_sm(128) == 2      # 65536 / (128 * 256)
    assert cm.blocks_per_sm(114) == 2      # rounded up to 120 per thread
    assert cm.blocks_per_sm(80) == 3
    assert cm.blocks_per_sm(64) == 4
    assert cm.blocks_per_sm(32) == 8       # the 2048-thread limit, not the registers
    assert cm.blocks_per_sm(32, smem_bytes=100 * 1024) == 2


def test_floors():
    g = cm.GPUS["H200"]
    bw = g["hbm_gbs"] * cm.COPY_FRACTION * 1e3  # bytes per µs
    n = 1 << 26
    # Plenty in flight, cheap instructions, whole waves: the HBM floor.
    t = cm.kernel_time_us("H200", elements=n, read_bytes=4 * n, write_bytes=2 * n, ipe=1, exps_pe=0.1,
                          inflight_per_sm=1 << 20, blocks=132 * 4 * 10, slots_per_sm=4, launches=0)
    assert t["bound"] == "hbm" and t["time"] == pytest.approx(6 * n / bw)
    assert t["waves"] == pytest.approx(t["hbm"])
    # Little's law: 16 KB per SM in flight at 700 ns carries 132 * 16 KB / 0.7 µs.
    t = cm.kernel_time_us("H200", elements=n, read_bytes=4 * n, write_bytes=0, ipe=1, exps_pe=0,
                          inflight_per_sm=16 * 1024, blocks=132, slots_per_sm=1, launches=0)
    assert t["latency"] == pytest.approx(4 * n / (132 * 16 * 1024 / 0.7)) and t["bound"] == "latency"
    # Issue: 100 instructions per element on 132 SMs x 128 lanes x 1980 per µs.
    t = cm.kernel_time_us("H200", elements=n, read_bytes=n, write_bytes=0, ipe=100, exps_pe=0,
                          inflight_per_sm=1 << 20, blocks=132, slots_per_sm=1, launches=0)
    assert t["issue"] == pytest.approx(n * 100 / (132 * 128 * 1980)) and t["bound"] == "issue"
    # The special-function unit: 16 exps per SM per clock.
    t = cm.kernel_time_us("H200", elements=n, read_bytes=n, write_bytes=0, ipe=1, exps_pe=20,
                          inflight_per_sm=1 << 20, blocks=132, slots_per_sm=1, launches=0)
    assert t["issue"] == pytest.approx(n * 20 / (132 * 16 * 1980))
    # One block more than a wave costs a second wave; each launch adds LAUNCH_US.
    t = cm.kernel_time_us("H200", elements=n, read_bytes=4 * n, write_bytes=0, ipe=1, exps_pe=0,
                          inflight_per_sm=1 << 20, blocks=133, slots_per_sm=1, launches=3)
    assert t["waves"] == pytest.approx(t["hbm"] * 2 / (133 / 132) + 3 * cm.LAUNCH_US)
    assert t["bound"] == "waves"


def test_launch_plans_follow_csd_cuda_plan():
    assert cm.forward_plan(8, 4096, 132) == (1, 1, 1)                  # a warp per row
    assert cm.forward_plan(1024, 152064, 132) == (1024, 1, 1)          # a block per row
    blocks, segs, launches = cm.forward_plan(64, 256000, 132)          # split rows + the merge kernel
    assert (segs, launches) == (17, 2) and blocks == 64 * 17
    assert cm.backward_plan(512, 50257) == 512 * math.ceil(50257 / 16384)


FAKE = {"kernels": {k: {"regs": r, "ipe": i, "exps_pe": e, "step": 16}
                    for k, r, i, e in (("forward SS", 112, 25, 1.1), ("backward SS", 78, 21, 1.0))}}


def test_paths_and_the_fused_design():
    p = cm.path_times(FAKE, "H200", 512, 256000)
    both = p["two-pass fwd+bwd"]
    assert both["time"] == pytest.approx(p["forward-only"]["time"] + p["two-pass backward"]["time"])
    fused = p["fused one-read"]
    assert fused["planned"] and fused["hbm"] == pytest.approx(both["hbm"] * 6 / 10)
    # 6 B instead of 10 B per element: the fused floor is the lower one.
    assert fused["time"] < both["time"]


def test_committed_build_facts_give_a_prediction_everywhere():
    build = cm.load_build()
    assert {"forward SS", "backward SS"} <= set(build["kernels"])
    for r in cm.rows_of(build):
        assert 0 < r["time"] < math.inf and r["bound"]
    assert "H200" in cm.format_markdown(build) and "measured / model" in cm.measured_comparison(build)


def test_fused_rows_on_chip_layout():
    assert cm.fused_layout(32000, 132) == (1, 1, 132)      # 128 KB of z and t: one block per SM
    assert cm.fused_layout(16000, 132) == (1, 3, 132)      # 64 KB + scratch: three fit in 228 KB
    assert cm.fused_layout(128256, 132) == (4, 1, 132)     # 513 KB over a cluster of 4
    assert cm.fused_layout(256000, 132) == (8, 1, 128)     # 1 MB over 8; 16 clusters use 128 SMs
