"""GraphRunner on a GPU: every batch against eager, structures, fallback, errors, hooks, memory."""
import gc
import sys
import threading

import pytest
import torch

import graphrunner as gr
from conftest import gpu, segments, segments_since

pytestmark = gpu

VOCAB, HIDDEN, MAX_BS = 97, 64, 64
INPUTS = {"input_ids": gr.StaticInput((), torch.long, pad=0, high=VOCAB),
          "positions": gr.StaticInput((), torch.long, pad=0, high=512),
          "seq_lens": gr.StaticInput((), torch.int32, pad=1, low=1, high=512)}


class TinyStep(torch.nn.Module):
    """Rows never mix, so padding rows cannot change real rows."""

    def __init__(self, structure="dict"):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(512, HIDDEN, generator=g))
        self.proj = torch.nn.Parameter(torch.randn(HIDDEN, VOCAB, generator=g) / 8)
        self.structure = structure

    def forward(self, input_ids, positions, seq_lens):
        h = self.embed[input_ids] + self.pos[positions] * seq_lens.unsqueeze(1).float().log()
        h = torch.nn.functional.silu(h)
        logits = h @ self.proj
        if self.structure == "dict":
            return {"logits": logits, "hidden": h}
        if self.structure == "tuple":
            return logits, h
        return logits


def make_inputs(batch, gen=None):
    return {"input_ids": torch.randint(0, VOCAB, (batch,), device="cuda", generator=gen),
            "positions": torch.randint(0, 512, (batch,), device="cuda", generator=gen),
            "seq_lens": torch.randint(1, 512, (batch,), device="cuda", dtype=torch.int32, generator=gen)}


def poison_outputs(runner):
    for entry in runner.record.entries.values():
        out = entry.outputs
        for t in (out.values() if isinstance(out, dict) else out if isinstance(out, tuple) else [out]):
            t.fill_(float("nan"))


@pytest.fixture(scope="module")
def model():
    return TinyStep().cuda()


@pytest.fixture
def runner(model):
    r = gr.GraphRunner(model, INPUTS, max_batch_size=MAX_BS)
    r.capture()
    yield r
    r.close()


def test_every_batch_matches_eager_with_poisoned_outputs(runner, model):
    assert runner.capture_order == sorted(runner.capture_sizes, reverse=True)
    for batch in range(1, MAX_BS + 1):
        inputs = make_inputs(batch)
        poison_outputs(runner)
        got = runner(**inputs)
        want = model(**inputs)
        assert got["logits"].shape == (batch, VOCAB)
        torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got["hidden"], want["hidden"], rtol=1e-4, atol=1e-4)
        size = runner.size_for(batch)
        assert size == min(s for s in runner.capture_sizes if s >= batch)
        # padding rows hold the pad value, staged inside the graph
        static = runner.record.static_inputs
        assert (static["seq_lens"][batch:size] == 1).all()
        assert (static["input_ids"][batch:size] == 0).all()
        torch.testing.assert_close(static["input_ids"][:batch], inputs["input_ids"])


@pytest.mark.parametrize("offset", [0, 1, 8])
def test_sources_at_any_byte_offset_and_rows_that_end_mid_chunk(offset):
    """Staging copies 16 bytes a thread where it can, and byte by byte at the end of the rows or from a source
    not 16-byte aligned: rows of 3 bytes from a source `offset` bytes into its storage come through whole at
    every batch, and the padding rows after them hold the pad value."""
    spec = {"x": gr.StaticInput((3,), torch.uint8, pad=7)}
    with gr.GraphRunner(lambda x: x.float() * 3, spec, capture_sizes=[4, 16]) as runner:
        runner.capture()
        for batch in range(1, 17):
            storage = torch.randint(0, 256, (offset + 3 * batch,), dtype=torch.uint8, device="cuda")
            x = storage[offset:].view(batch, 3)
            poison_outputs(runner)
            torch.testing.assert_close(runner(x=x), x.float() * 3)
            static = runner.record.static_inputs["x"]
            assert (static[batch:runner.size_for(batch)] == 7).all(), (batch, static)


def test_host_may_run_ahead_of_the_gpu(runner, model):
    """Many steps without a sync: each launch carries its own staging argument."""
    steps = [make_inputs(b) for b in [3, 64, 1, 17, 40, 2] * 30]
    outs = [gr_out["logits"].clone() for gr_out in (runner(**s) for s in steps)]
    for s, got in zip(steps, outs):
        torch.testing.assert_close(got, model(**s)["logits"], rtol=1e-4, atol=1e-4)


SPIN_CYCLES = 4_000_000  # about 2 ms of GPU time per step at the H100's clock


def spin(x):
    torch.cuda._sleep(SPIN_CYCLES)
    return x + 1


@pytest.mark.parametrize("max_lead", [1, 2, 4, 16, None])
def test_max_lead_bounds_the_steps_in_flight(max_lead):
    """Each step spins ~2 ms on the GPU and the host never waits in its loop: with a bound, when step i returns,
    step i - max_lead has begun on the GPU, so step i - max_lead - 1 has finished and the later ones have not;
    with none, the host is far ahead. Outputs stay right either way."""
    steps = 24
    with gr.GraphRunner(spin, {"x": gr.StaticInput((4,), torch.float32)}, capture_sizes=[1, 2],
                        max_lead=max_lead) as runner:
        runner.capture()
        xs = [torch.full((1 + i % 2, 4), float(i), device="cuda") for i in range(steps)]
        marks, outs = [], []
        for x in xs:
            outs.append(runner(x=x).clone())
            marks.append(torch.cuda.Event())
            marks[-1].record()
        done = [m.query() for m in marks]
        torch.cuda.synchronize()
    for x, out in zip(xs, outs):
        torch.testing.assert_close(out, x + 1)
    assert not done[-1]
    if max_lead is None:
        assert not done[steps // 2], done
    else:
        assert done[steps - 2 - max_lead] and not any(done[steps - 1 - max_lead:]), done


def test_steps_from_a_new_thread(runner, model):
    """A thread that never touched CUDA has no current context: the replay takes the runtime's path there,
    which sets the context up, and later steps on that thread take the driver's."""
    steps = [make_inputs(b) for b in (6, 6, 33)]
    results = []
    worker = threading.Thread(target=lambda: results.extend(runner(**s)["logits"].clone() for s in steps))
    worker.start()
    worker.join()
    assert len(results) == len(steps)
    for s, got in zip(steps, results):
        torch.testing.assert_close(got, model(**s)["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("structure", ["tuple", "tensor"])
def test_tuple_and_tensor_outputs(structure):
    model = TinyStep(structure).cuda()
    with gr.GraphRunner(model, INPUTS, max_batch_size=16) as r:
        r.capture()
        inputs = make_inputs(5)
        got, want = r(**inputs), model(**inputs)
        if structure == "tuple":
            assert isinstance(got, tuple) and len(got) == 2
            torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
        else:
            assert isinstance(got, torch.Tensor)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fallback_eager_and_error(model):
    with gr.GraphRunner(model, INPUTS, max_batch_size=16) as r:
        r.capture()
        inputs = make_inputs(20)
        torch.testing.assert_close(r(**inputs)["logits"], model(**inputs)["logits"])
    with gr.GraphRunner(model, INPUTS, max_batch_size=16, fallback="error") as r:
        r.capture()
        with pytest.raises(ValueError, match="batch size 20 is above max_batch_size 16"):
            r(**make_inputs(20))
        torch.testing.assert_close(r(**make_inputs(3, torch.Generator("cuda").manual_seed(1)))["logits"],
                                   model(**make_inputs(3, torch.Generator("cuda").manual_seed(1)))["logits"])


def test_bad_inputs_leave_the_runner_usable(runner, model):
    good = make_inputs(7)
    cases = [
        (TypeError, "has dtype torch.int32, expected torch.int64", dict(good, input_ids=good["input_ids"].int())),
        (ValueError, "is on cpu", dict(good, positions=good["positions"].cpu())),
        (ValueError, "per-row shape", dict(good, positions=good["positions"][:, None])),
        (ValueError, "disagree on the batch size", dict(good, seq_lens=good["seq_lens"][:3])),
        (ValueError, "batch size 0", make_inputs(0)),
        (TypeError, "missing input\\(s\\) 'seq_lens'", {k: v for k, v in good.items() if k != "seq_lens"}),
        (TypeError, "unexpected input\\(s\\) 'bogus'", dict(good, bogus=good["seq_lens"])),
        (TypeError, "is a int, expected a torch.Tensor", dict(good, seq_lens=3)),
    ]
    for exc, message, inputs in cases:
        with pytest.raises(exc, match=message):
            runner(**inputs)
        torch.testing.assert_close(runner(**good)["logits"], model(**good)["logits"], rtol=1e-4, atol=1e-4)


def test_non_contiguous_input_is_copied(runner, model):
    wide = make_inputs(10)
    strided = {k: torch.stack([v, v], 1)[:, 0] for k, v in wide.items()}
    assert not strided["input_ids"].is_contiguous()
    torch.testing.assert_close(runner(**strided)["logits"], model(**wide)["logits"], rtol=1e-4, atol=1e-4)


def test_state_errors(model):
    r = gr.GraphRunner(model, INPUTS, max_batch_size=8)
    r.capture()
    with pytest.raises(gr.GraphStateError, match="capture\\(\\) already ran"):
        r.capture()
    r.close()
    with pytest.raises(gr.GraphStateError, match="closed"):
        r(**make_inputs(2))


@pytest.mark.parametrize("failure", [ValueError("boom"), KeyboardInterrupt()])
def test_fn_raising_during_capture_leaves_runner_reusable(model, failure, fresh_memory):
    start, before = torch.cuda.memory_reserved(), segments()
    calls = {"n": 0}

    def flaky(**inputs):
        calls["n"] += 1
        if torch.cuda.is_current_stream_capturing() and calls["n"] == 3:
            raise failure
        return model(**inputs)

    r = gr.GraphRunner(flaky, INPUTS, max_batch_size=16)
    with pytest.raises(type(failure)):
        r.capture()
    assert r.state is gr.RunnerState.UNARMED and r.record is None
    with pytest.raises(gr.GraphStateError, match="has not run yet"):
        r(**make_inputs(2))
    r.capture()
    inputs = make_inputs(9)
    torch.testing.assert_close(r(**inputs)["logits"], model(**inputs)["logits"], rtol=1e-4, atol=1e-4)
    r.close()
    assert torch.cuda.memory_reserved() == start, segments_since(before)


def test_fn_returning_non_tensor_is_refused(model):
    r = gr.GraphRunner(lambda **kw: [model(**kw)["logits"], 3], INPUTS, max_batch_size=4)
    with pytest.raises(TypeError, match="returned int at output\\[1\\]"):
        r.capture()
    assert r.state is gr.RunnerState.UNARMED and r.record is None


def test_hooks_see_sizes_in_order(model):
    seen_capture, seen_replay = [], []
    r = gr.GraphRunner(model, INPUTS, capture_sizes=[4, 8, 12],
                       on_capture=lambda info: seen_capture.append(info.padded_requests),
                       before_replay=lambda info: seen_replay.append((info.requests, info.padded_requests)))
    r.capture()
    assert seen_capture == r.capture_order and r.spec.max_batch_size == 12
    for batch in (5, 12, 14, 20):  # 14 and 20: above max_batch_size (the largest size), so eager
        inputs = make_inputs(batch)
        torch.testing.assert_close(r(**inputs)["logits"], model(**inputs)["logits"], rtol=1e-4, atol=1e-4)
    assert seen_replay == [(5, 8), (12, 12), (14, 0), (20, 0)]
    r.close()


def test_hook_errors_leave_the_runner_usable(model):
    def hook(info):
        if info.requests == 3:
            raise RuntimeError("hook failed at batch 3")
        if info.requests == 4:
            r.close()

    r = gr.GraphRunner(model, INPUTS, max_batch_size=8, before_replay=hook)
    r.capture()
    good = make_inputs(5)
    want = model(**good)["logits"]
    poison_outputs(r)
    with pytest.raises(RuntimeError, match="hook failed at batch 3"):
        r(**make_inputs(3))
    torch.testing.assert_close(r(**good)["logits"], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(gr.GraphStateError, match="before_replay closed this GraphRunner during the step"):
        r(**make_inputs(4))
    with pytest.raises(gr.GraphStateError, match="closed"):
        r(**good)


def test_clone_outputs_survive_the_next_call(model):
    with gr.GraphRunner(model, INPUTS, max_batch_size=8, clone_outputs=True) as r:
        r.capture()
        a_in, b_in = make_inputs(4), make_inputs(4)
        a = r(**a_in)
        r(**b_in)
        torch.testing.assert_close(a["logits"], model(**a_in)["logits"], rtol=1e-4, atol=1e-4)


def test_captured_steps_never_enter_python(model):
    """Once armed, a step runs in C++: the only Python it calls is what the user asked for (the hook, the
    clone of the outputs); no method of the runner runs."""
    seen = []
    with gr.GraphRunner(model, INPUTS, max_batch_size=8, clone_outputs=True,
                        before_replay=lambda info: seen.append((info.requests, info.padded_requests))) as r:
        r.capture()
        step = make_inputs(5)
        called = []
        sys.setprofile(lambda frame, event, arg: called.append(frame.f_code.co_name) if event == "call" else None)
        try:
            got = r(**step)
        finally:
            sys.setprofile(None)
        # _before_replay hands the hook its StepInfo (a dataclass's __init__); neither refers to the runner
        assert set(called) <= {"<lambda>", "_before_replay", "_step_info", "__init__", "clone_tensors",
                           "map_tensors"}, called
        torch.testing.assert_close(got["logits"], model(**step)["logits"], rtol=1e-4, atol=1e-4)
        assert got["logits"].data_ptr() != r.record.entries[8].outputs["logits"].data_ptr()  # a clone, not a view
        assert seen == [(5, 8)]
    with pytest.raises(gr.GraphStateError, match="closed"):
        r(**make_inputs(5))


def test_validate_passes(runner):
    report = runner.validate(steps_per_size=2)
    assert report.replays == 2 * len(runner.capture_sizes)
    scrubbed = runner.validate(scrub=True, guard=True)
    assert scrubbed.scrub and scrubbed.guard


def test_rng_in_fn_gives_fresh_values(model):
    def noisy(input_ids, positions, seq_lens):
        return model(input_ids, positions, seq_lens)["logits"] + torch.rand(input_ids.shape[0], VOCAB,
                                                                              device="cuda")

    with gr.GraphRunner(noisy, INPUTS, max_batch_size=8) as r:
        r.capture()
        inputs = make_inputs(6)
        base = model(**inputs)["logits"]
        a, b = r(**inputs).clone() - base, r(**inputs).clone() - base
        assert not torch.equal(a, b)
        assert 0.0 <= a.min() and a.max() <= 1.0 and abs(a.mean().item() - 0.5) < 0.1


def test_torch_compiled_fn(model):
    compiled = torch.compile(model, dynamic=True)
    for size in (2, 4, 8):  # compile (and autotune) outside any capture: that work cannot be captured
        compiled(**make_inputs(size))
    with gr.GraphRunner(compiled, INPUTS, max_batch_size=8, capture_sizes=[2, 4, 8]) as r:
        r.capture()
        for batch in (1, 3, 8):
            inputs = make_inputs(batch)
            torch.testing.assert_close(r(**inputs)["logits"], model(**inputs)["logits"], rtol=1e-4, atol=1e-4)


def test_close_returns_pool_memory(model, fresh_memory):
    start, before = torch.cuda.memory_reserved(), segments()
    r = gr.GraphRunner(model, INPUTS, max_batch_size=MAX_BS)
    r.capture()
    r(**make_inputs(3))
    assert torch.cuda.memory_reserved() > start
    r.close()
    gc.collect()
    assert torch.cuda.memory_reserved() == start, segments_since(before)


def test_report(model):
    with gr.GraphRunner(model, INPUTS, max_batch_size=16) as r:
        report = r.capture()
        assert [s.size for s in report.sizes] == r.capture_order
        assert report.sizes[0].pool_bytes_added > 0 and all(s.num_nodes > 1 for s in report.sizes)
        assert "pool MiB added" in str(report) and '"sizes"' in report.to_json()


def test_a_dropped_runner_frees_its_memory_at_once(model, fresh_memory):
    """No reference cycle holds a runner's graphs: dropping it without close() gives its memory back even with
    the garbage collector off."""
    start, before = torch.cuda.memory_reserved(), segments()
    gc.disable()
    try:
        r = gr.GraphRunner(model, INPUTS, max_batch_size=16)
        r.capture()
        r(**make_inputs(5))
        del r
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        assert torch.cuda.memory_reserved() == start, segments_since(before)
    finally:
        gc.enable()


def test_warm_up_sees_the_filled_static_buffers():
    """The static buffers are filled on the current stream and the warm-up runs on the capture stream: with the
    current stream busy and the buffers on recycled memory, the warm-up must still see the pad values."""
    seen = []

    def fn(ids):
        if not torch.cuda.is_current_stream_capturing():
            seen.append(ids.clone())
        return ids * 2

    junk = torch.full((4096,), 10 ** 9, dtype=torch.long, device="cuda")
    del junk  # its block goes back to the cache, still holding the junk, for the static buffer to reuse
    torch.cuda._sleep(100_000_000)  # keeps the current stream busy while the runner is built
    with gr.GraphRunner(fn, {"ids": gr.StaticInput((), torch.long, pad=3)}, capture_sizes=[4096]) as r:
        r.capture()
        assert seen and (seen[0] == 3).all(), seen[0][:4]
