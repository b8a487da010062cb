"""Sequence parallelism: one stream over N GPUs (or N gloo processes on a CPU).

- `ulysses`: the all-to-all around attention (tokens split across ranks, heads split
  inside attention), applied to a built `WanModel` from outside, and the sharded caches.
- `plane`: the one control plane: rank 0 broadcasts each block's inputs before the block;
  the other ranks follow.
- `launch`: starting the ranks (`--gpus N`), the process group, and faults (a rank that
  dies or hangs ends the run with a message naming it).

The stream session stays plain: it is handed a model whose attention happens to be
distributed, and a cache holding only this rank's heads.
"""
