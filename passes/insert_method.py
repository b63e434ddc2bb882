"""insert-<method>: y = op(x, W)  ==>  forward(site, x, y, params), for each method written with peftc.Method."""

from __future__ import annotations

from dataclasses import dataclass
from torch.fx import GraphModule

from peftc.method import Method, insert_method
from peftc.pipeline import Pass, PassContext, PassResult, register_pass


@dataclass(frozen=True)
class InsertMethod(Pass):
    """insert-<method>: y = op(x, W)  ==>  method.forward(site, x, y, params) on every site the method selects.

    The base of the pass register_method makes for each method; it holds the method's rule, as insert-lora holds
    a LoRA. Parameters are added under `<module>.<name>` (shared ones under their own name) with the method's init;
    the forward is traced onto the graph's nodes, tagged with the pass, so a diff shows it op for op. The rewrite's
    output carries `meta["peftc.method"]`, which merge-reparam reads to fold the method's `merge` into W.
    """

    rule: Method

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, insert_method(gm, ctx, self.rule, self.name))


def method_pass(method: type[Method]) -> type[InsertMethod]:
    """Register `insert-<kind>` (underscores as dashes) for `method`."""
    name = "insert-" + method.kind.replace("_", "-")
    doc = (method.__doc__ or "").strip().splitlines()
    cls = type(f"Insert{method.__name__}", (InsertMethod,), {
        "__doc__": f"{name}: {doc[0] if doc else method.__name__} (a method written with peftc.Method)",
        "__module__": method.__module__,
        "__annotations__": {"rule": method},
        "name": name, "rule_type": method})
    return register_pass(dataclass(frozen=True)(cls))
