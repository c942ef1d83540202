"""The public ops: one torch.library custom op per op, dispatching to the Triton or CUDA primitives."""
