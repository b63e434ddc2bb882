"""Several active OFT and BOFT adapters (insert-adapters nests their weight rewrites) against the real peft package.

HF PEFT 0.21's OFT layer rotates x by each active adapter in turn (x·R_1·R_2, then W); its BOFT layer multiplies
the rotations into M_2·M_1 and the scales into s_1·s_2. peftc rewrites the weight instead, so it nests the
rewrites: OFT W·R_2ᵀ·R_1ᵀ, BOFT s_1·s_2·W·M_1ᵀ·M_2ᵀ. Adapters "default" and "x" share a config (x binds into the
compiled slots), "y" has another block size (a structure of its own). Outputs and gradients agree with HF PEFT's
same calls within 1e-5 on Llama. HF PEFT has no OFT for GPT-2's Conv1D: there two active OFT adapters agree with
merging one adapter into the base and compiling the other on top. Several COFT adapters project their own tensors
before each call, as HF PEFT's forward does. Merge and an unmerged ONNX export of several active adapters are
refused (AdapterError; adapters="inputs" takes LoRA only: ExportError).
"""

import copy

import pytest
import torch

import peftc
from peftc.errors import AdapterError, PeftcError

from conftest import ids, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

# (method, model) ==> PEFT config of "default" and "x", of "y"
CASES = {
    ("oft", "llama"): (dict(cls="OFTConfig", r=0, oft_block_size=8), dict(oft_block_size=4)),
    ("boft", "llama"): (dict(cls="BOFTConfig", boft_block_size=4), dict(boft_block_size=8)),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]
ORDERS = [["default", "x"], ["x", "default"], ["y", "default", "x"]]


def save_adapter(base, config, directory, seed):
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:  # BOFT's scale around 1, the rotations' parameters around 0
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "boft_s" in name else 0.0))
    pm.save_pretrained(str(directory))
    return str(directory)


def hf_live(slot: str, adapter: str) -> str:
    """A slot's live parameter in HF PEFT's model: `...oft_R.weight` ==> `...oft_R.<adapter>.weight`."""
    stem = slot.removesuffix(".weight")
    return f"base_model.model.{stem}.{adapter}" + (".weight" if stem != slot else "")


class Models:
    def __init__(self, method, arch, tmp):
        torch.manual_seed(0)
        self.base = base = tiny_llama(num_hidden_layers=1).eval()
        shared, other = CASES[method, arch]
        cls = getattr(peft, shared["cls"])
        options = {k: v for k, v in shared.items() if k != "cls"}
        configs = {"default": options, "x": options, "y": {**options, **other}}
        dirs = {n: save_adapter(base, cls(target_modules=TARGETS, **c), tmp / n, seed)
                for seed, (n, c) in enumerate(configs.items(), 1)}
        self.hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["default"]).eval()
        self.cm = peftc.compile(copy.deepcopy(base), dirs["default"], kwargs=dict(input_ids=ids()),
                                dynamic=False).eval()
        for n in ("x", "y"):
            self.hf.load_adapter(dirs[n], adapter_name=n)
            self.cm.load_adapter(dirs[n], name=n)

    def set_adapter(self, names):
        self.hf.base_model.set_adapter(names)
        self.cm.set_adapter(names)


@pytest.fixture(scope="module", params=list(CASES), ids=lambda c: "-".join(c))
def models(request, tmp_path_factory):
    return Models(*request.param, tmp_path_factory.mktemp("-".join(request.param)))


def test_outputs_agree_with_peft_in_every_order(models):
    got = {}
    for names in ORDERS:
        models.set_adapter(names)
        assert models.cm.active_adapters == names
        with torch.no_grad():
            want, got[tuple(names)] = models.hf(input_ids=ids()).logits, models.cm(input_ids=ids()).logits
        torch.testing.assert_close(got[tuple(names)], want, atol=1e-5, rtol=1e-5)
    # the rotations do not commute: the order is part of what is checked
    assert (got[("default", "x")] - got[("x", "default")]).abs().max() > 1e-3
    models.set_adapter("default")


def test_only_active_adapters_train_and_gradients_agree_with_peft(models):
    hf, cm = models.hf.train(), models.cm.train()
    bank = cm._adapter_bank.adapters
    for names in (["default", "x"], ["y", "x"]):
        models.set_adapter(names)
        want = {id(t) for n in names for k, t in bank[n].tensors.items() if bank[n].trains[k]}
        assert {id(t) for t in cm.trainable_parameters()} == want
        assert sum(t.numel() for t in cm.trainable_parameters()) == \
            sum(p.numel() for p in hf.parameters() if p.requires_grad)
    x = ids()
    hf.zero_grad()
    cm.zero_grad()
    hf(input_ids=x, labels=x).loss.backward()
    cm(input_ids=x, labels=x).loss.backward()  # a training graph, training passes included
    live = dict(hf.named_parameters())
    for n in names:
        for slot, t in bank[n].tensors.items():
            torch.testing.assert_close(t.grad, live[hf_live(slot, n)].grad, atol=1e-5, rtol=1e-4)
    assert all(t.grad is None for t in bank["default"].tensors.values())
    cm.zero_grad()
    hf.eval(), cm.eval()
    models.set_adapter("default")


def test_merge_and_an_unmerged_export_of_several_are_refused(models, tmp_path):
    cm = models.cm
    models.set_adapter(["default", "x"])
    with pytest.raises(AdapterError, match="active adapters \\['default', 'x'\\]"):
        cm.merge()
    with pytest.raises(AdapterError, match="active adapters"):
        cm.export_onnx(tmp_path / "m.onnx", merged=False, dynamic=False)
    with pytest.raises(PeftcError, match="LoRA A/B only"):  # the one file all adapters' files feed: LoRA only
        cm.export_onnx(tmp_path / "m.onnx", merged=False, adapters="inputs", dynamic=False)
    assert not (tmp_path / "m.onnx").exists()
    models.set_adapter("default")


def test_gpt2_several_oft_agree_with_merging_one_under_the_other(tmp_path):
    """OFT on GPT-2's Conv1D (W stored (in, out)): set_adapter(["default", "b"]) computes op(x, W·R_bᵀ·R_defaultᵀ),
    which is b merged into the base with default compiled on top."""
    torch.manual_seed(0)
    base, kwargs = tiny_gpt2(n_layer=1).eval(), dict(input_ids=ids())
    spec = peftc.OFT(target=["c_attn", "c_fc"], oft_block_size=8)
    cm = peftc.compile(copy.deepcopy(base), spec, kwargs=kwargs, dynamic=False).eval()
    weights = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        weights.append({k: torch.randn(v.shape, generator=g) * 0.2 for k, v in cm.adapter_state_dict().items()})
    cm.load_adapter_state_dict(weights[1])
    cm.save_pretrained(tmp_path / "b")
    b_merged = cm.merge_and_unload()
    cm.load_adapter_state_dict(weights[0])
    cm.load_adapter(tmp_path / "b", name="b")
    cm.set_adapter(["default", "b"])
    default_on_b = peftc.compile(b_merged, spec, kwargs=kwargs, dynamic=False).eval()
    default_on_b.load_adapter_state_dict(weights[0])
    with torch.no_grad():
        torch.testing.assert_close(cm(**kwargs).logits, default_on_b(**kwargs).logits, atol=1e-5, rtol=1e-5)


def test_several_coft_adapters_project_their_own_tensors_as_peft_does(tmp_path):
    """COFT: HF PEFT's forward projects each active adapter's oft_R in place before rotating by it; peftc's
    before-call hook does the same on each active adapter's own tensors, so training steps from the same values."""
    torch.manual_seed(0)
    base = tiny_llama(num_hidden_layers=1).eval()
    config = peft.OFTConfig(target_modules=["q_proj", "v_proj"], r=0, oft_block_size=8, coft=True, eps=0.3)
    dirs = {n: save_adapter(base, config, tmp_path / n, seed) for seed, n in enumerate(("default", "x"), 1)}
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["default"]).eval()
    cm = peftc.compile(copy.deepcopy(base), dirs["default"], kwargs=dict(input_ids=ids()), dynamic=False).eval()
    hf.load_adapter(dirs["x"], adapter_name="x")
    cm.load_adapter(dirs["x"], name="x")
    names = ["x", "default"]
    hf.base_model.set_adapter(names)
    cm.set_adapter(names)
    bank, live = cm._adapter_bank.adapters, dict(hf.named_parameters())
    before = {(n, k): t.detach().clone() for n in names for k, t in bank[n].tensors.items()}
    for step in range(2):
        want, got = hf(input_ids=ids()).logits, cm(input_ids=ids()).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for n in names:
            for slot, t in bank[n].tensors.items():
                torch.testing.assert_close(t, live[hf_live(slot, n)], atol=1e-6, rtol=0)
                assert step or (t - before[n, slot]).abs().max() > 1e-3  # the first call projected it
        want.square().mean().backward()
        got.square().mean().backward()
        with torch.no_grad():
            for t in [*cm.trainable_parameters(), *(p for p in hf.parameters() if p.requires_grad)]:
                t -= 0.5 * t.grad
                t.grad = None


def test_a_rewritten_weight_is_still_its_site():
    """What lets insert-adapters nest rewrites: OFT's W' = W·Rᵀ is still W's matmul site, so a rule after OFT finds
    it (LoRA after OFT on one module computes what LoRA before OFT does: linear(x, W·Rᵀ) + s·B(A x))."""
    torch.manual_seed(0)
    base, kwargs = tiny_llama(num_hidden_layers=1).eval(), dict(input_ids=ids())
    oft, lora = peftc.OFT(target=["q_proj"], oft_block_size=8), peftc.LoRA(target=["q_proj"], r=2)
    outputs = []
    for rules in ((oft, lora), (lora, oft)):
        cm = peftc.compile(copy.deepcopy(base), peftc.Spec(*rules), kwargs=kwargs, dynamic=False).eval()
        g = torch.Generator().manual_seed(1)
        cm.load_adapter_state_dict({k: torch.randn(v.shape, generator=g) * 0.2
                                    for k, v in sorted(cm.adapter_state_dict().items())})
        with torch.no_grad():
            outputs.append(cm(**kwargs).logits)
            if rules[0] is oft:  # LoRA's merge adds s·B A to OFT's W' = W·Rᵀ
                torch.testing.assert_close(cm.merge()(**kwargs).logits, outputs[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert (outputs[0] - base(**kwargs).logits).abs().max() > 1e-3
