"""peftc's ONNX rewrite rules: what onnxscript's default optimizer leaves behind in peftc's graphs.

Each rule is an onnxscript pattern rewrite, named by what it means; `apply_rules` counts every hit.
"""

from __future__ import annotations


def _mul_by_reciprocal_sqrt(op, x, v):
    return op.Mul(x, op.Reciprocal(op.Sqrt(v)))


def _div_by_sqrt(op, x, v):
    return op.Div(x, op.Sqrt(v))


def _rules():
    from onnxscript.rewriter import pattern

    return [
        # x * rsqrt(v) ==> x / sqrt(v). torch.rsqrt (RMSNorm in Llama, Mistral, Qwen, Gemma) exports as
        # Reciprocal(Sqrt(v)); the Div form is one node less and the form onnxruntime's SimplifiedLayerNorm
        # fusion looks for.
        ("rsqrt-mul-to-div", pattern.RewriteRule(_mul_by_reciprocal_sqrt, _div_by_sqrt)),
    ]


def apply_rules(model) -> dict[str, int]:
    """Apply every rule to the onnx_ir model in place; returns rule name -> times it fired."""
    from onnxscript import rewriter

    counts: dict[str, int] = {}
    for name, rule in _rules():
        n = rewriter.RewriteRuleSet([rule], commute=True).apply_to_model(model)
        if n:
            counts[name] = n
    return counts
