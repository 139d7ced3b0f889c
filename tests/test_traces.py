"""The benchmark's trace contenders (graphrunner.workloads.traces) run the steps they claim to run."""
import torch

from conftest import gpu
from graphrunner.workloads.decoder import DecoderConfig
from graphrunner.workloads.traces import Contenders

TINY = DecoderConfig(layers=2, hidden=256, heads=4, head_dim=64, intermediate=512, vocab=1000, cache_len=64,
                     max_batch_size=16)


@gpu
def test_bare_replays_run_their_own_steps_while_the_allocator_reuses_freed_memory():
    """A bare graph reads the padded inputs it was captured on. Without the compiled contenders nothing but the
    contenders themselves keeps those inputs alive, so after memory is handed out again (filled with other valid
    ids and positions), each bare replay must still write the KV cache entries the runner writes for its step."""
    batches = [3, 5, 11]
    with torch.no_grad():
        contenders = Contenders(TINY, batches, compiled=False, gen=torch.Generator(device="cuda").manual_seed(0))
        try:
            steps = contenders.step_functions(contenders.steps)
            # Small blocks, as the padded inputs' were: freed ones would now hold ones, not the steps' values.
            reused = [torch.ones(64, dtype=torch.long, device="cuda") for _ in range(2000)]
            cache = contenders.model.k_cache
            # Not the cache as set-up left it: preparing the bare graphs ran step 0 eagerly, which wrote what
            # step 0's replays write.
            start = torch.randn_like(cache)
            for i in range(len(batches)):
                cache.copy_(start)
                steps["bare"](i)
                bare = cache.clone()
                cache.copy_(start)
                steps["run"](i)
                torch.cuda.synchronize()
                assert not torch.equal(bare, start), f"step {i}: the bare replay wrote nothing"
                torch.testing.assert_close(bare, cache, msg=lambda m: f"step {i} (batch {batches[i]}): {m}")
            del reused
        finally:
            contenders.close()
