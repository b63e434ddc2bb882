"""Tiny models and helpers shared by tests/test_sparse_delta.py and tests/test_lora_variants.py."""

import torch


from conftest import ids, tiny_gpt2, tiny_llama  # noqa: F401  (re-exported for the variants tests)


def grads_of(params):
    """{name: grad} for every parameter that received a gradient."""
    return {n: p.grad for n, p in params if p.grad is not None}


class Captured:
    """One capture of a model, from which each test runs a fresh pipeline: capturing is the slow part (seconds),
    the passes are fast, so property tests capture once and rewrite many times."""

    def __init__(self, model, kwargs, training=False, dynamic=True):
        from peftc.capture import ModelInfo, call_kwargs, capture
        from peftc.params import ParamTable

        model.train(training)
        self.model, self.training = model, training
        self.kwargs = call_kwargs(model, kwargs)
        self.table = ParamTable()
        self.gm = capture(model, (), self.kwargs, self.table, dynamic=dynamic)
        self.info = ModelInfo.of(model)

    def rewrite(self, spec):
        """(GraphModule, PassContext) after the spec's default pipeline, with the verifier after every pass."""
        import copy

        from torch.fx import GraphModule

        from peftc import Pipeline, Spec
        from peftc.instrument import Verify
        from peftc.params import ParamTable
        from peftc.pipeline import PassContext

        table = ParamTable()
        for p in self.table:
            table.adopt(p.name, p.tensor, p.role)
        gm = GraphModule(self.gm, copy.deepcopy(self.gm.graph), class_name=self.gm.__class__.__name__)
        ctx = PassContext(table, self.info, training=self.training)
        spec = spec if isinstance(spec, Spec) else Spec(spec)
        gm = Pipeline.for_spec(spec).run(gm, ctx, [Verify()])
        return gm, ctx

    def logits(self, gm=None):
        out = (gm or self.model)(**self.kwargs)
        return out if isinstance(out, torch.Tensor) else out.logits


def probe(shape, seed=1):
    """A fixed random cotangent: loss = (logits * probe).sum() exercises every output element."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
