"""Helpers shared by driver tests (not a test module)."""

import torch

from lowbit.arch import get_blocks, spec_for


def last_block_output(model, windows):
    out = []
    h = get_blocks(model, spec_for(model))[-1].register_forward_hook(
        lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    h.remove()
    return out[0]


class Visitor:
    """A driver visitor that calls ``fn(ctx, group, stats)`` for every group and changes
    nothing else."""

    def __init__(self, fn, want=frozenset({"hessian"})):
        self.fn, self.want = fn, want

    def transform(self, ctx):
        pass

    def wants(self, ctx, group):
        return self.want

    def round(self, ctx, group, stats):
        self.fn(ctx, group, stats)

    def replace(self, ctx):
        return False

    def finish(self, ctx):
        pass
