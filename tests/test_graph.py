"""graphrunner.Graph: the C++ lifecycle in a shared PyTorch pool."""
import pytest
import torch

import graphrunner as gr
from conftest import gpu, segments, segments_since

pytestmark = gpu


def rand(*shape):
    return torch.randn(*shape, device="cuda")


def test_captured_output_equals_eager_on_fresh_inputs():
    x, w = rand(64, 128), rand(128, 32)
    torch.relu(x @ w)  # warm-up: cuBLAS makes its handle and workspace outside the capture
    g = gr.Graph()
    with g.capture():
        y = torch.relu(x @ w) + 1
    assert g.captured and g.num_nodes >= 2
    for _ in range(3):
        x.copy_(rand(64, 128))
        y.fill_(float("nan"))
        g.replay()
        torch.testing.assert_close(y, torch.relu(x @ w) + 1)


def test_two_graphs_one_pool_and_kept_output_untouched():
    pool = torch.cuda.graph_pool_handle()
    x = rand(4096)
    a, b = gr.Graph(), gr.Graph()
    with a.capture(pool=pool):
        ya = x * 3
    a.replay()
    torch.cuda.synchronize()
    kept = ya.clone()
    with b.capture(pool=a):  # a Graph names its pool too
        tmp = x.sin() * 2
        yb = tmp + 1
        del tmp
    assert tuple(a.pool) == tuple(b.pool) == tuple(pool)
    for _ in range(3):
        b.replay()
    torch.cuda.synchronize()
    assert torch.equal(ya, kept), "graph B's capture or replay wrote into graph A's live output"
    torch.testing.assert_close(yb, x.sin() * 2 + 1)


def test_mempool_object_is_accepted():
    pool = torch.cuda.MemPool()
    x = rand(1000)
    g = gr.Graph()
    with g.capture(pool=pool):
        y = x.exp()
    x.copy_(rand(1000))
    g.replay()
    torch.testing.assert_close(y, x.exp())
    assert tuple(g.pool) == tuple(pool.id)


def test_rng_differs_across_replays_and_matches_distribution():
    probs = torch.tensor([0.1, 0.2, 0.7], device="cuda")
    g = gr.Graph()
    with g.capture():
        u = torch.rand(1 << 16, device="cuda")
        m = torch.multinomial(probs, 4096, replacement=True)
    draws, picks = [], []
    for _ in range(4):
        g.replay()
        draws.append(u.clone())
        picks.append(m.clone())
    assert all(not torch.equal(draws[0], d) for d in draws[1:]), "RNG repeated across replays"
    allu = torch.stack(draws)
    assert abs(allu.mean().item() - 0.5) < 0.01 and abs(allu.var().item() - 1 / 12) < 0.005
    freq = torch.bincount(torch.cat(picks), minlength=3).float() / (4 * 4096)
    torch.testing.assert_close(freq.cpu(), torch.tensor([0.1, 0.2, 0.7]), atol=0.02, rtol=0)


def test_rng_follows_manual_seed():
    g = gr.Graph()
    with g.capture():
        u = torch.rand(1024, device="cuda")
    torch.cuda.manual_seed(1234)
    g.replay()
    first = u.clone()
    torch.cuda.manual_seed(1234)
    g.replay()
    assert torch.equal(first, u)


def test_shares_pool_with_torch_cuda_graph():
    pool = torch.cuda.graph_pool_handle()
    x = rand(2048)
    ours = gr.Graph()
    with ours.capture(pool=pool):
        y_ours = x * 2
    theirs = torch.cuda.CUDAGraph()
    with torch.cuda.graph(theirs, pool=pool):
        y_theirs = x + 5
    for _ in range(2):
        x.copy_(rand(2048))
        ours.replay()
        theirs.replay()
        torch.testing.assert_close(y_ours, x * 2)
        torch.testing.assert_close(y_theirs, x + 5)


def test_reserved_memory_returns_after_reset(fresh_memory):
    x = rand(1 << 20)
    (x * 2).exp()  # warm-up: whatever these ops make lazily exists before we measure
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    start, before = torch.cuda.memory_reserved(), segments()
    graphs, outs = [], []
    pool = torch.cuda.graph_pool_handle()
    for i in range(4):
        g = gr.Graph()
        with g.capture(pool=pool):
            outs.append((x * (i + 1)).exp() + 1)
        graphs.append(g)
    assert torch.cuda.memory_reserved() > start
    for g in graphs:
        g.reset()
    del graphs, outs, g
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() == start, segments_since(before)


def test_errors_replay_before_capture_and_after_reset():
    g = gr.Graph()
    with pytest.raises(gr.GraphStateError, match="replay\\(\\) before capture"):
        g.replay()
    x = rand(8)
    with g.capture():
        x.add_(1)
    g.reset()
    with pytest.raises(gr.GraphStateError, match="after reset"):
        g.replay()


def test_capture_inside_a_capture():
    outer, inner = gr.Graph(), gr.Graph()
    with pytest.raises(gr.GraphStateError, match="capture inside a capture"):
        with outer.capture():
            with inner.capture():
                pass
    assert not outer.capturing and not outer.captured


def test_failing_op_during_capture_aborts_cleanly(fresh_memory):
    x = rand(16)
    torch.cuda.synchronize()
    start, before = torch.cuda.memory_reserved(), segments()
    g = gr.Graph()
    with pytest.raises(RuntimeError, match="(?i)capture|not permitted"):
        with g.capture():
            y = x * 2
            y.sum().item()  # a host sync is illegal while capturing
    assert not g.capturing and not g.captured
    z = x + 1  # the default and side streams work again
    torch.cuda.synchronize()
    torch.testing.assert_close(z, x + 1)
    with g.capture():  # and the same object can capture afterwards
        w = x * 4
    g.replay()
    torch.testing.assert_close(w, x * 4)
    g.reset()
    del y, w, z
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() == start, segments_since(before)


def test_keyboard_interrupt_during_capture_aborts():
    g = gr.Graph()
    with pytest.raises(KeyboardInterrupt):
        with g.capture():
            rand(4) * 2
            raise KeyboardInterrupt
    assert not g.capturing
    torch.cuda.synchronize()


def test_debug_dump_needs_keep_graph(tmp_path):
    x = rand(8)
    kept = gr.Graph(keep_graph=True)
    with kept.capture():
        x.mul_(2)
    path = tmp_path / "graph.dot"
    kept.debug_dump(str(path))
    assert path.read_text().startswith("digraph")
    dropped = gr.Graph()
    with dropped.capture():
        x.mul_(2)
    with pytest.raises(gr.GraphStateError, match="keep_graph=True"):
        dropped.debug_dump(str(path))


def test_legacy_default_stream_is_refused():
    g = gr.Graph()
    with pytest.raises(gr.GraphStateError, match="legacy default stream"):
        with g.capture(stream=torch.cuda.default_stream()):
            pass


def test_capture_modes():
    x = rand(8)
    for mode in ("global", "thread_local", "relaxed"):
        g = gr.Graph()
        with g.capture(capture_error_mode=mode):
            y = x + 1
        g.replay()
        torch.testing.assert_close(y, x + 1)
    with pytest.raises(ValueError, match="capture_error_mode must be"):
        with gr.Graph().capture(capture_error_mode="loose"):
            pass


def _captured(pool, make, instantiate):
    """A kept graph of make()'s work, and what it returns."""
    g = gr.Graph(keep_graph=True)
    with g.capture(pool=pool, instantiate=instantiate):
        out = make()
    return g, out


def test_graphs_of_one_structure_share_one_executable_and_reset_in_any_order():
    """Note [shared executables]: the first graph instantiates; the others, never instantiated, share its executable
    through cudaGraphExecUpdate, and each replay loads its own parameters first. Replays of different graphs queue
    without a sync; every graph gives its executable up in any order and the last one destroys it. Each graph has
    a pool of its own: in one pool a graph's scratch may be another's output, which a later replay of the first
    overwrites (outputs of a shared pool hold only until the next replay)."""
    xs = [rand(4096) for _ in range(3)]
    graphs, ys = zip(*[_captured(torch.cuda.graph_pool_handle(), lambda x=x: torch.tanh(x) * 2 + 1, i == 0)
                       for i, x in enumerate(xs)])
    owner, *tenants = graphs
    assert len({g.structure() for g in graphs}) == 1 and isinstance(owner.structure(), bytes)
    for t in tenants:
        assert t.captured and not t.executable
        with pytest.raises(gr.GraphStateError, match=r"no executable yet; call instantiate\(\) or share\(\) first"):
            t.replay()
        assert t.share(owner)
    assert all(g.shares_exec and g.executable for g in graphs) and len({g.exec_handle for g in graphs}) == 1

    def replay_in(order):
        want = {}
        for k in order:  # queued back to back: each update leaves the launches before it as they were
            xs[k].normal_()
            ys[k].fill_(float("nan"))
            graphs[k].replay()
            want[k] = torch.tanh(xs[k]) * 2 + 1
        torch.cuda.synchronize()
        for k, expected in want.items():
            torch.testing.assert_close(ys[k], expected)

    replay_in([0, 1, 2, 2, 1, 0, 2])
    owner.reset()  # the tenants keep the executable
    assert not owner.captured and all(t.shares_exec for t in tenants)
    replay_in([1, 2, 1])
    tenants[0].reset()
    assert not tenants[1].shares_exec  # the last one holds it alone now
    replay_in([2])
    tenants[1].reset()


def test_a_graph_the_driver_cannot_update_to_or_that_draws_random_numbers_instantiates_its_own():
    pool = torch.cuda.graph_pool_handle()
    x = rand(4096)
    owner, _ = _captured(pool, lambda: torch.tanh(x) * 2, True)
    longer, y = _captured(pool, lambda: torch.tanh(x).sin() * 2, False)  # one node more: the topology differs
    assert longer.structure() != owner.structure()
    assert not longer.share(owner) and not longer.executable
    longer.instantiate()
    x.normal_()
    longer.replay()
    torch.testing.assert_close(y, torch.tanh(x).sin() * 2)
    assert not longer.shares_exec and not owner.shares_exec
    drawn, _ = _captured(pool, lambda: torch.tanh(x) * torch.rand_like(x), False)
    random_owner, _ = _captured(pool, lambda: torch.tanh(x) * torch.rand_like(x), True)
    assert not drawn.share(random_owner)  # RNG state is per graph: never shared
    drawn.instantiate()
    with pytest.raises(gr.GraphStateError, match=r"share\(\) needs a graph captured with "
                                                 r"capture_end\(instantiate=False\)"):
        drawn.share(random_owner)


def test_structure_tells_kernels_and_shapes_apart():
    pool = torch.cuda.graph_pool_handle()
    small, large = rand(256), rand(1 << 20)
    tanh_small, _ = _captured(pool, lambda: torch.tanh(small), True)
    tanh_small_again, _ = _captured(pool, lambda: torch.tanh(small.clone()), True)
    tanh_large, _ = _captured(pool, lambda: torch.tanh(large), True)
    sin_small, _ = _captured(pool, lambda: torch.sin(small), True)
    assert tanh_small.structure() != tanh_large.structure()  # another grid
    assert tanh_small.structure() != sin_small.structure()  # another kernel, same launch shape
    assert tanh_small.structure() != tanh_small_again.structure()  # a copy node more
    assert _captured(pool, lambda: torch.tanh(small + 0), True)[0].structure() == \
        _captured(pool, lambda: torch.tanh(small + 1), True)[0].structure()  # only a value differs
