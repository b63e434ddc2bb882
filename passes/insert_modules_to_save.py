"""insert-modules-to-save: p = get_attr(<module>.<leaf>)  ==>  p + delta, for each parameter of the chosen modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch.fx import GraphModule

from peftc.errors import SpecError
from peftc.match import _matches
from peftc.pipeline import Pass, PassContext, PassResult, register_pass
from peftc.spec import ModulesToSave

from .insert_norm_tuning import insert_dense_deltas


def enclosing_modules(name: str) -> list[str]:
    """`a.b.weight` ==> [`a`, `a.b`]: the modules a parameter belongs to, outermost first."""
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@register_pass
@dataclass(frozen=True)
class InsertModulesToSave(Pass):
    """insert-modules-to-save: p = get_attr(<module>.<leaf>)  ==>  p + delta, delta `<module>.modules_to_save.<leaf>`.

    HF PEFT's `modules_to_save`: every parameter of each module `target` selects, and of its submodules, trains in
    full. The base tensor stays frozen and as it was; `p + delta` (delta zero at init) is the trainable copy, which
    gets the same gradient and the same optimizer steps as HF PEFT's copy, and is what saving writes
    (`<module>.<leaf>`, PEFT's key). A merge folds it back into p.
    """

    name: ClassVar[str] = "insert-modules-to-save"
    rule_type: ClassVar[type] = ModulesToSave
    rule: ModulesToSave

    def selects(self, name: str) -> bool:
        modules = enclosing_modules(name)
        exclude = self.rule.exclude
        return any(_matches(self.rule.target, m) for m in modules) and \
            not (exclude is not None and any(_matches(exclude, m) for m in modules))

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        names = [alias for aliases in ctx.info.aliases.values() for alias in aliases]
        if not any(self.selects(n) for n in names):
            modules = sorted({m for n in names for m in enclosing_modules(n)})
            heads = [m for m in modules if "." not in m]
            raise SpecError(f"{self.rule!r}: target={self.rule.target!r} selects no module with parameters; "
                            f"top-level modules: {', '.join(heads)}")
        return insert_dense_deltas(gm, ctx, self, "modules_to_save", self.selects, what="module parameter",
                                   by_rule=False)
