"""The analytic CUDA model's arithmetic (benchmarks/cuda_model.py), on
hand-checkable numbers; and that its committed build facts parse and give a
finite prediction for every path and shape."""

import math
import os
import re
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


def test_paths_and_the_fused_design_fallback():
    # FAKE has no `fused SS` entry: the fused row comes from the design
    # figures and is labelled planned.
    p = cm.path_times(FAKE, "H200", 512, 256000)
    both = p["two-pass fwd+bwd"]
    assert both["time"] == pytest.approx(p["forward-only"]["time"] + p["two-pass backward"]["time"])
    fused = p["fused one-read"]
    assert fused["planned"] and fused["hbm"] == pytest.approx(both["hbm"] * 6 / 10)
    # 6 B instead of 10 B per element: the fused floor is the lower one.
    assert fused["time"] < both["time"]
    assert "fused one-read (planned)" in cm.format_markdown(FAKE)


def test_committed_build_facts_give_a_prediction_everywhere():
    build = cm.load_build()
    assert {"forward SS", "backward SS"} <= set(build["kernels"])
    for w in cm.WEIGHTINGS:
        for r in cm.rows_of(build, w):
            assert 0 < r["time"] < math.inf and r["bound"]
    assert "H200" in cm.format_markdown(build) and "measured / model" in cm.measured_comparison(build)


def test_committed_build_has_the_built_fused_kernel_for_every_weighting():
    """The fused rows come from the real build (--from-build), not the design
    figures: an entry per weighting with its registers, shared memory and
    per-element loops, whose sum is the instructions per element."""
    build = cm.load_build()
    assert build["arch"] == "sm_90" and re.fullmatch(r"[0-9a-f]{64}", build["sources_sha256"])
    for w in cm.WEIGHTINGS:
        e = build["kernels"][cm.weighting_kernel("fused", w)]
        assert re.fullmatch(r"csd::gpu::csd_fused_kernel<c10::BFloat16, \d+u>", e["kernel"])
        assert cm._variant(e["kernel"]) == ("TS/MM" if w in ("TS", "MM") else w)
        # __launch_bounds__(256, 2): at most 128 registers; no spills (the CUDA build check fails on them).
        assert 0 < e["regs"] <= 128 and e["spills"] == 0 and e["smem_static"] > 0
        kinds = [lp["kind"] for lp in e["loops"]]
        for k in ("fill", "max", "sums", "grad"):
            assert kinds.count(k) == 1, (w, kinds)
        summed = [lp for lp in e["loops"] if lp["in_sum"]]
        assert sorted(lp["kind"] for lp in summed) == ["fill", "grad", "max", "sums"]
        for lp in e["loops"]:
            assert lp["elements"] == 8 and lp["elements_from"]  # 16-byte vectors of bf16
            assert 0 < lp["fast"] <= lp["instructions"]
            assert lp["per_element"] == pytest.approx(lp["fast"] / lp["elements"], abs=1e-3)
        for lp in summed:
            assert lp["elements_from"] == "sass"  # derived from the SASS's 16-byte accesses, not assumed
        assert e["ipe"] == pytest.approx(sum(lp["fast"] / lp["elements"] for lp in summed), abs=0.01)
        assert e["exps_pe"] == pytest.approx(sum(lp["ex2"] / lp["elements"] for lp in summed), abs=0.001)
        assert e["ipe_after_fill"] < e["ipe"]
        # Every exact variant exponentiates at least once per element (S or T softmax).
        assert e["exps_pe"] >= 1
    for r in cm.rows_of(build, "SS"):
        if r["path"] == "fused one-read":
            assert not r["planned"]
    assert "(planned)" not in cm.format_markdown(build)


def test_docs_model_block_matches_the_committed_build():
    """docs/kernels.md's generated block is what --write-docs renders from
    the committed JSON (rerun `cuda_model.py --write-docs` after changing either)."""
    build = cm.load_build()
    with open(cm.DOCS) as f:
        text = f.read()
    assert text.count(cm.DOCS_BEGIN) == 1 and text.count(cm.DOCS_END) == 1
    block = text.split(cm.DOCS_BEGIN, 1)[1].split(cm.DOCS_END, 1)[0].strip()
    assert block == cm.docs_block(build).strip()
    assert "fused one-read |" in block and "(planned)" not in block and "Verdict of the model" in block


def _sass(lines):
    return [(0x10 * i, t) for i, t in enumerate(lines)]


def test_fused_entry_sums_the_per_element_loops():
    """On a synthetic SASS listing: four loops (8 elements per iteration
    each, from two 16-byte accesses), the masked max left out, the cold
    blocks (scalar fill of the row's ends, FSETP selects) left out."""
    sass_loops = cm_sass_loops()
    # The fill loop, 0x10-0xa0: the exit test, the aligned/unaligned branch,
    # the scalar fill of a row's ends (cold), the two 16-byte cp.async copies.
    ins = _sass(["NOP", "ISETP.GE.AND P0, PT, R1, R2, PT", "@P0 BRA 0x1000", "@P1 BRA 0x70",
                 "LDG.E.U16 R3, desc[UR6][R4.64]", "STS.U16 [R5], R3", "BRA 0x90",
                 "LDGSTS.E.BYPASS.128 [R6], desc[UR6][R8.64]", "LDGSTS.E.BYPASS.128 [R7], desc[UR6][R10.64]",
                 "IADD3 R1, R1, 0x1, RZ", "@!P0 BRA 0x10"])
    base = 0x200

    def loop(body):
        out = [(base + 0x10 * i, t) for i, t in enumerate(body)]
        return out + [(base + 0x10 * len(body), f"@!P0 BRA 0x{base:x}")]

    mx = loop(["LDS.128 R12, [R1]", "LDS.128 R16, [R2]", "HMNMX2.BF16_V2 R3, R3, R12, PT", "IADD3 R1, R1, 0x1, RZ"])
    base = 0x400
    sums = loop(["LDS.128 R12, [R1]", "LDS.128 R16, [R2]", "MUFU.EX2 R3, R4", "FADD R5, R5, R3"])
    base = 0x600
    grad = loop(["LDS.128 R12, [R1]", "LDS.128 R16, [R2]", "MUFU.EX2 R3, R4", "STG.E.128 desc[UR6][R8.64], R12"])
    e = cm.fused_entry("csd::gpu::csd_fused_kernel<c10::BFloat16, 1u>", ins + mx + sums + grad,
                       {"regs": 76, "stores": 0, "smem": 224}, sass_loops)
    per = {lp["kind"]: lp for lp in e["loops"]}
    assert per["fill"]["fast"] == 7 and per["fill"]["elements"] == 8  # 10 less the 3 of the scalar fill (cold)
    assert [per[k]["fast"] for k in ("max", "sums", "grad")] == [5, 5, 5]
    assert e["ipe"] == pytest.approx((7 + 5 + 5 + 5) / 8)
    assert e["exps_pe"] == pytest.approx(2 / 8)
    assert e["ipe_after_fill"] == pytest.approx(10 / 8)
    assert (e["regs"], e["smem_static"]) == (76, 224)
    # A build whose fused kernel lost a loop is an error, not a smaller count.
    with pytest.raises(RuntimeError, match="expected one 'grad' loop"):
        cm.fused_entry("csd::gpu::csd_fused_kernel<c10::BFloat16, 1u>", ins + mx + sums, None, sass_loops)


def cm_sass_loops():
    import sass_loops
    return sass_loops


def test_fused_plan_follows_csd_cuda_fused_plan():
    """plan_fused's choices on an H100/H200 (docs/kernels.md's plan table)."""
    def plan(rows, vocab, elem_bytes=2):
        p = cm.fused_plan(rows, vocab, 132, elem_bytes)
        return p["cluster"], p["seg_len"], p["blocks_per_sm"]
    assert plan(2048, 32000) == (2, 16000, 3)
    assert plan(512, 50257) == (2, 25136, 2)
    assert plan(1024, 152064) == (8, 19008, 3)
    assert plan(4096, 128256) == (8, 16032, 3)
    assert plan(512, 256000) == (8, 32000, 1)
    assert plan(64, 256000) == (8, 32000, 1)
    assert plan(8, 32000) == (4, 8000, 7)       # few rows: C doubles while segments keep >= 4096
    assert plan(2048, 32000, 4) == (4, 8000, 3)
    assert not cm.fused_plan(512, 256000, 132, 4)["fits"]
    assert cm.fused_plan(2048, 32000, 132)["smem_bytes"] == 128 + 2 * (16000 // 8 + 1) * 16
