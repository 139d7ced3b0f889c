"""Every byte the graphs take (#35): the capture report's split, the dry run's plan, capture within a budget, and
close() giving it all back, for uniform runners and for the ragged (a ragged runner with the uniform decode runner in
one pool) and piecewise families. The argument checks, the reports' and ladders' arithmetic, memory_bench's command
line and the families' steps on a stand-in run on the CPU; the rest needs a GPU."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import graphrunner as gr
import graphrunner_workloads
from conftest import HAS_GPU, gpu, settle
from graphrunner.capture import outside_growth
from graphrunner.plan import _ladder, _limits, keep_sizes, size_counts, static_bytes
from graphrunner.record import SizeEntry
from graphrunner_workloads import memory_bench, piecewise, ragged
from graphrunner_workloads.decoder import Decoder, DecoderConfig
from graphrunner_workloads.memory_bench import family_model, family_runners, profile_steps, stand_in
from graphrunner_workloads.ragged import SPLIT, page_size_for, ragged_runner, random_decode_step, random_ragged_step

MiB = 1 << 20
IDS = {"ids": gr.StaticInput((), torch.long)}


def echo(ids):
    return ids * 2


def report(name="", sizes=(8, 4, 2, 1), pool=(6 * MiB, 0, 0, 0), execs=(2 * MiB, 0, 2 * MiB, 0),
           workspaces=32 * MiB, static=4096, **kw):
    return gr.CaptureReport(sizes=[gr.SizeReport(s, 1.5, p, 10, e) for s, p, e in zip(sizes, pool, execs)],
                            warmup_ms=3.0, workspace_bytes=workspaces, name=name, static_bytes=static, **kw)


def plan(bytes_=100 * MiB, ladder=None, name="", sizes=(8, 4, 2, 1)):
    return gr.CapturePlan(bytes_, [report(name, sizes)], ladder if ladder is not None else
                          {1: 40 * MiB, 2: 44 * MiB, 4: 60 * MiB, 8: bytes_})


# -- CPU: reports ---------------------------------------------------------------------------------------------


def test_report_counts_every_byte_and_says_so_in_one_line():
    r = report(driver_bytes=45 * MiB, outside_bytes=5 * MiB)
    assert r.pool_bytes == 6 * MiB and r.exec_bytes == 4 * MiB and r.graphs == 4
    assert r.bytes == 6 * MiB + 4 * MiB + 32 * MiB + 4096
    line = r.summary()
    assert line.startswith("captured 4 graphs in 0.01 s (warm-up 3 ms), took 42.0 MiB (pool 6.0, executables 4.0, "
                           "workspaces kept 32.0, static inputs 0.0)"), line
    assert "exec MiB" in str(r) and str(r).endswith(line)
    d = json.loads(r.to_json())
    assert d["bytes"] == r.bytes and d["exec_bytes"] == 4 * MiB and d["sizes"][0]["exec_bytes"] == 2 * MiB
    assert d["driver_bytes"] == 45 * MiB and d["outside_bytes"] == 5 * MiB


def test_piecewise_sizes_count_their_graphs():
    r = gr.CaptureReport(sizes=[gr.SizeReport(4, 1.0, 0, 30, MiB, graphs=3), gr.SizeReport(2, 1.0, 0, 30, 0, 3)])
    assert r.summary().startswith("captured 6 graphs (2 sizes) in")


def test_shared_segments_report_executables_nodes_and_bytes_with_and_without_sharing():
    """Size 4's five segments run on two executables (segment 0's and one its four layers share); size 2's on two,
    segment 0's own and size 4's shared one: three executables for ten graphs. Shared graphs add no bytes."""
    r = gr.CaptureReport(sizes=[gr.SizeReport(4, 1.0, 0, 50, 2 * MiB, graphs=5, executables=2, instantiated=2,
                                              exec_nodes=20),
                                gr.SizeReport(2, 1.0, 0, 50, 0, graphs=5, executables=2, instantiated=1,
                                              exec_nodes=10)])
    assert (r.graphs, r.executables, r.num_nodes, r.exec_nodes) == (10, 3, 100, 30)
    assert r.exec_bytes == 2 * MiB and r.unshared_exec_bytes == 2 * MiB * 100 // 30
    assert r.bytes == 2 * MiB
    line = r.summary()
    assert line.startswith("captured 10 graphs (2 sizes) in 0.00 s (warm-up 0 ms) on 3 executables of 30 nodes, 2.0 "
                           "MiB (segments of one structure share one; unshared: 10 executables of 100 nodes, about "
                           "6.7 MiB), took 2.0 MiB"), line
    assert str(r).splitlines()[0].split()[-2:] == ["graphs", "execs"] and str(r).splitlines()[1].split()[-2:] == \
        ["5", "2"]
    d = json.loads(r.to_json())
    assert (d["graphs"], d["executables"], d["num_nodes"], d["exec_nodes"]) == (10, 3, 100, 30)
    assert d["sizes"][1]["instantiated"] == 1 and d["sizes"][1]["executables"] == 2
    pool = gr.PoolReport([r, report("draft")])
    assert pool.executables == 3 + 4 and pool.graphs == 10 + 4 and pool.num_nodes == 140
    assert " on 7 executables of 70 nodes" in pool.summary() and json.loads(json.dumps(pool.to_dict()))
    # Without sharing the figures are the graphs' and nothing is added to the line.
    assert report().executables == report().graphs == 4 and " executables of " not in report().summary()


def test_pool_report_counts_the_shared_workspaces_once():
    verify = report("verify", shared_workspaces=True, driver_bytes=90 * MiB, outside_bytes=9 * MiB)
    draft = report("draft", pool=(2 * MiB, 0, 0, 0), shared_workspaces=True, driver_bytes=90 * MiB,
                   outside_bytes=9 * MiB)
    pool = gr.PoolReport([verify, draft])
    assert pool.workspace_bytes == 32 * MiB and pool.pool_bytes == 8 * MiB and pool.exec_bytes == 8 * MiB
    assert pool.bytes == 8 * MiB + 8 * MiB + 32 * MiB + 2 * 4096 < verify.bytes + draft.bytes
    line = pool.summary()
    assert line.startswith("pool of 'verify', 'draft': captured 8 graphs in 0.01 s, took 48.0 MiB (pool 8.0, "
                           "executables 8.0, workspaces kept 32.0, static inputs 0.0); the driver's free memory "
                           "fell 90.0 MiB, 9.0 of it outside torch's allocator"), line
    assert "workspaces kept 32.0 (shared)" in verify.summary()
    assert json.dumps(pool.to_dict())


def test_a_window_reads_the_fall_of_free_memory_less_the_growth_of_torch_reserved_memory():
    # free 100 -> 90 MiB while torch's reserved memory grew 10 -> 14: 6 MiB left outside torch's allocator
    assert outside_growth((100 * MiB, 10 * MiB), (90 * MiB, 14 * MiB)) == 6 * MiB
    assert outside_growth((100 * MiB, 10 * MiB), (96 * MiB, 14 * MiB)) == 0  # all of it torch's
    assert outside_growth((100 * MiB, 10 * MiB), (101 * MiB, 10 * MiB)) == 0  # another process freed some: never < 0


def test_first_use_bytes_are_what_a_size_took_outside_torch_beyond_its_executables():
    # A size whose capture window read 6 MiB outside torch's allocator, 4 of them its executables' (two segments).
    graphs = [types.SimpleNamespace(exec_bytes=2 * MiB), types.SimpleNamespace(exec_bytes=2 * MiB)]
    entry = SizeEntry(1, graphs[0], None, [], [], 1.0, 0, graphs[1:], outside_bytes=6 * MiB)
    assert (entry.exec_bytes, entry.first_use_bytes) == (4 * MiB, 2 * MiB)
    assert SizeEntry(1, graphs[0], None, [], [], 1.0, 0, outside_bytes=0).first_use_bytes == 0  # never negative
    r = gr.CaptureReport(sizes=[gr.SizeReport(2, 1.0, 4 * MiB, 10, 2 * MiB),
                                gr.SizeReport(1, 1.0, 0, 10, 4 * MiB, first_use_bytes=2 * MiB)],
                         workspace_bytes=32 * MiB, driver_bytes=44 * MiB, outside_bytes=8 * MiB)
    assert r.first_use_bytes == 2 * MiB and r.sizes[1].bytes == 6 * MiB
    assert r.bytes == r.driver_bytes == (4 + 2 + 4 + 2 + 32) * MiB  # every byte, the driver's figure
    assert r.exec_bytes + r.first_use_bytes == r.outside_bytes
    assert "static inputs 0.0, first use 2.0)" in r.summary(), r.summary()
    assert str(r).splitlines()[0].split()[8:11] == ["first", "use", "MiB"] and str(r).splitlines()[2].split()[4] == \
        "2.00"
    assert json.loads(r.to_json())["first_use_bytes"] == 2 * MiB
    pool = gr.PoolReport([r, report("draft")])
    assert pool.first_use_bytes == 2 * MiB and pool.bytes == r.bytes + report("draft").bytes - 32 * MiB
    assert ", first use 2.0)" in pool.summary() and pool.to_dict()["first_use_bytes"] == 2 * MiB
    assert "first use" in gr.CapturePlan(50 * MiB, [r]).summary()
    assert "first use" not in report().summary()  # named only where there are any


def test_other_bytes_are_the_reserved_growth_beyond_pool_workspaces_and_static_buffers(caplog):
    """Note [other bytes]: the capture's growth of torch's reserved memory less the pool's growth, the workspace
    hold and the static buffers, one figure for runners captured together, counted once by PoolReport."""
    from graphrunner.capture import _report
    from graphrunner.distributed import SoloAgreement
    records = [types.SimpleNamespace(report=lambda rank, n=n: report(n, static=4096)) for n in ("verify", "draft")]
    captures = [types.SimpleNamespace(spec=types.SimpleNamespace(name=n, verbose=False)) for n in ("verify", "draft")]
    # The pool grew 12 MiB (6 a runner), the hold is 32, static buffers 8 KiB; reserved memory grew 46 MiB.
    with caplog.at_level("INFO", logger="graphrunner"):
        _report(captures, records, SoloAgreement(), driver_bytes=54 * MiB, reserved_bytes=46 * MiB, budget=None,
                dropped=[[], []])
    reports = [r.capture_report for r in records]
    assert [r.other_bytes for r in reports] == [2 * MiB - 8192] * 2
    assert [r.outside_bytes for r in reports] == [8 * MiB] * 2
    pool = gr.PoolReport(reports)
    assert pool.other_bytes == 2 * MiB - 8192 and pool.to_dict()["other_bytes"] == pool.other_bytes
    # every byte the driver gave out: 12 pool + 8 executables + 32 workspaces + 8 KiB static + the other bytes
    assert pool.bytes == pool.driver_bytes == 54 * MiB
    assert ", other 2.0 (shared))" in reports[0].summary() and ", other 2.0)" in pool.summary(), pool.summary()
    assert "other 2.0)" in caplog.text
    # Torch's reserved memory grew by less than the parts (the static buffers fitted in its cache): never < 0.
    _report(captures, records, SoloAgreement(), driver_bytes=52 * MiB, reserved_bytes=44 * MiB, budget=None,
            dropped=[[], []])
    assert records[0].capture_report.other_bytes == 0 and "other" not in records[0].capture_report.summary()


def test_budget_lines_name_the_dropped_sizes():
    r = report("draft", budget=64 * MiB, dropped=[16, 32])
    assert "within the budget of 64.0 MiB, dropped sizes 16, 32 of 'draft' (their steps run eagerly)" in r.summary()
    assert "every size kept" in report(budget=64 * MiB).summary()
    assert gr.PoolReport([r]).dropped == {"draft": [16, 32]}


# -- CPU: plans -----------------------------------------------------------------------------------------------


def test_plan_predicts_each_ladder_and_fits_the_largest_first():
    p = plan()
    assert p.sizes == {"": [1, 2, 4, 8]} and p.largest == 8 and p.smallest_limit == 1
    assert p.bytes_for(8) == p.bytes_for(100) == 100 * MiB
    assert p.bytes_for(7) == p.bytes_for(4) == 60 * MiB and p.bytes_for(3) == 44 * MiB
    assert p.fit(100 * MiB) == 8 and p.fit(99 * MiB) == 4 and p.fit(44 * MiB) == 2 and p.fit(40 * MiB) == 1
    assert p.fit(100 * MiB, below=8) == 4
    with pytest.raises(ValueError, match=r"max_bytes=\d+ \(39.0 MiB\) is less than the smallest sizes need: capturing "
                                         r"sizes 1 takes 40.0 MiB by the plan; raise max_bytes"):
        p.fit(39 * MiB)
    assert "dry run: 4 graphs would take 100.0 MiB" in p.summary() and json.dumps(p.to_dict())


def test_plan_of_several_runners_keeps_a_size_of_each():
    p = gr.CapturePlan(90 * MiB, [report("verify", (8, 4)), report("draft", (8, 4, 2))], {4: 50 * MiB, 8: 90 * MiB})
    assert p.smallest_limit == 4 and p.fit(60 * MiB) == 4
    with pytest.raises(ValueError, match="capturing sizes 4 of 'verify'; sizes 2, 4 of 'draft' takes 50.0 MiB"):
        p.fit(49 * MiB)


def test_plan_without_a_ladder_fits_only_the_whole_capture():
    p = plan(ladder={})
    assert p.fit(100 * MiB) == 8
    with pytest.raises(ValueError, match="measured the whole ladder only"):
        p.fit(99 * MiB)
    with pytest.raises(ValueError, match="measured the whole ladder only"):
        p.bytes_for(4)


# -- CPU: capture_all's budget arguments ----------------------------------------------------------------------


@pytest.mark.parametrize("bad, error, match", [
    (True, TypeError, "max_bytes must be a positive int \\(bytes\\), got bool True"),
    (1.5e9, TypeError, "max_bytes must be a positive int \\(bytes\\), got float"),
    ("1GiB", TypeError, "max_bytes must be a positive int \\(bytes\\), got str '1GiB'"),
    (0, ValueError, "max_bytes must be a positive int \\(bytes\\), got 0"),
    (-1, ValueError, "max_bytes must be a positive int \\(bytes\\), got -1"),
])
def test_bad_budgets_are_refused_before_anything_is_captured(bad, error, match):
    runner = gr.GraphRunner(echo, IDS, max_batch_size=8)
    with pytest.raises(error, match=match):
        gr.capture_all(runner, max_bytes=bad)
    assert runner.state is gr.RunnerState.UNARMED and runner.capture_sizes == [1, 2, 4, 8]


def test_a_budget_below_the_smallest_sizes_need_is_refused_by_the_plan():
    runner = gr.GraphRunner(echo, IDS, max_batch_size=8)
    with pytest.raises(ValueError, match="is less than the smallest sizes need: capturing sizes 1 takes 40.0 MiB"):
        gr.capture_all(runner, max_bytes=10 * MiB, plan=plan())
    assert runner.state is gr.RunnerState.UNARMED


def test_plan_arguments_are_checked():
    runner = gr.GraphRunner(echo, IDS, max_batch_size=8)
    with pytest.raises(ValueError, match="plan=...\\) plans a budget: pass max_bytes too"):
        gr.capture_all(runner, plan=plan())
    with pytest.raises(TypeError, match="plan must be a gr.CapturePlan"):
        gr.capture_all(runner, max_bytes=MiB, plan={"bytes": 1})
    with pytest.raises(ValueError, match=r"the plan was made for runners \(name: sizes\) \{'': \[1, 2, 4, 8\]\}, not "
                                         r"\{'': \[1, 2, 4, 8, 12, 16\]\}"):
        gr.capture_all(gr.GraphRunner(echo, IDS, max_batch_size=16), max_bytes=MiB, plan=plan())


# -- CPU: the runner a budget rebuilds ------------------------------------------------------------------------


def test_kept_sizes_rebuild_the_table_and_batches_above_run_eagerly():
    runner = gr.GraphRunner(echo, IDS, max_batch_size=8, fallback="error")
    spec = runner.spec
    keep_sizes(runner, spec, [1, 2])
    assert runner.capture_sizes == [1, 2] and runner.spec.max_batch_size == 2
    assert runner.sizes.sizes == [1, 2]
    assert [runner.size_for(b) for b in (1, 2, 3, 8, 9)] == [1, 2, 0, 0, 0]  # 0: eagerly
    assert static_bytes(runner.spec, 2) == 16 and static_bytes(spec, 8) == 64
    keep_sizes(runner, spec, [1, 2, 4, 8])  # what capture_all does when a budgeted capture fails
    assert runner.spec is spec and runner.capture_sizes == [1, 2, 4, 8] and runner.size_for(5) == 8


def test_kept_sizes_of_a_ragged_runner_keep_their_requests():
    inputs = {"tokens": gr.StaticInput((), torch.long, per_token=True), "lens": gr.StaticInput((), torch.int32)}
    runner = gr.GraphRunner(echo_tokens, inputs, capture_sizes=[8, 16, 32], split="lens", max_requests=4)
    spec = runner.spec
    keep_sizes(runner, spec, [8, 16])
    assert runner.spec.max_requests == {8: 4, 16: 4} and runner.capture_sizes == [8, 16]
    assert runner.size_for(2, 12) == 16 and runner.size_for(2, 20) == 0


def echo_tokens(tokens, lens):
    return lens * 2


# -- CPU: what a plan checks and predicts of ragged and piecewise runners -------------------------------------

MIXED = {"tokens": gr.StaticInput((16384,), torch.float32, per_token=True),  # 64 KiB a token
         "lens": gr.StaticInput((), torch.int32),
         "table": gr.StaticInput((65536,), torch.int32)}  # 256 KiB a request


def echo_ids(ids):
    return ids * 2


def echo_lens(tokens, lens, table):
    return lens * 2


def decode_and_mixed(requests=None):
    """A uniform runner keyed by requests and a ragged one keyed by tokens, as one pool holds them."""
    decode = gr.GraphRunner(echo_ids, IDS, capture_sizes=[1, 2, 4, 8], name="decode")
    mixed = gr.GraphRunner(echo_lens, MIXED, capture_sizes=[16, 64, 256], split="lens", name="mixed",
                           max_requests=requests or {16: 4, 64: 8, 256: 16})
    return decode, mixed


def test_a_plan_checks_what_each_ragged_and_uniform_size_holds():
    decode, mixed = decode_and_mixed()
    counts = size_counts([decode.spec, mixed.spec])
    assert counts == {"decode": {1: (1, 1), 2: (2, 2), 4: (4, 4), 8: (8, 8)},
                      "mixed": {16: (4, 16), 64: (8, 64), 256: (16, 256)}}
    p = gr.CapturePlan(90 * MiB, [report("decode", (8, 4, 2, 1)), report("mixed", (256, 64, 16))], counts=counts)
    p.check([decode, mixed])
    assert json.loads(json.dumps(p.to_dict()))["counts"]["mixed"] == {"16": [4, 16], "64": [8, 64], "256": [16, 256]}
    _, other = decode_and_mixed(requests=8)  # R(T) = min(T, 8): sizes 16 and 256 hold other requests
    with pytest.raises(ValueError, match=r"holding other \(requests, tokens\) than these runners' \(size 16 of "
                                         r"'mixed': \(4, 16\) planned, \(8, 16\) here; size 256 of 'mixed': \(16, "
                                         r"256\) planned, \(8, 256\) here; a ragged runner's max_requests"):
        p.check([decode, other])
    with pytest.raises(ValueError, match="holding other"):
        gr.capture_all(decode, other, max_bytes=MiB, plan=p)
    assert other.state is gr.RunnerState.UNARMED
    verify = gr.GraphRunner(echo_ids, {"ids": gr.StaticInput((), torch.long, per_token=True)},
                            capture_sizes=[1, 2], tokens_per_request=4, name="decode")
    with pytest.raises(ValueError, match=r"size 1 of 'decode': \(1, 1\) planned, \(1, 4\) here"):
        gr.CapturePlan(MiB, [report("decode", (2, 1))], counts={"decode": {1: (1, 1), 2: (2, 2)}}).check([verify])
    gr.CapturePlan(MiB, [report("decode", (2, 1))]).check([verify])  # a plan made by hand checks sizes only


@pytest.mark.parametrize("leftover", [0, 8 * MiB])
def test_ladder_of_a_ragged_and_a_uniform_runner_with_piecewise_sizes(leftover):
    # Sizes of several graphs (a piecewise size: one a segment) count the executables of all of them; the limits
    # mix the uniform runner's requests and the ragged runner's tokens; static rows are tokens for per-token inputs
    # and R(T) for per-request ones.
    decode, mixed = decode_and_mixed()
    specs = [decode.spec, mixed.spec]
    assert _limits(specs) == [16, 64, 256]
    assert static_bytes(mixed.spec, 256) == 256 * 64 * 1024 + 16 * 4 + 16 * 256 * 1024
    assert static_bytes(mixed.spec, 16) == 16 * 64 * 1024 + 4 * 4 + 4 * 256 * 1024
    reports = [gr.CaptureReport(sizes=[gr.SizeReport(s, 1.0, 0, 30, e, graphs=3) for s, e in
                                       ((8, 2 * MiB), (4, 0), (2, 0), (1, 0))], name="decode"),
               gr.CaptureReport(sizes=[gr.SizeReport(256, 1.0, 6 * MiB, 30, 3 * MiB, graphs=3),
                                       gr.SizeReport(64, 1.0, 0, 30, MiB, graphs=3),
                                       gr.SizeReport(16, 1.0, 0, 30, 2 * MiB, graphs=3)], name="mixed")]
    assert [r.exec_bytes for r in reports] == [2 * MiB, 6 * MiB] and sum(r.graphs for r in reports) == 21
    measured = 100 * MiB
    plan = gr.CapturePlan(measured - leftover, reports, measured_bytes=measured, leftover_bytes=leftover)
    ladder = _ladder(specs, plan, {16: 10 * MiB, 64: 20 * MiB, 256: 40 * MiB})
    # Dropping 256: its pool beyond 64's (20 MiB), its static rows beyond 64's (192 tokens of 64 KiB and 8 requests
    # of 256 KiB: 14 MiB, 7 whole segments) and its executables (3 MiB) unless the dry run's are kept (leftover).
    # Dropping 64 too: 30 MiB of pool, 18 MiB of static rows (240 tokens, 12 requests), 4 MiB of executables.
    execs = 0 if leftover else 1
    assert ladder == {256: plan.bytes, 64: plan.bytes - (20 + 14 + 3 * execs) * MiB,
                      16: plan.bytes - (30 + 18 + 4 * execs) * MiB}
    # First-use bytes stay at every limit: a one-time cost the next kept size would pay where the size that paid it
    # in the dry run is dropped, so a prediction never errs low by them.
    reports[1].sizes[0].first_use_bytes = 2 * MiB
    plan = gr.CapturePlan(measured - leftover, reports, measured_bytes=measured, leftover_bytes=leftover)
    assert _ladder(specs, plan, {16: 10 * MiB, 64: 20 * MiB, 256: 40 * MiB}) == ladder


# -- CPU: memory_bench's command line and its families' steps -------------------------------------------------


def test_memory_bench_help_names_the_families():
    # -P: the packages this process imported, not the checkout the test may run in (which holds no built core)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(gr.__file__)),
                                                       os.path.dirname(os.path.dirname(graphrunner_workloads.__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-P", "-m", "graphrunner_workloads.memory_bench", "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    for flag in ("--no-ragged", "--no-piecewise", "--requests", "--ragged-sizes", "--ragged-attention",
                 "--piecewise-attention", "dry_run_error_L8/L32/spec/ragged/piecewise"):
        assert flag in out.stdout


@pytest.mark.parametrize("argv, match", [
    (["--ragged-sizes", "16,x"], "argument --ragged-sizes: token counts must be comma-separated ints"),
    (["--ragged-sizes", "0,16"], "argument --ragged-sizes: token counts must be at least 1"),
    (["--ragged-sizes", "16,4097"], "argument --ragged-sizes: the largest, 4097 tokens, does not fit --requests 8 "
                                    "requests of 512 positions"),
    (["--requests", "0"], "argument --requests: must be a positive int, got '0'"),
    (["--piecewise-attention", "packed"], "argument --piecewise-attention: invalid choice: 'packed'"),
    (["--ragged-attention", "varlen"], "argument --ragged-attention: invalid choice: 'varlen'"),
    (["--preset", "ragged"], "--preset 'ragged': a preset is L<layers>, spec, ragged, piecewise, and needs "
                             "--preset-out"),
    (["--preset", "mixed", "--preset-out", "x.json"], "--preset 'mixed': a preset is"),
])
def test_memory_bench_refuses_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_:
        memory_bench.parse_args(argv)
    assert exit_.value.code == 2 and match in capsys.readouterr().err


def test_memory_bench_runs_each_preset_in_a_process_of_its_own_with_its_settings(tmp_path, monkeypatch):
    children = []

    def child(cmd):  # the preset's process, run here: its command line parsed by the bench's own main()
        assert cmd[0] == sys.executable and cmd[cmd.index("-m") + 1] == "graphrunner_workloads.memory_bench"
        argv = cmd[cmd.index("-m") + 2:]
        children.append(argv)
        return types.SimpleNamespace(returncode=memory_bench.main(argv))

    def preset(args, name):
        if name == "piecewise":
            raise RuntimeError("a failing preset")
        return ({f"dry_run_error_{name}": 0.01, f"close_leftover_mib_{name}": 1.5 if name == "ragged" else 0.5,
                 f"settings_{name}": [args.requests, args.ragged_sizes, args.ragged_attention,
                                      args.piecewise_attention, args.attn, args.max_batch_size]}, [f"{name}: its line"])

    monkeypatch.setattr(memory_bench, "subprocess", types.SimpleNamespace(run=child))
    monkeypatch.setattr(memory_bench, "preset", preset)
    monkeypatch.setattr(memory_bench, "gpu_missing", lambda program: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a GPU")
    (tmp_path / "bench-test.json").write_text(json.dumps({"earlier": 1}))
    with pytest.raises(RuntimeError, match="a failing preset"):  # here in-process; a real child exits 1 instead
        memory_bench.main(["--layers", "8", "--no-spec", "--requests", "4", "--ragged-sizes", "64,16", "--attn",
                           "sdpa", "--max-batch-size", "32", "--piecewise-attention", "noop", "--out", str(tmp_path),
                           "--name", "test"])
    assert [argv[argv.index("--preset") + 1] for argv in children] == ["L8", "ragged", "piecewise"]
    monkeypatch.setattr(memory_bench, "preset", lambda args, name: preset(args, "ragged" if name == "piecewise"
                                                                          else name))
    children.clear()
    assert memory_bench.main(["--no-spec", "--layers", "8", "--requests", "4", "--ragged-sizes", "64,16",
                              "--ragged-attention", "sdpa", "--out", str(tmp_path), "--name", "test"]) == 0
    assert [argv[argv.index("--preset") + 1] for argv in children] == ["L8", "ragged", "piecewise"]
    got = json.loads((tmp_path / "bench-test.json").read_text())
    assert got["earlier"] == 1 and got["memory_gpu"] == "a GPU"
    assert got["settings_ragged"] == [4, [16, 64], "sdpa", "varlen", "decode", 256]
    assert got["close_leftover_mib"] == 1.5 and got["dry_run_error_ragged"] == 0.01
    text = (tmp_path / "memory-test.txt").read_text()
    assert "ragged: its line" in text and "dry_run_error_ragged" in text and "dry_run_error_piecewise" in text
    children.clear()
    assert memory_bench.main(["--no-spec", "--layers", "32", "--no-ragged", "--no-piecewise", "--out", str(tmp_path),
                              "--name", "test"]) == 0
    assert [argv[argv.index("--preset") + 1] for argv in children] == ["L32"]
    children.clear()
    assert memory_bench.main(["--layers", "--no-spec", "--out", str(tmp_path), "--name", "test"]) == 0
    assert [argv[argv.index("--preset") + 1] for argv in children] == ["ragged", "piecewise"]


@pytest.mark.skipif(HAS_GPU, reason="the preset's process would run the preset: the GPU tests below cover that")
@pytest.mark.parametrize("name", ["ragged", "piecewise"])
def test_a_family_presets_process_takes_every_setting_it_is_given(name, tmp_path):
    # A real child process: its command line parses (argparse would exit 2 with "error:"), and it stops only at the
    # missing GPU.
    args = memory_bench.parse_args(["--requests", "4", "--ragged-sizes", "16,64", "--piecewise-attention", "loop"])
    cmd = memory_bench.preset_command(args, name, tmp_path / "preset.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(gr.__file__)),
                                                       os.path.dirname(os.path.dirname(graphrunner_workloads.__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr and "error:" not in out.stderr, out.stderr


# A family decoder small enough for the CPU, with the bench's cache layout for "flash" (pages of 256, 512 positions).
CPU_FAMILY = DecoderConfig(layers=2, hidden=64, heads=2, head_dim=32, intermediate=128, vocab=128,
                           cache_len=memory_bench.FAMILY_CACHE_LEN, page_size=page_size_for("flash"),
                           max_batch_size=8, dtype=torch.float32)


def varlen_on_the_cpu(q, keys, values, cu_q, cu_k, max_q, max_k, dropout, causal, debug):
    """Stands in for aten::_flash_attention_forward on the CPU: the shapes and bounds only."""
    assert keys.shape == values.shape and cu_q.shape == cu_k.shape and max_q <= q.shape[0] and causal
    return (torch.zeros_like(q),)


@pytest.mark.parametrize("family, attention", [("ragged", "sdpa"), ("piecewise", "loop"), ("piecewise", "varlen"),
                                               ("piecewise", "noop")])
def test_family_runners_on_a_stand_in_match_the_real_ones_and_run_at_every_size(family, attention, monkeypatch):
    # What the bench's dry run needs: runners on the stand-in (4 pages) named and sized as the real ones, and the
    # step at every size on the pad values capture stages (page 0), as the warm-up and each capture run it.
    if attention in ("varlen", "noop"):  # torch's flash kernel is CUDA-only
        monkeypatch.setattr(ragged, "_FLASH", varlen_on_the_cpu)
        monkeypatch.setattr(piecewise, "flash_runs", lambda decoder: True)
    sizes, requests = [16, 64, 256, 1024], 8
    decoder = Decoder(CPU_FAMILY, device="cpu")
    model = family_model(family, decoder, attention)
    profile_steps(model, sizes, requests, torch.Generator().manual_seed(0))
    small = stand_in(decoder)
    assert small.k_cache.shape[1] == memory_bench.STAND_IN_PAGES and small.embed is decoder.embed
    real, stand = family_runners(model, sizes, requests), family_runners(family_model(family, small, attention),
                                                                         sizes, requests)
    assert [r.spec.name for r in real] == ["decode", "mixed"]
    plan = gr.CapturePlan(MiB, [gr.CaptureReport(sizes=[gr.SizeReport(s, 0, 0, 1) for s in r.capture_sizes],
                                                 name=r.spec.name) for r in stand],
                          counts=size_counts([r.spec for r in stand]))
    plan.check(real)
    assert plan.sizes == {"decode": [1, 2, 4, 8], "mixed": sizes}
    with torch.no_grad():
        for runner in stand:
            spec = runner.spec
            for size in spec.capture_sizes:
                views = {n: torch.full((spec.rows(n, size), *s.shape), s.pad, dtype=s.dtype)
                         for n, s in spec.inputs.items()}
                out = spec.fn(**views)
                assert out.shape == (spec.requests_of(size), CPU_FAMILY.vocab) and out.isfinite().all()


# -- GPU ------------------------------------------------------------------------------------------------------

HIDDEN, WIDE, VOCAB, LAYERS = 1024, 8192, 4096, 2
SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


class Model(torch.nn.Module):
    """A small MLP step over a paged "cache" it reads page 0 of (the pad page), so a stand-in with a few pages
    captures exactly as the real one does. Its activations (up to 16 MiB a tensor) make the pool grow with the
    size, so shorter ladders take less."""

    def __init__(self, pages, weights=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        if weights is None:
            weights = [torch.randn(VOCAB, HIDDEN, generator=g)]
            for _ in range(LAYERS):
                weights += [torch.randn(HIDDEN, WIDE, generator=g) / HIDDEN ** 0.5,
                            torch.randn(WIDE, HIDDEN, generator=g) / WIDE ** 0.5]
            weights += [torch.randn(HIDDEN, VOCAB, generator=g) / HIDDEN ** 0.5]
            weights = [torch.nn.Parameter(w.cuda().half(), requires_grad=False) for w in weights]
        self.weights = torch.nn.ParameterList(weights)
        self.register_buffer("cache", torch.zeros(pages, 16, HIDDEN, device="cuda", dtype=torch.half))

    def forward(self, ids, page):
        x = self.weights[0][ids]
        for up, down in zip(self.weights[1:-1:2], self.weights[2:-1:2]):
            x = x + torch.nn.functional.silu(x @ up) @ down + self.cache[page, 0]
        return x @ self.weights[-1]


INPUTS = {"ids": gr.StaticInput((), torch.long, high=VOCAB), "page": gr.StaticInput((), torch.long, high=1)}


def runner_of(model, name="", sizes=SIZES):
    return gr.GraphRunner(model, INPUTS, capture_sizes=sizes, name=name)


def settled_free():
    settle()
    return torch.cuda.mem_get_info()[0]


@pytest.fixture(scope="module")
def models():
    real = Model(pages=4096)  # 128 MiB of "cache"
    stand_in = Model(pages=2, weights=list(real.weights))
    with torch.no_grad():  # the engine's profiling step: first-use costs paid before any measurement
        real(torch.zeros(SIZES[-1], dtype=torch.long, device="cuda"),
             torch.zeros(SIZES[-1], dtype=torch.long, device="cuda"))
    first = runner_of(stand_in, sizes=[1, 2])
    first.capture()  # and graphrunner's own (its kernels load lazily)
    first.close()
    return real, stand_in


def close_all(*runners):
    for r in runners:
        r.close()


FRESH_PROCESS = """
import json, torch, graphrunner as gr
MiB = 1 << 20
def free():
    torch.cuda.synchronize(); torch.cuda.empty_cache(); return torch.cuda.mem_get_info()[0]
w = torch.randn(1024, 1024, device="cuda", dtype=torch.half)
def step(x):
    for _ in range(8):
        x = torch.relu(x @ w)
    return x
step(torch.zeros(256, 1024, device="cuda", dtype=torch.half))  # first-use costs (kernels, cuBLAS) paid first
before = free()
runner = gr.GraphRunner(step, {"x": gr.StaticInput((1024,), torch.half)}, max_batch_size=256)
r = runner.capture()
runner.close()
print(json.dumps({"exec": r.exec_bytes, "first_use": r.first_use_bytes, "outside": r.outside_bytes, "graphs": r.graphs,
                  "kept": before - free()}))
"""


@gpu
def test_executables_are_counted_in_a_fresh_process():
    # The driver keeps destroyed executables' memory for the process's later graphs (their exec_bytes then read 0):
    # only the first graphs of a process show it all.
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(gr.__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-P", "-c", FRESH_PROCESS], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["exec"] > 0, got
    assert abs(got["outside"] - got["exec"]) <= 2 * MiB + 0.05 * got["exec"], got
    # The size windows read all the capture took outside torch's allocator, but for what the warm-up took
    assert 0 <= got["outside"] - got["exec"] - got["first_use"] <= 2 * MiB, got
    assert got["kept"] <= got["exec"] + got["first_use"] + 2 * MiB, got  # close() leaves what the driver keeps


@gpu
def test_report_counts_executables_and_matches_the_driver(models, fresh_memory):
    real, _ = models
    runner = runner_of(real)
    r = runner.capture()
    try:
        assert r.exec_bytes >= 0 and r.exec_bytes == sum(s.exec_bytes for s in r.sizes)
        assert r.exec_bytes == sum(g.exec_bytes for e in runner.record.entries.values() for g in e.graphs)
        assert r.bytes == (r.pool_bytes + r.exec_bytes + r.first_use_bytes + r.workspace_bytes + r.static_bytes
                           + r.other_bytes)
        assert r.static_bytes == SIZES[-1] * 8 * 2
        # What the driver gave out besides torch's allocator is the executables (each read in 2 MiB chunks).
        assert abs(r.outside_bytes - r.exec_bytes) <= 2 * MiB + 0.05 * r.exec_bytes, (r.outside_bytes, r.exec_bytes)
        # Every byte the driver gave out is in the report, but what the warm-up took outside torch's allocator (at
        # most one 2 MiB chunk) and the static buffers' bytes where they fitted in torch's cache (counted, not taken).
        assert -r.static_bytes <= r.driver_bytes - r.bytes <= 2 * MiB, (r.driver_bytes, str(r))
        # The other bytes are the rest of torch's growth, so they take whatever else the capture kept there: at
        # most a small-block segment for the RNG's seed and offset and one for the static buffers (Note [other
        # bytes]); nothing more may hide there.
        assert r.other_bytes <= 4 * MiB - r.static_bytes, str(r)
        line = r.summary()
        assert f"captured {len(SIZES)} graphs in " in line and f"took {r.bytes / MiB:.1f} MiB (pool " in line
        assert f"executables {r.exec_bytes / MiB:.1f}, workspaces kept {r.workspace_bytes / MiB:.1f}, " in line
    finally:
        runner.close()


@gpu
def test_close_gives_every_byte_back(models, fresh_memory):
    real, _ = models
    before = settled_free()
    verify, draft = runner_of(real, "verify"), runner_of(real, "draft", SIZES[:5])
    reports = gr.capture_all(verify, draft)
    assert before - settled_free() >= gr.PoolReport(reports).bytes - 4 * MiB
    exec_bytes = gr.PoolReport(reports).exec_bytes + gr.PoolReport(reports).first_use_bytes
    close_all(verify, draft)
    del verify, draft, reports
    leftover = before - settled_free()
    # Besides the executables' memory and first-use bytes, which the driver keeps for the process's later graphs (0
    # where these graphs reused what earlier ones left it): see test_executables_are_counted_in_a_fresh_process.
    assert leftover <= 2 * MiB + exec_bytes, f"{leftover / MiB:.1f} MiB not given back"


@gpu
def test_dry_run_predicts_the_real_capture(models, fresh_memory):
    real, stand_in = models
    plan = gr.dry_run(lambda: runner_of(stand_in))
    # close() gave the dry run's capture back, but for the executables' memory the driver keeps
    assert plan.leftover_bytes <= 2 * MiB + plan.pool.exec_bytes + plan.pool.first_use_bytes, plan.summary()
    assert plan.bytes >= plan.pool.bytes - 4 * MiB
    assert plan.bytes_for(max(SIZES)) == plan.bytes
    assert all(plan.bytes_for(a) <= plan.bytes_for(b) + 2 * MiB for a, b in zip(SIZES, SIZES[1:]))
    runner = runner_of(real)
    got = runner.capture().driver_bytes
    runner.close()
    assert abs(plan.bytes - got) <= max(0.02 * got, 2 * MiB), (plan.bytes / MiB, got / MiB)


@gpu
def test_dry_run_of_two_runners_predicts_them_together(models, fresh_memory):
    real, stand_in = models
    plan = gr.dry_run(lambda: [runner_of(stand_in, "verify"), runner_of(stand_in, "draft", SIZES[:6])])
    assert plan.sizes == {"verify": SIZES, "draft": SIZES[:6]}
    verify, draft = runner_of(real, "verify"), runner_of(real, "draft", SIZES[:6])
    got = gr.capture_all(verify, draft)[0].driver_bytes
    close_all(verify, draft)
    assert abs(plan.bytes - got) <= max(0.02 * got, 2 * MiB), (plan.bytes / MiB, got / MiB)


@gpu
def test_budget_keeps_the_sizes_that_fit_and_never_exceeds_it(models, fresh_memory):
    real, stand_in = models
    plan = gr.dry_run(lambda: runner_of(stand_in))
    budget = plan.bytes_for(64) + MiB
    limit = plan.fit(budget)
    assert 64 <= limit < SIZES[-1], plan.ladder
    runner = runner_of(real)
    r = gr.capture_all(runner, max_bytes=budget, plan=plan)[0]
    try:
        kept = runner.capture_sizes
        assert kept == [s for s in SIZES if s <= kept[-1]] and kept[-1] <= limit
        assert r.dropped == [s for s in SIZES if s > kept[-1]] and r.budget == budget
        assert r.driver_bytes <= budget and abs(r.driver_bytes - plan.bytes_for(kept[-1])) <= 2 * MiB, \
            (r.driver_bytes / MiB, plan.bytes_for(kept[-1]) / MiB)
        assert "dropped sizes" in r.summary()
        ids = torch.randint(0, VOCAB, (SIZES[-1],), device="cuda")
        page = torch.zeros(SIZES[-1], dtype=torch.long, device="cuda")
        with torch.no_grad():
            for batch in (3, kept[-1], kept[-1] + 1, SIZES[-1]):  # above the largest kept size: eagerly
                torch.testing.assert_close(runner(ids=ids[:batch], page=page[:batch]), real(ids[:batch], page[:batch]),
                                           rtol=2e-2, atol=2e-2)
        assert runner.size_for(kept[-1] + 1) == 0 and runner.size_for(3) == 4
    finally:
        runner.close()


@gpu
def test_budget_without_a_plan_dry_runs_the_runners_first(models, fresh_memory):
    real, _ = models
    three = runner_of(real, sizes=SIZES[:3])
    budget = three.capture().driver_bytes + MiB  # about what the smallest sizes take
    three.close()
    runner = runner_of(real)
    r = gr.capture_all(runner, max_bytes=budget)[0]
    try:
        assert runner.capture_sizes[-1] < SIZES[-1] and r.driver_bytes <= budget
        assert r.dropped == [s for s in SIZES if s > runner.capture_sizes[-1]]
    finally:
        runner.close()


@gpu
def test_a_budget_the_smallest_size_exceeds_is_a_clear_error(models, fresh_memory):
    real, _ = models
    runner = runner_of(real)
    with pytest.raises(ValueError, match="is less than the smallest sizes need: capturing sizes 1 takes"):
        gr.capture_all(runner, max_bytes=MiB)
    assert runner.state is gr.RunnerState.UNARMED and runner.capture_sizes == SIZES


# -- GPU: the ragged and piecewise families -------------------------------------------------------------------

FAMILY = DecoderConfig(layers=2, hidden=256, heads=4, head_dim=64, intermediate=512, vocab=512, cache_len=512,
                       page_size=64, max_batch_size=8, dtype=torch.bfloat16)
FAMILY_SIZES, FAMILY_REQUESTS, DECODE_SIZES = [16, 64, 256], 8, [1, 2, 4, 8]
FAMILY_ATTENTION = {"ragged": "sdpa", "piecewise": "varlen"}  # varlen: a break op at every layer's attention
SEGMENTS = FAMILY.layers + 1  # the graphs of a piecewise size


@pytest.fixture(scope="module")
def family_decoders():
    """A bf16 decoder with its full cache and its stand-in (4 pages, the weights shared), every first-use cost
    paid first: each family's eager steps at every size (the engine's profiling pass: kernels, flash, cuBLAS) and
    graphrunner's own (a capture)."""
    real = Decoder(FAMILY)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for family, attention in FAMILY_ATTENTION.items():
            model = family_model(family, real, attention)
            for tokens in FAMILY_SIZES:
                step = random_ragged_step(FAMILY, tokens, FAMILY_REQUESTS, gen)
                model(**dict(step, **{SPLIT: step[SPLIT].cuda()}))
            for batch in DECODE_SIZES:
                model.decode(**random_decode_step(FAMILY, batch, gen))
    first = gr.GraphRunner(echo, IDS, capture_sizes=[1])
    first.capture()
    first.close()
    return real, stand_in(real)


def family_of(family, decoder):
    """The family's decode and ragged runners over `decoder`, as an engine captures them in one pool."""
    return family_runners(family_model(family, decoder, FAMILY_ATTENTION[family]), FAMILY_SIZES, FAMILY_REQUESTS)


def ladder_rises(plan, limits):
    return all(plan.bytes_for(a) <= plan.bytes_for(b) + 2 * MiB for a, b in zip(limits, limits[1:]))


@gpu
def test_dry_run_predicts_a_ragged_runner_and_the_decode_runner_in_one_pool(family_decoders, fresh_memory):
    real, small = family_decoders
    plan = gr.dry_run(lambda: family_of("ragged", small))
    assert plan.sizes == {"decode": DECODE_SIZES, "mixed": FAMILY_SIZES}
    assert plan.counts["mixed"] == {t: (FAMILY_REQUESTS, t) for t in FAMILY_SIZES}
    assert sorted(plan.ladder) == FAMILY_SIZES and plan.bytes_for(FAMILY_SIZES[-1]) == plan.bytes
    assert ladder_rises(plan, FAMILY_SIZES), plan.ladder
    runners = family_of("ragged", real)
    try:
        got = gr.capture_all(*runners)[0].driver_bytes
    finally:
        close_all(*runners)
    assert abs(plan.bytes - got) <= max(0.02 * got, 2 * MiB), (plan.bytes / MiB, got / MiB)


@gpu
def test_dry_run_predicts_a_piecewise_runner_and_counts_every_segments_executable(family_decoders, fresh_memory):
    real, small = family_decoders
    plan = gr.dry_run(lambda: ragged_runner(family_model("piecewise", small, "varlen"), FAMILY_SIZES,
                                            FAMILY_REQUESTS))
    (dry,) = plan.reports
    assert [s.graphs for s in dry.sizes] == [SEGMENTS] * len(FAMILY_SIZES), str(dry)
    assert plan.pool.graphs == SEGMENTS * len(FAMILY_SIZES) and ladder_rises(plan, FAMILY_SIZES), plan.ladder
    runner = ragged_runner(family_model("piecewise", real, "varlen"), FAMILY_SIZES, FAMILY_REQUESTS)
    r = runner.capture()
    try:
        entries = runner.record.entries
        assert all(len(entries[s.size].graphs) == s.graphs == SEGMENTS for s in r.sizes), str(r)
        assert all(s.exec_bytes == sum(g.exec_bytes for g in entries[s.size].graphs) for s in r.sizes)
        assert r.exec_bytes == sum(s.exec_bytes for s in r.sizes)
        assert r.bytes == (r.pool_bytes + r.exec_bytes + r.first_use_bytes + r.workspace_bytes + r.static_bytes
                           + r.other_bytes)
    finally:
        runner.close()
    assert abs(plan.bytes - r.driver_bytes) <= max(0.02 * r.driver_bytes, 2 * MiB), \
        (plan.bytes / MiB, r.driver_bytes / MiB)


@gpu
@pytest.mark.parametrize("family", ["ragged", "piecewise"])
def test_close_gives_back_what_the_report_counted_for_each_family(family, family_decoders, fresh_memory):
    real, _ = family_decoders
    before = settled_free()
    runners = family_of(family, real)
    pool = gr.PoolReport(gr.capture_all(*runners))
    try:
        graphs = (len(DECODE_SIZES) + len(FAMILY_SIZES)) * (SEGMENTS if family == "piecewise" else 1)
        assert pool.graphs == graphs, str(pool)
        taken = before - settled_free()
        assert taken >= pool.bytes - 4 * MiB, (taken / MiB, str(pool))
    finally:
        close_all(*runners)
    exec_bytes = pool.exec_bytes + pool.first_use_bytes
    del runners, pool
    leftover = before - settled_free()
    # Besides the executables' memory and first-use bytes the driver keeps for the process's later graphs (see
    # test_executables_are_counted_in_a_fresh_process).
    assert leftover <= 2 * MiB + exec_bytes, f"{leftover / MiB:.1f} MiB not given back"


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised where no CUDA device exists")
def test_dry_run_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="graphrunner needs a CUDA device"):
        gr.dry_run(lambda: gr.GraphRunner(echo, IDS, max_batch_size=8))
