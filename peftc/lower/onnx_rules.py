"""peftc's ONNX rewrite rules: what onnxscript's default optimizer leaves behind in peftc's graphs.

Each rule is an onnxscript pattern rewrite, named by what it means; `apply_rules` counts every hit.
"""

from __future__ import annotations

RULES: list = []


def apply_rules(model) -> dict[str, int]:
    """Apply every rule to the onnx_ir model in place; returns rule name -> times it fired."""
    from onnxscript import rewriter

    counts: dict[str, int] = {}
    for name, rule in RULES:
        n = rewriter.RewriteRuleSet([rule]).apply_to_model(model)
        if n:
            counts[name] = n
    return counts
