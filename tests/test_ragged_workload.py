"""The ragged decoder step and the engine loop over it (graphrunner_workloads.ragged, .engine): on the CPU, a
ragged step equals running each request alone through the plain Decoder, padding never reaches real rows or
pages, and the eager engine's tokens equal each request's alone; on the GPU, the runners validate with scrub and
guard, the engine's graph modes give the same tokens as each request alone, in float32, and the ragged hazard
reproduction (a token map sized for the requests) is named while its fixed twin passes."""
import copy
import dataclasses
import functools
import random

import pytest
import torch

import graphrunner as gr
from conftest import assert_as_close_as_sdpa, float32_twin, gpu
from graphrunner.testing import poison
from graphrunner_workloads import ragged
from graphrunner_workloads.decoder import Decoder, DecoderConfig
from graphrunner_workloads.engine import Engine, Workload, reference_tokens, step_inputs
from graphrunner_workloads.ragged import (SPLIT, RaggedDecoder, RaggedMeta, decode_runner, pad_step,
                                          ragged_inputs, ragged_runner, random_decode_step, random_ragged_step)
from graphrunner_workloads.reproductions import installed
from graphrunner_workloads.reproductions import ragged as repro

TINY = DecoderConfig(layers=2, hidden=64, heads=2, head_dim=32, intermediate=128, vocab=128, cache_len=64,
                     page_size=16, max_batch_size=4, dtype=torch.float32)
WORKLOAD = Workload(requests=12, prompt_lens=(1, 45), output_lens=(1, 16), arrival_gap=2, seed=3)


def alone(decoder, step):
    """Each request of `step` run alone through the plain Decoder (its new tokens as rows, each attending to the
    keys up to its position): the last token's logits per request, on a copy of the decoder's cache."""
    decoder = copy.deepcopy(decoder)
    ends = torch.cumsum(step[SPLIT], 0).tolist()
    rows = []
    with torch.no_grad():
        for r, (start, end) in enumerate(zip([0] + ends[:-1], ends)):
            positions = step["positions"][start:end]
            logits = decoder(step["input_ids"][start:end], positions, (positions + 1).int(),
                             step["page_table"][r:r + 1].expand(end - start, -1), kv_slots=step["slots"][start:end])
            rows.append(logits[-1])
    return torch.stack(rows), decoder


def on_device(step):
    return dict(step, **{SPLIT: step[SPLIT].to(step["input_ids"].device)})


@pytest.mark.parametrize("tokens, requests", [(1, 1), (4, 4), (23, 3), (64, 1), (50, 4)])
def test_a_ragged_step_equals_each_request_alone(tokens, requests):
    decoder = Decoder(TINY, device="cpu")
    model = RaggedDecoder(decoder)
    step = random_ragged_step(TINY, tokens, requests, torch.Generator().manual_seed(tokens))
    want, reference = alone(decoder, step)
    with torch.no_grad():
        got = model(**on_device(step))
    assert got.shape == (requests, TINY.vocab)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # The step wrote its tokens' keys where the plain decoder does, and nothing else.
    torch.testing.assert_close(decoder.k_cache, reference.k_cache, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoder.v_cache, reference.v_cache, rtol=1e-5, atol=1e-5)


def test_sampling_returns_each_requests_greedy_token_and_decode_is_one_token_per_request():
    decoder = Decoder(TINY, device="cpu")
    step = random_decode_step(TINY, 3, torch.Generator().manual_seed(1))
    want, _ = alone(decoder, dict(step, **{SPLIT: torch.ones(3, dtype=torch.int32)}))
    with torch.no_grad():
        got = RaggedDecoder(copy.deepcopy(decoder), sample=True).decode(**step)
    assert torch.equal(got, want.argmax(-1))


def test_padding_tokens_and_requests_leave_real_rows_and_pages_alone():
    """Padded as a ragged runner pads (each input's pad): extra tokens on the scratch page, requests with no
    tokens. Real requests' rows and pages are as unpadded; only the scratch page changes besides them."""
    decoder = Decoder(TINY, device="cpu")
    step = random_ragged_step(TINY, 20, 3, torch.Generator().manual_seed(2))
    padded = pad_step(ragged_inputs(TINY), step, 32, 4)
    assert padded[SPLIT].tolist()[-1] == 0 and padded["slots"][20:].eq(0).all()
    twin = copy.deepcopy(decoder)
    before = decoder.k_cache.clone()
    with torch.no_grad():
        got = RaggedDecoder(decoder)(**on_device(step))
        padded_out = RaggedDecoder(twin)(**on_device(padded))
    assert padded_out.shape == (4, TINY.vocab)
    torch.testing.assert_close(padded_out[:3], got, rtol=1e-5, atol=1e-5)
    real = step["page_table"].flatten().long()
    torch.testing.assert_close(twin.k_cache[:, real], decoder.k_cache[:, real], rtol=1e-5, atol=1e-5)
    others = torch.ones(TINY.num_pages, dtype=torch.bool)
    others[real] = False
    others[0] = False
    assert torch.equal(twin.k_cache[:, others], before[:, others])
    assert not torch.equal(twin.k_cache[:, 0], before[:, 0])  # the padding tokens wrote the scratch page


def test_the_flash_backend_equals_the_masked_step_with_the_keys_packed_and_its_bounds_fixed(cpu_flash):
    """ragged.py's "flash" (each request's keys packed, the varlen call; on the CPU the reference call): the masked
    layout's logits on a padded step, padding tokens' rows zeroed, T bounding each request's tokens and the cache
    length its keys; decode steps run the decode kernel instead."""
    decoder = Decoder(TINY, device="cpu")
    step = pad_step(ragged_inputs(TINY), random_ragged_step(TINY, 40, 3, torch.Generator().manual_seed(4)), 48, 4)
    with torch.no_grad():
        want = RaggedDecoder(copy.deepcopy(decoder))(**step)
        model = RaggedDecoder(decoder, attention="flash")
        got = model(**step)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cpu_flash == [(48, TINY.cache_len)] * TINY.layers
    assert model.decode_attention == "decode"
    meta = RaggedMeta(step["positions"], step[SPLIT], step["seq_lens"], step["page_table"], decoder.cache_positions,
                      "flash")
    assert meta.real.tolist() == [True] * 40 + [False] * 8
    lens = step["seq_lens"].tolist()
    assert meta.cu_seqlens_k.tolist() == [0, *torch.tensor(lens).cumsum(0).tolist()]


def test_the_ragged_decoder_names_what_it_cannot_run(monkeypatch):
    """Each refusal names the argument and the fix; flash-attn 4 missing names the package to install."""
    decoder = Decoder(TINY, device="cpu")
    with pytest.raises(ValueError, match="attention must be one of .*'flash-attn-4'.*, got 'xformers'"):
        RaggedDecoder(decoder, attention="xformers")
    for attention in ("flash", "flash-attn-4"):
        with pytest.raises(ValueError, match=rf"attention '{attention}' runs a FlashAttention varlen kernel: it needs "
                                             r"a CUDA Decoder in float16 or bfloat16; this one is on cpu in "
                                             r"torch.float32: use attention='sdpa'"):
            RaggedDecoder(decoder, attention=attention)
    with pytest.raises(ValueError, match="build the Decoder with page_size > 0"):
        RaggedDecoder(Decoder(dataclasses.replace(TINY, page_size=0), device="cpu"))
    if not installed("flash_attn.cute"):
        monkeypatch.setattr(ragged, "flash_runs", lambda decoder: True)
        with pytest.raises(ImportError, match=r"attention backend 'flash-attn-4' needs the package that provides "
                                              r"flash_attn.cute: pip install .\[flash-attn-4\]"):
            RaggedDecoder(decoder, attention="flash-attn-4")


def test_the_benches_presets_build_from_their_own_command_lines():
    """ragged_bench's preset serves piecewise_bench too, from piecewise_bench's command line (which has no
    --attention); pages are sized for the ragged step's attention (flash-attn 4: one key tile of 128)."""
    from graphrunner_workloads import piecewise_bench, ragged_bench
    for attention, page in (("flash", 256), ("flash-attn-4", 128)):
        args = ragged_bench.parse_args(["--attention", attention])
        cfg = ragged_bench.preset(8, args, attention=args.attention)
        assert (cfg.layers, cfg.page_size, cfg.cache_len, cfg.max_batch_size) == (8, page, 512, 8)
    cfg = ragged_bench.preset(32, piecewise_bench.parse_args([]))
    assert (cfg.layers, cfg.page_size, cfg.max_batch_size) == (32, 256, 8)


def test_the_benches_split_a_pool_by_segment_kind(monkeypatch):
    """segment_mib sums one pool's segments by torch's kind (small, large) from the snapshot that takes no
    arguments, leaving other pools' alone."""
    from graphrunner_workloads import ragged_bench
    MiB = 1 << 20
    segments = [{"segment_pool_id": (1, 0), "segment_type": "small", "total_size": 2 * MiB},
                {"segment_pool_id": (1, 0), "segment_type": "small", "total_size": 2 * MiB},
                {"segment_pool_id": (1, 0), "segment_type": "large", "total_size": 62 * MiB},
                {"segment_pool_id": (0, 3), "segment_type": "large", "total_size": 20 * MiB},
                {"segment_pool_id": (0, 0), "segment_type": "small", "total_size": 2 * MiB}]
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda *a, **k: {"segments": segments})
    assert ragged_bench.segment_mib((1, 0)) == {"small": 4.0, "large": 62.0}
    assert ragged_bench.segment_mib((0, 3)) == {"small": 0.0, "large": 20.0}
    assert ragged_bench.segment_line({"small": 8.0, "large": 60.0}, {"small": 2.0, "large": 60.0}) == \
        "segments (small / large MiB): together 8.0 / 60.0, alone 2.0 / 60.0"


def test_the_mask_gives_each_token_its_own_requests_keys_up_to_its_position():
    positions = torch.tensor([5, 6, 7, 0, 2, 0, 0])  # request 0: 3 tokens, request 1: 1, request 2: 1, 2 padding
    query_lens = torch.tensor([3, 1, 1, 0], dtype=torch.int32)
    seq_lens = torch.tensor([8, 1, 3, 1], dtype=torch.int32)
    meta = RaggedMeta(positions, query_lens, seq_lens, torch.zeros(4, 1, dtype=torch.int32), torch.arange(8), "sdpa")
    assert meta.request.tolist() == [0, 0, 0, 1, 2, 3, 3]
    assert meta.cu_seqlens.tolist() == [0, 3, 4, 5, 5]
    visible = meta.mask.view(7, 4, 8)
    assert visible[0, 0].tolist() == [True] * 6 + [False] * 2
    assert visible[2, 0].all() and not visible[2, 1:].any()
    assert visible[3, 1].tolist() == [True] + [False] * 7
    assert visible[4, 2].tolist() == [True] * 3 + [False] * 5
    assert visible.sum(-1).sum(-1).min() >= 1  # no fully masked row, padding tokens included
    assert visible[5:, 3, 0].all() and visible[5:].sum() == 2  # padding tokens: the padding request's key 0


def test_random_steps_are_valid():
    gen = torch.Generator().manual_seed(4)
    for tokens, requests in [(1, 1), (16, 4), (64, 4), (200, 4)]:
        step = random_ragged_step(TINY, tokens, requests, gen)
        lens = step[SPLIT]
        assert step[SPLIT].device.type == "cpu" and lens.dtype == torch.int32
        assert int(lens.sum()) == tokens and int(lens.min()) >= 1 and len(lens) == requests
        assert (step["seq_lens"] >= lens).all() and (step["seq_lens"] <= TINY.cache_len).all()
        pages = step["page_table"].flatten()
        assert len(set(pages.tolist())) == len(pages) and int(pages.min()) >= 1
        ends = torch.cumsum(lens, 0)
        last = step["positions"][ends - 1]
        assert torch.equal(last + 1, step["seq_lens"].long())
    with pytest.raises(ValueError, match="does not fit"):
        random_ragged_step(TINY, 3, 5, gen)


def test_step_inputs_put_each_token_at_its_page_and_offset():
    decoder = Decoder(TINY, device="cpu")
    inputs = step_inputs(decoder, [(list(range(40)), 30, 10, [7, 3, 9]), ([5, 6], 1, 1, [2])])
    assert inputs[SPLIT].tolist() == [10, 1] and inputs["seq_lens"].tolist() == [40, 2]
    assert inputs["input_ids"].tolist() == list(range(30, 40)) + [6]
    assert inputs["positions"].tolist() == list(range(30, 40)) + [1]
    assert inputs["slots"].tolist() == [3 * 16 + 14, 3 * 16 + 15] + [9 * 16 + i for i in range(8)] + [2 * 16 + 1]
    assert inputs["page_table"].tolist() == [[7, 3, 9, 0], [2, 0, 0, 0]]


def test_the_eager_engine_gives_each_request_its_tokens_alone():
    decoder = Decoder(TINY, device="cpu")
    engine = Engine(RaggedDecoder(decoder, sample=True), "eager", budget=16, max_running=3)
    result = engine.run(WORKLOAD)
    requests = WORKLOAD.draw(TINY.vocab)
    assert result.mixed_steps > 0 and result.steps > result.mixed_steps  # chunked prefills and pure decodes
    assert result.generated == sum(n for _, n in requests)
    for (prompt, n), got in zip(requests, result.tokens):
        assert got == reference_tokens(decoder, prompt, n)


def test_engine_refuses_what_it_cannot_serve():
    model = RaggedDecoder(Decoder(TINY, device="cpu"), sample=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        Engine(model, "fast")
    with pytest.raises(ValueError, match="sample=True"):
        Engine(RaggedDecoder(model.decoder), "eager")
    with pytest.raises(ValueError, match=r"max_running \(8\) must be"):
        Engine(model, "eager", budget=16, max_running=8)
    with pytest.raises(ValueError, match="cache positions"):
        Engine(model, "eager", budget=16, max_running=2).run(Workload(prompt_lens=(1, 60), output_lens=(1, 8)))


# -- GPU -------------------------------------------------------------------------------------------------------------
GPU_CFG = DecoderConfig(layers=2, hidden=128, heads=4, head_dim=32, intermediate=256, vocab=512, cache_len=256,
                        page_size=16, max_batch_size=8, dtype=torch.float32)
SIZES = [16, 64, 256]


@gpu
@pytest.mark.parametrize("attention", ["sdpa", "decode"])
def test_ragged_runner_validates_with_scrub_and_guard(attention):
    model = RaggedDecoder(Decoder(GPU_CFG), attention=attention)
    decode, mixed = decode_runner(model, 8), ragged_runner(model, SIZES, 8)
    try:
        gr.capture_all(decode, mixed)
        report = gr.validate_all(decode, mixed, scrub=True, guard=True,
                                 make_inputs={"decode": functools.partial(random_decode_step, GPU_CFG),
                                              "mixed": functools.partial(random_ragged_step, GPU_CFG)})
        assert {size for name, size in report.max_error if name == "mixed"} == set(SIZES)
    finally:
        decode.close()
        mixed.close()


@gpu
def test_ragged_runner_replays_equal_eager_on_fresh_steps():
    model = RaggedDecoder(Decoder(GPU_CFG))
    runner = ragged_runner(model, SIZES, 8)
    runner.capture()
    gen = torch.Generator(device="cuda").manual_seed(5)
    rng = random.Random(5)
    try:
        for _ in range(12):
            tokens = rng.randint(2, 256)
            requests = rng.randint(1, min(8, tokens))
            step = random_ragged_step(GPU_CFG, tokens, requests, gen)
            size = runner.size_for(requests, tokens)
            poison(runner.record.entries[size].outputs)
            got = runner(**step).clone()
            with torch.no_grad():
                want = model(**on_device(step))  # writes the same keys again: the cache is as the graph left it
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        runner.close()


@gpu
def test_the_decode_kernel_backend_equals_sdpa():
    """Each token as a decode row over its request's pages (float32): the masked layout's logits and cache."""
    decoder = Decoder(GPU_CFG)
    step = random_ragged_step(GPU_CFG, 200, 6, torch.Generator(device="cuda").manual_seed(8))
    padded = pad_step(ragged_inputs(GPU_CFG), step, 256, 8)
    twin = copy.deepcopy(decoder)
    with torch.no_grad():
        kernel = RaggedDecoder(decoder, attention="decode")(**on_device(padded))
        sdpa = RaggedDecoder(twin)(**on_device(padded))
    torch.testing.assert_close(kernel[:6], sdpa[:6], rtol=1e-4, atol=1e-4)
    real = step["page_table"].flatten().long()
    torch.testing.assert_close(decoder.k_cache[:, real], twin.k_cache[:, real], rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.parametrize("attention, head_dim, page_size", [("flash", 64, 64)] + [
    pytest.param("flash-attn-4", head_dim, page_size, marks=pytest.mark.skipif(
        not installed("flash_attn.cute"), reason="flash-attn 4 (flash_attn.cute) not installed"))
    # pages of 64 keys load row by row; pages of one key tile (128 at head dim 128, the benchmark's) whole, by TMA,
    # with the rows past a request's last key in its last page read too
    for head_dim, page_size in ((64, 64), (128, 128))])
def test_flash_attention_agrees_with_sdpa_in_bfloat16(attention, head_dim, page_size):
    """A varlen kernel's step (torch's FlashAttention-2 on packed keys, or flash-attn 4 on the pages in place) is as
    close to the float32 truth as the masked SDPA step; its runners validate with scrub and guard."""
    cfg = DecoderConfig(layers=2, hidden=4 * head_dim, heads=4, head_dim=head_dim, intermediate=512, vocab=512,
                        cache_len=512, page_size=page_size, max_batch_size=8, dtype=torch.bfloat16)
    decoder = Decoder(cfg)
    twin = float32_twin(decoder)
    step = random_ragged_step(cfg, 300, 5, torch.Generator(device="cuda").manual_seed(6))
    with torch.no_grad():
        flash = RaggedDecoder(copy.deepcopy(decoder), attention=attention)(**on_device(step))
        sdpa = RaggedDecoder(decoder)(**on_device(step))
        truth = RaggedDecoder(twin)(**on_device(step))
    assert_as_close_as_sdpa(flash, sdpa, truth, attention)
    model = RaggedDecoder(decoder, attention=attention)
    decode, mixed = decode_runner(model, 8), ragged_runner(model, [64, 512], 8)
    try:
        gr.capture_all(decode, mixed)
        gr.validate_all(decode, mixed, scrub=True, guard=True,
                        make_inputs={"decode": functools.partial(random_decode_step, cfg),
                                     "mixed": functools.partial(random_ragged_step, cfg)})
    finally:
        decode.close()
        mixed.close()


@gpu
@pytest.mark.parametrize("mode, attention", [("ragged", "sdpa"), ("decode_only", "sdpa"), ("ragged", "decode")])
def test_engine_in_graph_modes_gives_each_request_its_tokens_alone(mode, attention):
    decoder = Decoder(GPU_CFG)
    engine = Engine(RaggedDecoder(decoder, attention=attention, sample=True), mode, budget=64, max_running=8)
    workload = Workload(requests=24, prompt_lens=(1, 200), output_lens=(1, 40), arrival_gap=3, seed=7)
    try:
        result = engine.run(workload)
    finally:
        engine.close()
    steps_through_graphs = result.steps if mode == "ragged" else result.steps - result.mixed_steps
    assert result.mixed_steps > 0 and result.graph_steps == steps_through_graphs
    for (prompt, n), got in zip(workload.draw(GPU_CFG.vocab), result.tokens):
        assert got == reference_tokens(decoder, prompt, n)


@gpu
def test_token_map_sized_for_requests_is_named_and_its_fixed_twin_passes():
    """The seed's class in a ragged graph (reproductions/ragged.py): the token -> request map sized for R entries
    runs past its buffer at 256 and 1024 tokens; validate names the size and the buffer: as the write out of
    bounds (guard), or as the read of the buffer the overrun left stale (scrub), whichever replay shows first."""
    runner = repro.make_runner(fixed=False)
    try:
        with pytest.raises(gr.GraphHazardError, match=r"size (256|1024).* (wrote out of bounds into|reads the "
                                                      r"\d+-byte buffer that the capture of size)") as found:
            runner.validate(scrub=True, guard=True, steps_per_size=3, make_inputs=repro.random_step)
        print("named:", found.value)
        assert found.value.size in (256, 1024) and found.value.buffer
    finally:
        runner.close()
    runner = repro.make_runner(fixed=True)
    try:
        report = runner.validate(scrub=True, guard=True, steps_per_size=3, make_inputs=repro.random_step)
        assert report.replays == 3 * len(repro.SIZES)
    finally:
        runner.close()
