"""`python benchmarks/snapshot_refcount_probe.py`: torch.cuda.memory_snapshot(mempool_id=...) drops a reference to
each item of the tuple it hands torch, the pool id's included, on every call (graphrunner/pool.py, Note [snapshots
that take no arguments]). Needs no GPU: the references go whether the call then succeeds or raises. Prints each
item's reference count before and after three calls; equal counts mean this torch no longer has the bug."""
import sys

import torch


def main() -> None:
    pool = (int("1000003"), int("1000033"))  # a pool id's items past 256 pools: ints of their own
    held = [*pool] * 10  # more references, so the dropped ones do not free the ints while they are read
    before = [sys.getrefcount(x) for x in pool]
    for _ in range(3):
        try:
            torch._C._cuda_memorySnapshot((pool[0], pool[1], False))
        except RuntimeError:  # some builds raise without a GPU, after dropping the references
            pass
    after = [sys.getrefcount(x) for x in pool]
    print(f"torch {torch.__version__}: references to the pool id's items before {before}, after three snapshots "
          f"{after} ({len(held)} held by this script)")


if __name__ == "__main__":
    main()
