"""The ragged decoder with piecewise attention (graphrunner_workloads.piecewise): attention as a break op that takes
the step's lengths on the host. On the CPU, the eager piecewise step equals the graph-safe masked one; on the GPU, a
ragged runner of it equals eager per step with its outputs poisoned, the decode and ragged runners validate with
scrub and guard, the engine's graph modes give every request its tokens alone (float32, the "loop" op), and in
bfloat16 the "varlen" op (torch's flash varlen kernel, the longest request from the host split) agrees with its
full-graph twin "packed" and with eager masked SDPA and validates, the hand-written breakable pattern agrees with
graphrunner's, and the no-op break leaves the step as the full graph computes it."""
import copy
import functools
import random

import pytest
import torch

import graphrunner as gr
from conftest import assert_as_close_as_sdpa, float32_twin, gpu, sync_cache
from graphrunner.testing import poison
from graphrunner_workloads.decoder import Decoder, DecoderConfig, kv_slot
from graphrunner_workloads.engine import Engine, Workload, reference_tokens
from graphrunner_workloads.piecewise import CommonPiecewiseRunner, PiecewiseRaggedDecoder
from graphrunner_workloads.ragged import (SPLIT, RaggedDecoder, decode_runner, key_slots, ragged_runner,
                                          random_decode_step, random_ragged_step)

TINY = DecoderConfig(layers=2, hidden=64, heads=2, head_dim=32, intermediate=128, vocab=128, cache_len=64,
                     page_size=16, max_batch_size=4, dtype=torch.float32)
GPU_CFG = DecoderConfig(layers=3, hidden=128, heads=4, head_dim=32, intermediate=256, vocab=512, cache_len=256,
                        page_size=16, max_batch_size=8, dtype=torch.float32)
BF16_CFG = DecoderConfig(layers=3, hidden=256, heads=4, head_dim=64, intermediate=512, vocab=512, cache_len=512,
                         page_size=64, max_batch_size=8, dtype=torch.bfloat16)
SIZES = [16, 64, 256]


def on_device(step):
    return dict(step, **{SPLIT: step[SPLIT].to(step["input_ids"].device)})


def eager(model, step):
    with torch.no_grad():
        return model(**on_device(step))


@pytest.mark.parametrize("tokens, requests", [(1, 1), (23, 3), (50, 4)])
@pytest.mark.parametrize("attention", ["loop", "noop"])
def test_the_eager_piecewise_step_equals_the_masked_one(attention, tokens, requests):
    decoder = Decoder(TINY, device="cpu")
    step = random_ragged_step(TINY, tokens, requests, torch.Generator().manual_seed(tokens))
    want = eager(RaggedDecoder(copy.deepcopy(decoder)), step)
    got = eager(PiecewiseRaggedDecoder(decoder, attention, inner="sdpa"), step)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["varlen", "packed", "noop"])
def test_packed_keys_and_the_varlen_call_equal_the_masked_step(cpu_flash, attention):
    decoder = Decoder(TINY, device="cpu")
    step = random_ragged_step(TINY, 40, 4, torch.Generator().manual_seed(1))
    want = eager(RaggedDecoder(copy.deepcopy(decoder)), step)
    got = eager(PiecewiseRaggedDecoder(decoder, attention), step)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cpu_flash == [(40, TINY.cache_len)] * TINY.layers  # eagerly: T bounds every request


def test_the_varlen_op_takes_the_longest_request_from_the_host_split(cpu_flash):
    gen = torch.Generator().manual_seed(2)
    step = random_ragged_step(TINY, 20, 3, gen)
    q = torch.randn(24, TINY.heads, TINY.head_dim, generator=gen)  # 4 padding tokens
    keys = torch.randn(4 * TINY.cache_len, TINY.heads, TINY.head_dim, generator=gen)
    cu_q = torch.tensor([0, *step[SPLIT].cumsum(0).tolist(), 20], dtype=torch.int32)  # and a padding request
    cu_k = torch.tensor([0, *torch.cat([step["seq_lens"], torch.ones(1, dtype=torch.int32)]).cumsum(0).tolist()],
                        dtype=torch.int32)
    op = PiecewiseRaggedDecoder(Decoder(TINY, device="cpu"), "varlen").op
    want = op(q, keys, keys, cu_q, cu_k, out=torch.empty_like(q))
    got = op.fn(q, keys, keys, cu_q, cu_k, out=torch.empty_like(q),
                step=gr.StepInfo(3, 4, 20, 24, {}, {SPLIT: step[SPLIT]}))
    torch.testing.assert_close(got[:20], want[:20])
    assert cpu_flash == [(24, TINY.cache_len), (max(step[SPLIT].tolist()), TINY.cache_len)]


def test_decode_steps_go_through_the_break_op_once_a_layer():
    """A piecewise decoder's decode steps (what its uniform decode runner captures) break at attention as its
    ragged steps do: RaggedDecoder.decode would otherwise run another attention, with no break."""
    model = PiecewiseRaggedDecoder(Decoder(TINY, device="cpu"), "loop")
    calls, op = [], model.op
    model.op = lambda *args, **kwargs: calls.append(op) or op(*args, **kwargs)
    step = random_decode_step(TINY, 3, torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model.decode(**step)
    assert len(calls) == TINY.layers and model.decode_attention == model.attention
    want = RaggedDecoder(copy.deepcopy(model.decoder)).decode(**step)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_piecewise_decoder_refuses_what_its_kernel_cannot_run():
    decoder = Decoder(TINY, device="cpu")
    with pytest.raises(ValueError, match="attention must be one of"):
        PiecewiseRaggedDecoder(decoder, "flash")
    with pytest.raises(ValueError, match="attention 'varlen' runs torch's FlashAttention-2 varlen kernel: it needs a "
                                         "CUDA Decoder in float16 or bfloat16"):
        PiecewiseRaggedDecoder(decoder, "varlen")
    with pytest.raises(ValueError, match="inner must be a graph-safe attention"):
        PiecewiseRaggedDecoder(decoder, "noop", inner="loop")
    with pytest.raises(ValueError, match="PiecewiseRaggedDecoder with attention 'varlen'"):
        CommonPiecewiseRunner(PiecewiseRaggedDecoder(decoder, "loop"), [16], 4)


def test_key_slots_pack_each_requests_keys_request_after_request():
    step = random_ragged_step(TINY, 30, 4, torch.Generator().manual_seed(3))
    seq_lens = torch.cat([step["seq_lens"], torch.ones(1, dtype=torch.int32)])  # and a padding request on page 0
    page_table = torch.cat([step["page_table"], torch.zeros(1, TINY.pages_per_seq, dtype=torch.int32)])
    slots, cu_k = key_slots(seq_lens, page_table, TINY.page_size)
    assert slots.shape == (5 * TINY.cache_len,) and cu_k.tolist() == [0, *seq_lens.cumsum(0).tolist()]
    for request, n in enumerate(seq_lens.tolist()):
        positions = torch.arange(n)
        want = kv_slot(page_table[request].expand(n, -1), positions, TINY.page_size)
        assert torch.equal(slots[cu_k[request]:cu_k[request + 1]], want)
    assert slots.max() < TINY.num_pages * TINY.page_size


def test_the_loop_op_takes_the_host_split_while_replaying():
    """The op as a replay calls it (a StepInfo with the step's inputs: a ragged step's split, or a uniform step's
    counts) equals the eager call (step=None, as at capture too), which reads the lengths from the device."""
    gen = torch.Generator().manual_seed(0)
    decoder = Decoder(TINY, device="cpu")
    step = random_ragged_step(TINY, 20, 3, gen)
    padded = {name: torch.cat([t, t.new_zeros(4, *t.shape[1:])]) if name != "page_table" else t
              for name, t in step.items()}  # 4 padding tokens
    q = torch.randn(24, TINY.heads, TINY.head_dim, generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), step[SPLIT].cumsum(0).int()])
    args = (q, decoder.k_cache[0], decoder.v_cache[0], cu, padded["positions"], step["page_table"],
            decoder.cache_positions)
    op = PiecewiseRaggedDecoder(decoder, "loop").op
    want = op(*args, out=torch.empty_like(q))  # eagerly: step=None, lengths from cu_seqlens
    replayed = gr.StepInfo(3, 4, 20, 24, {}, {SPLIT: step[SPLIT]})
    got = op.fn(*args, out=torch.full_like(q, float("nan")), step=replayed)
    torch.testing.assert_close(got, want)
    assert got[20:].eq(0).all()
    uniform = gr.StepInfo(3, 4, 3, 4, {}, {"input_ids": step["input_ids"][:3]})  # one token a request
    one_each = torch.arange(4, dtype=torch.int32)  # cu_seqlens of 3 requests of one token
    got = op.fn(*args[:3], one_each, *args[4:], out=torch.empty_like(q), step=uniform)
    torch.testing.assert_close(got, op(*args[:3], one_each, *args[4:], out=torch.empty_like(q)))


# -- GPU -------------------------------------------------------------------------------------------------------------
def fresh_steps(runner, cfg, count, seed, largest):
    """(size, step) pairs of random token and request counts up to `largest` tokens."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rng = random.Random(seed)
    for _ in range(count):
        tokens = rng.randint(2, largest)
        requests = rng.randint(1, min(cfg.max_batch_size, tokens))
        yield runner.size_for(requests, tokens), random_ragged_step(cfg, tokens, requests, gen)


@gpu
def test_piecewise_ragged_runner_replays_equal_eager_on_fresh_steps():
    decoder = Decoder(GPU_CFG)
    runner = ragged_runner(PiecewiseRaggedDecoder(decoder, "loop"), SIZES, 8)
    reference = RaggedDecoder(decoder)  # graph-safe masked attention, eagerly, on the same cache
    try:
        runner.capture()
        entry = runner.record.entries[256]
        assert len(entry.graphs) == GPU_CFG.layers + 1
        assert [b.name for b in entry.breaks] == ["loop_attention"] * GPU_CFG.layers
        for size, step in fresh_steps(runner, GPU_CFG, 12, 5, 256):
            poison(runner.record.entries[size].outputs)
            got = runner(**step).clone()
            want = eager(reference, step)  # writes the same keys again: the cache is as the graphs left it
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        runner.close()


@gpu
def test_piecewise_decode_and_ragged_runners_validate_with_scrub_and_guard():
    model = PiecewiseRaggedDecoder(Decoder(GPU_CFG), "loop")
    runners = {"decode": decode_runner(model, 8), "mixed": ragged_runner(model, SIZES, 8)}
    steps = {"decode": random_decode_step, "mixed": random_ragged_step}
    try:
        gr.capture_all(*runners.values())
        assert all(not runner.audit().borrowed for runner in runners.values())
        report = gr.validate_all(*runners.values(), scrub=True, guard=True,
                                 make_inputs={name: functools.partial(make, GPU_CFG) for name, make in steps.items()})
        checked = {(name, size) for name, size in report.max_error}
        assert {size for name, size in checked if name == "mixed"} == set(SIZES)
        assert {size for name, size in checked if name == "decode"} == set(runners["decode"].record.entries)
    finally:
        for runner in runners.values():
            runner.close()


@gpu
@pytest.mark.parametrize("mode", ["ragged", "decode_only"])
def test_engine_with_piecewise_attention_gives_each_request_its_tokens_alone(mode):
    decoder = Decoder(GPU_CFG)
    engine = Engine(PiecewiseRaggedDecoder(decoder, "loop", sample=True), mode, budget=64, max_running=8)
    workload = Workload(requests=24, prompt_lens=(1, 200), output_lens=(1, 40), arrival_gap=3, seed=7)
    try:
        result = engine.run(workload)
    finally:
        engine.close()
    assert result.mixed_steps > 0 and result.graph_steps >= result.steps - result.mixed_steps
    for (prompt, n), got in zip(workload.draw(GPU_CFG.vocab), result.tokens):
        assert got == reference_tokens(decoder, prompt, n)


@gpu
def test_varlen_runner_agrees_with_the_full_graph_and_eager_and_validates():
    decoder = Decoder(BF16_CFG)
    piecewise = ragged_runner(PiecewiseRaggedDecoder(decoder, "varlen"), [64, 512], 8)
    full = ragged_runner(PiecewiseRaggedDecoder(decoder, "packed"), [64, 512], 8)  # its graph-safe twin
    masked = RaggedDecoder(decoder)  # ragged.py's "sdpa", eagerly
    varlen = PiecewiseRaggedDecoder(decoder, "varlen")  # the break op's kernel, eagerly
    twin = float32_twin(decoder)
    try:
        piecewise.capture()
        full.capture()
        assert [b.name for b in piecewise.record.entries[512].breaks] == ["varlen_attention"] * BF16_CFG.layers
        assert len(full.record.entries[512].graphs) == 1
        for size, step in fresh_steps(piecewise, BF16_CFG, 8, 6, 512):
            poison(piecewise.record.entries[size].outputs)
            sync_cache(twin, decoder)  # each step below writes the same keys again; the twin writes its own
            got = piecewise(**step).clone()
            truth = eager(RaggedDecoder(twin), step)
            sdpa = eager(masked, step)
            # The graph, its graph-safe twin, and its kernel eagerly (grid bound T, not the longest request): each
            # as close to the float32 step as bf16 masked SDPA is.
            assert_as_close_as_sdpa(got, sdpa, truth, f"piecewise at size {size}")
            assert_as_close_as_sdpa(full(**step), sdpa, truth, f"full graph at size {size}")
            assert_as_close_as_sdpa(eager(varlen, step), sdpa, truth, "varlen eagerly")
        piecewise.validate(scrub=True, guard=True, make_inputs=functools.partial(random_ragged_step, BF16_CFG))
    finally:
        piecewise.close()
        full.close()


@gpu
def test_the_hand_written_pattern_equals_graphrunners_piecewise_runner():
    model = PiecewiseRaggedDecoder(Decoder(BF16_CFG), "varlen")
    runner = ragged_runner(model, [64, 512], 8)
    common = CommonPiecewiseRunner(model, [64, 512], 8)
    try:
        runner.capture()
        assert len(common.graphs[512].graphs) == len(runner.record.entries[512].graphs)
        for _, step in fresh_steps(runner, BF16_CFG, 6, 8, 512):
            got = common(**step).clone()
            torch.testing.assert_close(got.float(), runner(**step).float(), rtol=2e-2, atol=2e-2)
    finally:
        runner.close()
        common.close()


@gpu
def test_noop_breaks_leave_the_full_graphs_step():
    decoder = Decoder(BF16_CFG)
    noop = ragged_runner(PiecewiseRaggedDecoder(decoder, "noop"), [64], 8)
    full = ragged_runner(PiecewiseRaggedDecoder(decoder, "packed"), [64], 8)
    try:
        noop.capture()
        full.capture()
        assert [b.name for b in noop.record.entries[64].breaks] == ["noop_break"] * BF16_CFG.layers
        for _, step in fresh_steps(noop, BF16_CFG, 4, 9, 64):
            torch.testing.assert_close(noop(**step).clone().float(), full(**step).float(), rtol=2e-2, atol=2e-2)
    finally:
        noop.close()
        full.close()
