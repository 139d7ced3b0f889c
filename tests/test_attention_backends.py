"""The decoder's attention backends inside captured graphs, against SDPA at every captured size; the decode
kernel's op against a softmax computed in float64."""
import functools
import random

import pytest
import torch

import graphrunner as gr
from conftest import gpu
from graphrunner.testing import poison, relative_error
from graphrunner_workloads.attention import decode_op, flash_attn_4_op
from graphrunner_workloads.decoder import DecoderConfig, Decoder, random_decode_inputs, decode_inputs
from graphrunner_workloads.reproductions import installed

pytestmark = gpu

SHAPE = dict(layers=2, hidden=256, heads=4, head_dim=64, intermediate=512, vocab=1000, cache_len=512,
             max_batch_size=64)


# Paged only: in a contiguous cache row i is slot i, so padding rows write into the next rows' caches, which the
# eager reference of the unpadded batch leaves alone (the decode kernel's contiguous path is checked on its own
# below).
BACKENDS = [
    pytest.param(("decode", 16), id="decode-paged"),
    # ids name the backend
    pytest.param(("flash-attn-4", 128), id="flash-attn-4-paged",
                 marks=pytest.mark.skipif(not installed("flash_attn.cute"),
                                          reason="flash-attn 4 (flash_attn.cute) not installed")),
    pytest.param(("flash-attn", 256), id="flash-attn-2-paged",
                 marks=pytest.mark.skipif(not installed("flash_attn.flash_attn_interface"),
                                          reason="flash-attn 2 not installed")),
]


@pytest.fixture
def paged_pair(request):
    """The backend's decoder and an SDPA decoder with the same weights, cache and page size."""
    backend, page_size = request.param
    cfg = DecoderConfig(**SHAPE, attention=backend, page_size=page_size)
    reference = DecoderConfig(**SHAPE, attention="sdpa", page_size=page_size)
    return cfg, Decoder(cfg), Decoder(reference)


@pytest.mark.parametrize("paged_pair", BACKENDS, indirect=True)
def test_outputs_equal_sdpa_at_every_size_interleaved(paged_pair):
    cfg, model, reference = paged_pair
    # strict: the capture guard raises if anything lazily made inside a capture stays alive in the pool
    with gr.GraphRunner(model, decode_inputs(cfg), max_batch_size=cfg.max_batch_size, strict=True) as runner:
        runner.capture()
        schedule = [s for s in runner.capture_sizes for _ in range(2)]
        random.Random(0).shuffle(schedule)
        gen = torch.Generator(device="cuda").manual_seed(0)
        for size in schedule:
            smaller = [s for s in runner.capture_sizes if s < size]
            batch = random.Random(size).randint(smaller[-1] + 1 if smaller else 1, size)
            step = random_decode_inputs(cfg, batch, gen)
            with torch.no_grad():
                want = reference(**step).float()
            poison(runner.record.entries[size].outputs)
            got = runner(**step).float()
            assert runner.size_for(batch) == size and got.shape == want.shape
            err = relative_error(got, want)
            assert err < 2e-2, f"size {size}, batch {batch}: relative error {err:.3g} against SDPA"


@pytest.mark.parametrize("paged_pair", BACKENDS, indirect=True)
def test_validate_with_scrub_and_guard_passes(paged_pair):
    cfg, model, _ = paged_pair
    with gr.GraphRunner(model, decode_inputs(cfg), max_batch_size=cfg.max_batch_size) as runner:
        runner.capture()
        report = runner.validate(scrub=True, guard=True, make_inputs=functools.partial(random_decode_inputs, cfg))
        assert report.replays == 2 * len(runner.capture_sizes)


def reference_attention(q, k_cache, v_cache, seq_lens, page_table):
    """Each row's softmax attention over its first seq_len keys, in float64."""
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for row in range(q.shape[0]):
        n = int(seq_lens[row])
        if page_table is None:  # [rows, heads, cache_len, dim]
            k, v = k_cache[row, :, :n], v_cache[row, :, :n]
        else:  # [pages, page_size, heads, dim]: the row's pages in order, then its first n keys
            k = k_cache[page_table[row].long()].flatten(0, 1)[:n].transpose(0, 1)
            v = v_cache[page_table[row].long()].flatten(0, 1)[:n].transpose(0, 1)
        if n:
            scores = torch.einsum("hd,hkd->hk", q[row].double(), k.double()) / q.shape[-1] ** 0.5
            out[row] = torch.einsum("hk,hkd->hd", scores.softmax(-1), v.double())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 64, 128, 256])
@pytest.mark.parametrize("page_size", [0, 16])
def test_decode_op_matches_softmax_over_each_rows_keys(dtype, dim, page_size):
    gen = torch.Generator(device="cuda").manual_seed(dim + page_size)
    rows, heads, cache_len = 7, 3, 200  # 200: the last chunk of 64 keys is partly past the cache
    # lengths: none, one key, within the first chunk, on a chunk's edge, past it, the whole cache
    seq_lens = torch.tensor([0, 1, 37, 64, 65, 129, cache_len], dtype=torch.int32, device="cuda")
    # q as engines hand it over: a strided view of a fused QKV projection
    q = torch.randn(rows, 3, heads, dim, generator=gen, device="cuda").to(dtype)[:, 0]
    if page_size:
        pages = cache_len // page_size + (cache_len % page_size > 0)
        table = (torch.randperm(rows * pages, generator=gen, device="cuda") + 1).view(rows, pages).int()
        shape, cache_len = (rows * pages + 1, page_size, heads, dim), pages * page_size
        seq_lens[-1] = cache_len
    else:
        table, shape = None, (rows, heads, cache_len, dim)
    k, v = (torch.randn(shape, generator=gen, device="cuda").to(dtype) for _ in range(2))
    want = reference_attention(q, k, v, seq_lens, table)
    out = decode_op()(q, k, v, seq_lens, table)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.equal(out[0], torch.zeros_like(out[0])), "a row with no keys attends to nothing"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = relative_error(out.double(), want)
    assert err < tol, f"relative error {err:.3g}"


def test_decode_op_traces_under_torch_compile():
    op = decode_op()

    def attend(q, k, v, seq_lens):
        return op(q * 2, k, v, seq_lens, None) + 1

    gen = torch.Generator(device="cuda").manual_seed(0)
    compiled = torch.compile(attend, fullgraph=True, dynamic=True)
    for rows in (3, 5):
        q = torch.randn(rows, 2, 64, generator=gen, device="cuda")
        k, v = (torch.randn(rows, 2, 100, 64, generator=gen, device="cuda") for _ in range(2))
        seq_lens = torch.randint(1, 101, (rows,), generator=gen, device="cuda", dtype=torch.int32)
        torch.testing.assert_close(compiled(q, k, v, seq_lens), attend(q, k, v, seq_lens))


@pytest.mark.skipif(not installed("flash_attn.cute"), reason="flash-attn 4 (flash_attn.cute) not installed")
def test_flash_attn_4_op_compiles_into_one_graph():
    """fullgraph=True raises at a graph break: the op keeps torch.compile out of flash_attn.cute's Python."""
    op = flash_attn_4_op()

    def attend(q, k, v, seq_lens, table):
        return op(q * 2, k, v, seq_lens, table) + 1

    gen = torch.Generator(device="cuda").manual_seed(0)
    compiled = torch.compile(attend, fullgraph=True, dynamic=True)
    heads, dim, page_size, pages = 4, 128, 128, 2
    for rows in (3, 5):
        q = torch.randn(rows, heads, dim, generator=gen, device="cuda").bfloat16()
        k, v = (torch.randn(rows * pages + 1, page_size, heads, dim, generator=gen, device="cuda").bfloat16()
                for _ in range(2))
        seq_lens = torch.randint(1, pages * page_size + 1, (rows,), generator=gen, device="cuda", dtype=torch.int32)
        table = (torch.randperm(rows * pages, generator=gen, device="cuda") + 1).view(rows, pages).int()
        out = compiled(q, k, v, seq_lens, table)
        want = reference_attention(q * 2, k, v, seq_lens, table) + 1
        assert out.shape == q.shape and relative_error(out.double(), want) < 2e-2


@pytest.mark.parametrize("change, message", [
    (lambda q, k, seq: (q[..., :48].contiguous(), k[..., :48].contiguous(), seq),
     r"head dim must be 32, 64, 128 or 256, got 48; use attention='sdpa'"),
    (lambda q, k, seq: (q, k, seq.long()), r"seq_lens must be a contiguous int32 \[rows\] tensor"),
    (lambda q, k, seq: (q, k[:, :1], seq), r"the cache has 1 heads, q has 2"),
    (lambda q, k, seq: (q.half(), k, seq), r"q, k_cache and v_cache must share a dtype"),
])
def test_decode_op_names_bad_arguments(change, message):
    q, k = torch.randn(3, 2, 64, device="cuda"), torch.randn(3, 2, 16, 64, device="cuda")
    seq_lens = torch.full((3,), 16, dtype=torch.int32, device="cuda")
    bad_q, bad_k, bad_seq = change(q, k, seq_lens)
    with pytest.raises(ValueError, match=message):
        decode_op()(bad_q, bad_k, bad_k, bad_seq, None)
