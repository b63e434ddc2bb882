"""LoRA on nn.MultiheadAttention (peftc/lora_mha.py) against HF PEFT's lora.MultiheadAttention."""

import copy

import pytest
import torch
from torch import nn

import peftc

peft = pytest.importorskip("peft")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_mha_lora_matches_hf_peft_names_outputs_merge_and_format(tmp_path):
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    cm = peftc.compile(copy.deepcopy(model), peftc.LoRA(target=["attn"], r=2, alpha=4), kwargs=dict(x=x), dynamic=False)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["attn"], r=2,
                                                                   lora_alpha=4)).eval()
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p for n, p in pm.named_parameters()
              if p.requires_grad}
    ours = {p.name: p.tensor for p in cm.params if p.role == "adapter"}
    assert sorted(ours) == sorted(theirs) == ["attn.base_layer.out_proj.lora_A.weight",
                                              "attn.base_layer.out_proj.lora_B.weight", "attn.lora_A.weight",
                                              "attn.lora_B.weight"]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, t in ours.items():
            assert t.shape == theirs[n].shape
            t.add_(torch.randn(t.shape, generator=g) * 0.2)
            theirs[n].copy_(t)
    y = cm(x=x)
    assert not torch.allclose(y, model(x=x), atol=1e-3)
    # HF PEFT 0.21.2 applies the out_proj delta twice per call (it merges W + s·BA into out_proj's weight, then
    # out_proj.merge() adds s·BA again). peftc applies it once; with HF's out_proj B halved the two agree.
    with torch.no_grad():
        theirs["attn.base_layer.out_proj.lora_B.weight"].mul_(0.5)
    close(y, pm(x=x))
    reference = copy.deepcopy(model)  # the math: both fused weights plus s·BA
    with torch.no_grad():
        reference.attn.in_proj_weight += 2 * ours["attn.lora_B.weight"] @ ours["attn.lora_A.weight"]
        reference.attn.out_proj.weight += 2 * (ours["attn.base_layer.out_proj.lora_B.weight"]
                                               @ ours["attn.base_layer.out_proj.lora_A.weight"])
    close(y, reference(x=x))
    close(cm.merge()(x=x), y)
    assert cm.save_pretrained(tmp_path / "ours") == "peft"
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    assert sorted(n for n, _ in back.named_parameters() if "lora_" in n) == sorted(
        f"base_model.model.{k.replace('.weight', '.default.weight')}" for k in ours)
    with torch.no_grad():
        next(p for n, p in back.named_parameters() if "out_proj.lora_B" in n).mul_(0.5)  # HF's double out_proj
    close(back(x=x), y)
    pm.save_pretrained(str(tmp_path / "theirs"))
    again = peftc.compile(copy.deepcopy(model), tmp_path / "theirs", kwargs=dict(x=x), dynamic=False)
    loaded = {p.name: p.tensor for p in again.params if p.role == "adapter"}
    assert sorted(loaded) == sorted(theirs)
    for n, t in loaded.items():
        close(t, theirs[n])
    # out_proj alone: HF PEFT's swapped out_proj is never called; peftc's adapter changes the output
    alone = peftc.compile(copy.deepcopy(model), peftc.LoRA(target=["out_proj"], r=2), kwargs=dict(x=x), dynamic=False)
    with torch.no_grad():
        for p in alone.trainable_parameters():
            p.add_(0.3)
    assert not torch.allclose(alone(x=x), model(x=x), atol=1e-3)
