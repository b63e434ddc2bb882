"""IA3 on Conv2d/Conv3d (output and feed-forward, grouped included) against HF PEFT's ia3 conv layers."""

import copy

import pytest
import torch
from torch import nn

import peftc
from peftc.errors import SpecError

peft = pytest.importorskip("peft")


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.c3 = nn.Conv3d(8, 4, 1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        h = self.c3(h.unsqueeze(2).expand(-1, -1, 2, -1, -1))
        return self.head(h.mean((2, 3, 4)))


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("feedforward", [["c2"], ["c1", "c3"]])
def test_conv_ia3_matches_hf_outputs_merge_and_format(feedforward, tmp_path):
    torch.manual_seed(0)
    model = Convs().eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    target = ["c1", "c2", "c3", "head"]
    cm = peftc.compile(copy.deepcopy(model), peftc.IA3(target=target, feedforward=feedforward), kwargs=dict(x=x), dynamic=False)
    close(cm(x=x), model(x=x))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(target_modules=target,
                                                                  feedforward_modules=feedforward)).eval()
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p for n, p in pm.named_parameters()
              if p.requires_grad}
    ours = {p.name: p.tensor for p in cm.params if p.role == "adapter"}
    assert sorted(ours) == sorted(theirs) and all(ours[n].shape == theirs[n].shape for n in ours)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, t in ours.items():
            t.add_(torch.randn(t.shape, generator=g) * 0.3)
            theirs[n].copy_(t)
    y = cm(x=x)
    assert not torch.allclose(y, model(x=x), atol=1e-3)
    close(y, pm(x=x))
    merged = cm.merge()
    close(merged(x=x), y)
    hf_merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    for key, value in merged.state_dict().items():
        close(value, hf_merged[key])
    assert cm.save_pretrained(tmp_path / "ours") == "peft"
    close(peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()(x=x), y)
    pm.save_pretrained(str(tmp_path / "theirs"))
    close(peftc.compile(copy.deepcopy(model), tmp_path / "theirs", kwargs=dict(x=x), dynamic=False)(x=x), y)


def test_conv1d_ia3_is_refused_as_hf_has_none():
    model = nn.Sequential(nn.Conv1d(3, 4, 3))
    with pytest.raises(SpecError, match="Conv2d and Conv3d"):
        peftc.compile(model, peftc.IA3(target=["0"]), kwargs=dict(input=torch.randn(2, 3, 8)), dynamic=False)
