"""Every byte the graphs take (#35): the capture report's split, the dry run's plan, capture within a budget, and
close() giving it all back. The argument checks and the reports' arithmetic run on the CPU; the rest needs a GPU."""
import gc
import json

import pytest
import torch

import graphrunner as gr
from conftest import HAS_GPU, gpu
from graphrunner.plan import keep_sizes, static_bytes

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
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
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
print(json.dumps({"exec": r.exec_bytes, "outside": r.outside_bytes, "graphs": r.graphs, "kept": before - free()}))
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
    assert got["kept"] <= got["exec"] + 2 * MiB, got  # what close() could not give back: the driver's keeping


@gpu
def test_report_counts_executables_and_matches_the_driver(models, fresh_memory):
    real, _ = models
    runner = runner_of(real)
    r = runner.capture()
    try:
        assert r.exec_bytes >= 0 and r.exec_bytes == sum(s.exec_bytes for s in r.sizes)
        assert r.exec_bytes == sum(g.exec_bytes for e in runner.record.entries.values() for g in e.graphs)
        assert r.bytes == r.pool_bytes + r.exec_bytes + r.workspace_bytes + r.static_bytes
        assert r.static_bytes == SIZES[-1] * 8 * 2
        # What the driver gave out besides torch's allocator is the executables (each read in 2 MiB chunks).
        assert abs(r.outside_bytes - r.exec_bytes) <= 2 * MiB + 0.05 * r.exec_bytes, (r.outside_bytes, r.exec_bytes)
        assert abs(r.driver_bytes - r.bytes) <= 4 * MiB, (r.driver_bytes, r.bytes)
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
    exec_bytes = gr.PoolReport(reports).exec_bytes
    close_all(verify, draft)
    del verify, draft, reports
    leftover = before - settled_free()
    # Besides the executables' memory, which the driver keeps for the process's later graphs (0 where these graphs
    # reused what earlier ones left it): see test_executables_are_counted_in_a_fresh_process.
    assert leftover <= 2 * MiB + exec_bytes, f"{leftover / MiB:.1f} MiB not given back"


@gpu
def test_dry_run_predicts_the_real_capture(models, fresh_memory):
    real, stand_in = models
    plan = gr.dry_run(lambda: runner_of(stand_in))
    # close() gave the dry run's capture back, but for the executables' memory the driver keeps
    assert plan.leftover_bytes <= 2 * MiB + plan.pool.exec_bytes, plan.summary()
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


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised where no CUDA device exists")
def test_dry_run_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="graphrunner needs a CUDA device"):
        gr.dry_run(lambda: gr.GraphRunner(echo, IDS, max_batch_size=8))
