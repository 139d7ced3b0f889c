"""validate() on piecewise sizes: scrub and guard around each segment and each break op (graphrunner.break_checks,
Note [checked breaks]). A break op that leaves its out= boundary buffer unwritten on a replay (it computes into
fresh memory and returns None) is named by validate(scrub=True) with op, size and buffer, and one that writes past
out= by validate(guard=True); their fixed twins pass; a segment writing out of bounds is named as that segment;
clean piecewise runners validate with both flags, uniform and ragged; a failed validate leaves the runner's breaks
as armed and its steps equal to eager; the workloads' piecewise reproductions are named and their twins pass. On
the CPU: the checked calls swap in and out of the armed list."""
import random
from types import SimpleNamespace

import pytest
import torch

import graphrunner as gr
from conftest import gpu
from graphrunner import pool_view
from graphrunner.break_checks import POISON, BreakChecks
from graphrunner.pool import Block, BlockKind
from graphrunner.spec import StepInfo
from graphrunner.testing import poison
from graphrunner_workloads.reproductions import piecewise as repro
from test_piecewise import INPUTS as RAGGED_INPUTS, Model, eager as ragged_eager, step as ragged_step

D = 16
SIZES = [8, 24, 40]
X = {"x": gr.StaticInput((D,), torch.float32)}


@gr.breaking_op(name="scale_fresh")
def scale_fresh(x, *, out, step):
    """3x, written into out= eagerly (step None, so also at capture); replayed (step set), it stays in the fresh
    tensor it was computed into and the op returns None: out= keeps whatever it held."""
    result = x * 3
    if step is None:
        out.copy_(result)


@gr.breaking_op(name="scale_into")
def scale_into(x, *, out, step):
    """scale_fresh's fixed twin: 3x written into out= on every path."""
    torch.mul(x, 3, out=out)


@gr.breaking_op(name="scale_pair")
def scale_pair(x, *, out, step):
    """Writes 3x into the first x.shape[0] rows from out='s start and x into the next as many, wherever out= ends
    (a kernel that lays a second output out after its first)."""
    rows = x.shape[0]
    both = out.as_strided((2 * rows, out.shape[1]), out.stride())
    torch.mul(x, 3, out=both[:rows])
    both[rows:].copy_(x)


@gr.breaking_op(name="add_one")
def add_one(x, *, out, step):
    """An in-place break, called as add_one(h, out=h): it reads out=, which validate must not poison."""
    out.add_(1)


def scaled(op):
    """fn(x): segment 0 computes h, the break op scales h into the boundary buffer, segment 1 mixes it back."""
    def fn(x):
        h = x * 2 + 1
        out = torch.empty_like(h)
        op(h, out=out)
        return torch.tanh(out) + h
    return fn


def paired(whole):
    """fn(x) around scale_pair: its boundary buffer is the first half of a buffer of twice the rows (the bug) or,
    with `whole`, all of it (the fixed twin)."""
    def fn(x):
        h = x * 2 + 1
        rows = x.shape[0]
        buf = torch.empty(2 * rows, D, device=x.device)
        scale_pair(h, out=buf if whole else buf[:rows])
        return torch.tanh(buf[:rows]) + h
    return fn


def in_place(x):
    h = x * 2 + 1
    add_one(h, out=h)
    return h * 3


def past_its_rows(x):
    """Segment 1, in a graph, writes the static input row right past the rows of its size (as a kernel sized for
    the next size would): guard names that segment."""
    h = x * 2 + 1
    out = torch.empty_like(h)
    scale_into(h, out=out)
    if torch.cuda.is_current_stream_capturing() and x.shape[0] < max(SIZES):
        x.as_strided((x.shape[0] + 1, D), x.stride())[-1].fill_(5)
    return out + 1


def captured(fn, **kw):
    runner = gr.GraphRunner(fn, X, capture_sizes=SIZES, **kw)
    runner.capture()
    return runner


def armed_ops(runner):
    """Each piecewise size's ops as the native step would call them now."""
    return {size: [op for op, _, _ in breaks] for size, breaks in enumerate(runner._pieces) if breaks is not None}


def recorded_ops(runner):
    return {size: [b.op for b in entry.breaks] for size, entry in runner.record.entries.items() if entry.breaks}


def steps_like_eager(runner, fn, seed):
    """Steps at every size, outputs poisoned first, against fn eagerly on the same fresh inputs."""
    rng = random.Random(seed)
    for batch in [rng.randint(1, 8), rng.randint(9, 24), rng.randint(25, 40), 40, 1]:
        x = torch.randn(batch, D, device="cuda")
        poison(runner.record.entries[runner.size_for(batch)].outputs)
        torch.testing.assert_close(runner(x=x), fn(x))


# -- the mechanism, on the CPU ---------------------------------------------------------------------------------

def fake_checks(op, scrub=True):
    """BreakChecks over one armed break of size 4 (no pool: scrub's check of out= alone), and the armed list."""
    record = SimpleNamespace(name="", entries={4: SimpleNamespace(breaks=[SimpleNamespace(name="op_under_test")])},
                             label=lambda size: f"size {size}")
    armed = [(op, (torch.arange(8.0).view(4, 2),), {"out": torch.zeros(4, 2)})]
    return BreakChecks(record, None, 4, 3, scrub, False, armed), armed


def call_as_the_step_does(armed, requests=3):
    fn, args, kwargs = armed[0]
    return fn(*args, **kwargs, step=StepInfo(requests, 4, requests, 4, {}))


def test_an_op_leaving_the_steps_rows_of_out_unwritten_is_named_and_the_op_put_back():
    def fresh(x, *, out, step):
        x * 3

    checks, armed = fake_checks(fresh)
    entry = armed[0]
    with pytest.raises(gr.GraphHazardError, match=r"break op op_under_test \(break 1 of 1 of size 4, batch 3\) left 6 "
                                                  r"of the 6 elements of the step's rows of its out= boundary buffer "
                                                  r"\(4, 2\) torch.float32 unwritten: .* write the result into out=") \
            as found:
        with checks.checking(None):
            assert armed[0] is not entry
            call_as_the_step_does(armed)
    assert (found.value.op, found.value.size, found.value.buffer) == ("op_under_test", 4, "out= (4, 2) of break op "
                                                                                          "op_under_test")
    assert armed == [entry] and armed[0] is entry


def test_an_op_writing_the_steps_rows_passes_and_padding_rows_may_stay():
    def real_rows_only(x, *, out, step):
        out[: step.tokens].copy_(x[: step.tokens])
        return out

    checks, armed = fake_checks(real_rows_only)
    with checks.checking(None):
        assert call_as_the_step_does(armed) is armed[0][2]["out"]
    out = armed[0][2]["out"]
    assert torch.equal(out[:3], torch.arange(6.0).view(3, 2))
    assert (out[3:].view(torch.int32) == POISON[4]).all()  # the padding row: poisoned, left as the op left it


def test_a_fresh_tensor_returned_on_replay_is_named_as_such():
    checks, armed = fake_checks(lambda x, *, out, step: x * 3)
    with pytest.raises(gr.GraphHazardError, match=r"it returned a \(4, 2\) tensor in fresh memory, which a replay "
                                                  r"discards"):
        with checks.checking(None):
            call_as_the_step_does(armed)


def test_an_in_place_break_is_not_poisoned():
    def doubles(x, *, out, step):
        out.mul_(2)

    checks, armed = fake_checks(doubles)
    x = armed[0][1][0]
    armed[0] = (doubles, (x,), {"out": x})
    with checks.checking(None):
        call_as_the_step_does(armed)
    assert torch.equal(x, torch.arange(8.0).view(4, 2) * 2)


def test_a_keyword_of_the_op_may_be_called_k_or_op():
    seen = []
    checks, armed = fake_checks(lambda x, *, out, step, k, op: seen.append((k, op)) or out.copy_(x))
    armed[0][2].update(k=5, op="topk")
    with checks.checking(None):
        call_as_the_step_does(armed)
    assert seen == [(5, "topk")]


def test_guard_names_a_break_ops_write_past_out_and_a_segments_write_on_the_cpu(monkeypatch):
    """PoolView.check_break and check_guarded(segment=) over a CPU stand-in for device memory: the break names
    the op, the size, the allocation it hit and out= where the write starts past its end; the segment is named."""
    memory = torch.zeros(1 << 14, dtype=torch.uint8)
    base = memory.data_ptr()
    monkeypatch.setattr(pool_view, "raw_bytes", lambda address, nbytes, device: memory[address - base:][:nbytes])
    size, buf_at = 24, 4096
    buf = memory[buf_at: buf_at + 2 * size * D * 4].view(torch.float32).view(2 * size, D)
    before_break = SimpleNamespace(footprint=[(base + 1024, 1536), (base + buf_at, buf.numel() * 4)])
    after_break = SimpleNamespace(footprint=[(base + 8192, 512)])
    entry = SimpleNamespace(breaks=[SimpleNamespace(name="scale_pair")], graphs=[before_break, after_break],
                            footprint=before_break.footprint + after_break.footprint)
    record = SimpleNamespace(name="", entries={size: entry}, label=lambda s: f"size {s}", state_buffers={},
                             static_inputs={}, of_runner="")
    view = object.__new__(pool_view.PoolView)
    view.owned, view.device = [], "cpu"
    view.footprints = {("", size): [Block(a, n, BlockKind.FOOTPRINT, ("", size)) for a, n in entry.footprint]}
    copies = [(Block(base, memory.numel(), BlockKind.SEGMENT), memory.clone())]
    buf[size:] = 1.5  # the op's second output, past out=
    with pytest.raises(gr.GraphHazardError, match=r"break op scale_pair \(break 1 of 1 of size 24, batch 17\) wrote "
                                                  r"outside its out= boundary buffer \(24, 16\) torch.float32 \(block "
                                                  r"0x[0-9a-f]+, 1536 bytes\): into the 3072-byte buffer that the "
                                                  r"capture of size 24 allocated before break 1 \(its allocation 2 of "
                                                  r"3\) .* the write starts 2 bytes past the end of out=") as found:
        view.check_break(copies, record, size, 17, 0, "scale_pair", buf[:size])
    assert (found.value.op, found.value.offset, found.value.overrun) == ("scale_pair", 1538,
                                                                         "out= (24, 16) of break op scale_pair")
    rows = (Block(base + 12288, 64, BlockKind.STATIC_ROWS, ("", 0), "static input 'x' rows 24..39"),
            memory[12288:12352].clone())
    memory[12288:12352] = 3
    with pytest.raises(gr.GraphHazardError, match=r"^segment 1 of size 24 \(batch 5\) wrote out of bounds into static "
                                                  r"input 'x' rows 24\.\.39") as found:
        view.check_guarded([rows], record, size, 5, segment=1)
    assert found.value.op is None


# -- on the GPU --------------------------------------------------------------------------------------------------

@gpu
def test_an_op_leaving_out_unwritten_is_named_by_scrub_and_its_twin_passes():
    runner = captured(scaled(scale_fresh))
    try:
        with pytest.raises(gr.GraphHazardError, match=r"break op scale_fresh \(break 1 of 1 of size (8|24|40), batch "
                                                      r"\d+\) left \d+ of the \d+ elements of the step's rows of its "
                                                      r"out= boundary buffer \(\1, 16\) torch.float32 unwritten") \
                as found:
            runner.validate(scrub=True)
        assert found.value.op == "scale_fresh" and found.value.size in SIZES
        assert found.value.buffer == f"out= ({found.value.size}, 16) of break op scale_fresh"
        assert "most likely computed its result into fresh memory and returned None" in str(found.value)
        assert "write the result into out=" in str(found.value)
        assert armed_ops(runner) == recorded_ops(runner)
    finally:
        runner.close()
    fixed = captured(scaled(scale_into))
    try:
        report = fixed.validate(steps_per_size=3, scrub=True, guard=True)
        assert report.replays == 3 * len(SIZES)
    finally:
        fixed.close()


@gpu
def test_an_op_writing_past_out_is_named_by_guard_and_its_twin_passes():
    runner = captured(paired(whole=False))
    try:
        with pytest.raises(gr.GraphHazardError, match=r"break op scale_pair \(break 1 of 1 of size (8|24|40), batch "
                                                      r"\d+\) wrote outside its out= boundary buffer \(\1, 16\) "
                                                      r"torch.float32 \(block 0x[0-9a-f]+, \d+ bytes\): into the \d+-"
                                                      r"byte buffer that the capture of size \1 allocated before break "
                                                      r"1") as found:
            runner.validate(guard=True)
        size = found.value.size
        assert found.value.op == "scale_pair" and size in SIZES
        assert found.value.buffer.startswith(f"the {2 * size * D * 4}-byte buffer that the capture of size {size}")
        assert found.value.offset >= size * D * 4
        assert found.value.overrun == f"out= ({size}, 16) of break op scale_pair"
        assert "allocate out= for every row its kernel writes" in str(found.value)
    finally:
        runner.close()
    fixed = captured(paired(whole=True))
    try:
        fixed.validate(steps_per_size=3, scrub=True, guard=True)
    finally:
        fixed.close()


@gpu
def test_a_segment_writing_out_of_bounds_is_named_as_that_segment():
    runner = captured(past_its_rows)
    try:
        with pytest.raises(gr.GraphHazardError, match=r"segment 1 of size (8|24) \(batch \d+\) wrote out of bounds "
                                                      r"into static input 'x' rows \1\.\.39") as found:
            runner.validate(guard=True)
        assert found.value.op is None and found.value.size in (8, 24)
    finally:
        runner.close()


@gpu
def test_clean_piecewise_runners_validate_with_scrub_and_guard():
    ragged = gr.GraphRunner(Model(), RAGGED_INPUTS, capture_sizes=[8, 16, 32], split="query_lens", max_requests=4)
    uniform = [captured(in_place), captured(scaled(scale_into)), captured(paired(whole=True))]
    try:
        ragged.capture()
        assert [len(ragged.record.entries[s].breaks) for s in (8, 16, 32)] == [3, 3, 3]
        report = ragged.validate(steps_per_size=3, scrub=True, guard=True)
        assert {size for _, size in report.max_error} == {8, 16, 32}
        for runner in uniform:
            report = runner.validate(steps_per_size=3, scrub=True, guard=True, seed=1)
            assert {size for _, size in report.max_error} == set(SIZES)
            assert armed_ops(runner) == recorded_ops(runner)
        rng = random.Random(2)
        for _ in range(6):  # the ragged runner still steps like eager after validating
            tokens = rng.randint(2, 32)
            s = ragged_step(tokens, rng.randint(1, min(4, tokens)), rng)
            poison(ragged.record.entries[ragged.size_for(s["query_lens"].shape[0], tokens)].outputs)
            torch.testing.assert_close(ragged(**s), ragged_eager(ragged.spec.fn, s), rtol=1e-9, atol=1e-9)
    finally:
        ragged.close()
        for runner in uniform:
            runner.close()


@gpu
def test_after_a_failed_validate_the_runner_steps_like_eager():
    fn = paired(whole=False)  # its write past out= lands in its own buffer's unused half: steps stay right
    runner = captured(fn)
    try:
        steps_like_eager(runner, fn, seed=0)
        for flags in ({"guard": True}, {"scrub": True, "guard": True}):
            with pytest.raises(gr.GraphHazardError, match=r"break op scale_pair .* wrote outside its out= boundary"):
                runner.validate(**flags)
            assert armed_ops(runner) == recorded_ops(runner)
            steps_like_eager(runner, fn, seed=1)
    finally:
        runner.close()


@gpu
@pytest.mark.parametrize("case, finding", [
    ("fresh", r"break op scale_fresh \(break 1 of 1 of size (8|16|32|48), batch \d+\) left \d+ of the \d+ elements of "
              r"the step's rows of its out= boundary buffer \(\1, 16\) torch.float32 unwritten"),
    ("past", r"break op tile_scale \(break 1 of 1 of size (8|16|32|48), batch \d+\) wrote outside its out= boundary "
             r"buffer \(\1, 16\) torch.float32 .* the write starts (right|\d+ bytes) past the end of out=")])
def test_the_piecewise_reproductions_are_named_and_their_twins_pass(case, finding):
    runner = repro.make_runner(case)
    try:
        with pytest.raises(gr.GraphHazardError, match=finding) as found:
            runner.validate(scrub=True, guard=True, steps_per_size=3)
        assert found.value.op in ("scale_fresh", "tile_scale") and found.value.size in repro.SIZES
    finally:
        runner.close()
    fixed = repro.make_runner(case, fixed=True)
    try:
        fixed.validate(scrub=True, guard=True, steps_per_size=3)
    finally:
        fixed.close()
