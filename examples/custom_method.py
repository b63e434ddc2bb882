"""A method peftc does not ship, in a few lines: LoRA with a learned per-rank gate, y + s·B(g ⊙ A x).

Run: .venv/bin/python examples/custom_method.py [out_dir]. It trains, merges and exports to ONNX.
"""

import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftc


@peftc.register_method
class GatedLoRA(peftc.Method):
    """gated_lora: y = W x  ==>  y + s·B(g ⊙ A x); g starts at 1, B at 0."""

    kind = "gated_lora"
    r: int = 8
    alpha: float = 16.0

    def params(self, site):
        return {"lora_A.weight": peftc.Param((self.r, site.in_features), init="kaiming_uniform"),
                "lora_B.weight": peftc.Param((site.out_features, self.r), init="zeros"),
                "lora_gate": peftc.Param((self.r,), init="ones")}

    def delta(self, p):
        return p["lora_B.weight"] @ (p.lora_gate[:, None] * p["lora_A.weight"]) * (self.alpha / self.r)

    def forward(self, site, x, y, p):
        return y + site.apply(x, self.delta(p))

    def merge(self, site, w, p):
        return w + self.delta(p)


def main(out_dir: str) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 64, (2, 8))
    cm = peftc.compile(model, GatedLoRA(target="q_proj|v_proj", r=4), kwargs={"input_ids": ids, "labels": ids})
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = cm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    merged = cm.merge()  # the gate and B·A folded into W: the plain model's graph
    report = merged.export_onnx(f"{out_dir}/gated_lora.onnx", merged=False)  # already merged: export as it is
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; merged and exported: {report.path}")
    return {"losses": losses, "cm": cm, "merged": merged, "report": report, "ids": ids}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
