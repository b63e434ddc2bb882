"""Several adapters in one compiled model (peftc/adapters.py), each call checked against the real peft package.

Adapters "default" and "x" share a LoRA config (so "x" is bound into the compiled graphs' slots); "y" has another
rank and alpha (so it is served by graphs compiled for its configuration).
"""

import copy

import pytest
import torch

import peftc
import peftc.lower.eager as eager
from peftc.errors import AdapterError

from conftest import ids, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

ARCHS = {
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn"]),
    "bert": (tiny_bert, ["query", "value"]),
}
CONFIGS = {"default": dict(r=4, lora_alpha=8, seed=1), "x": dict(r=4, lora_alpha=8, seed=2),
           "y": dict(r=2, lora_alpha=16, seed=3)}


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def save_adapter(base, targets, directory, r, lora_alpha, seed):
    """An HF PEFT LoRA adapter with random (non-zero) A and B, saved to `directory`."""
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets,
                                                                  fan_in_fan_out=targets == ["c_attn"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(directory))
    return str(directory)


class Pair:
    """The same base and adapters in HF PEFT (`hf`) and peftc (`cm`)."""

    def __init__(self, arch, tmp, dynamic=False):  # dynamic: what an ONNX export with dynamic axes needs
        make, targets = ARCHS[arch]
        torch.manual_seed(0)
        base = make().eval()
        dirs = {n: save_adapter(base, targets, tmp / n, **c) for n, c in CONFIGS.items()}
        self.hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["default"]).eval()
        self.cm = peftc.compile(copy.deepcopy(base), dirs["default"], kwargs=dict(input_ids=ids()), dynamic=dynamic).eval()
        for n in ("x", "y"):
            self.hf.load_adapter(dirs[n], adapter_name=n)
            self.cm.load_adapter(dirs[n], name=n)
        self.dirs = dirs

    def agree(self, x=None, **kw):
        x = ids() if x is None else x
        with torch.no_grad():
            want, got = logits(self.hf(input_ids=x, **kw)), logits(self.cm(input_ids=x, **kw))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return got

    def set_adapter(self, names):
        self.hf.base_model.set_adapter(names)
        self.cm.set_adapter(names)


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request, tmp_path_factory):
    return Pair(request.param, tmp_path_factory.mktemp(request.param))


def test_load_switch_sum_disable_delete_agree_with_peft(pair):
    cm = pair.cm
    assert cm.adapter_names == ["default", "x", "y"] and cm.active_adapters == ["default"]
    outputs = {"default": pair.agree()}
    for names in ("x", "y", ["x", "y"], ["y", "default"], "default"):
        pair.set_adapter(names)
        assert cm.active_adapters == ([names] if isinstance(names, str) else names)
        outputs[str(names)] = pair.agree()
    assert not torch.allclose(outputs["x"], outputs["y"]) and not torch.allclose(outputs["x"], outputs["default"])
    pair.set_adapter("x")
    with pair.hf.disable_adapter(), cm.disable_adapters():
        base = pair.agree()
    assert not torch.allclose(base, outputs["x"])
    torch.testing.assert_close(pair.agree(), outputs["x"], atol=0, rtol=0)  # back to "x" after the block


def test_delete_adapter_agrees_with_peft(tmp_path):
    pair = Pair("llama", tmp_path)
    pair.set_adapter(["x", "y"])
    pair.hf.delete_adapter("x")
    pair.cm.delete_adapter("x")
    assert pair.cm.adapter_names == ["default", "y"] and pair.cm.active_adapters == pair.hf.active_adapters == ["y"]
    pair.agree()
    assert not any(k[-1] and "x" in k[-1][1] for k in pair.cm._graphs if k[-1] and len(k[-1]) > 1)
    assert not any(".x." in n for n, _ in pair.cm.named_parameters() if n.startswith("peftc_adapters."))
    with pytest.raises(AdapterError, match="no adapter named `x`"):
        pair.cm.set_adapter("x")


def test_mixed_batch_agrees_with_peft_and_with_each_sample_alone(pair):
    names = ["x", "y", "__base__", "default", "y"]
    x = ids(batch=len(names), seed=3)
    mixed = pair.agree(x, adapter_names=names)
    for k, name in enumerate(names):
        if name == "__base__":
            with pair.cm.disable_adapters(), torch.no_grad():
                alone = logits(pair.cm(input_ids=x[k:k + 2]))[:1]
        else:
            pair.cm.set_adapter(name)
            with torch.no_grad():
                alone = logits(pair.cm(input_ids=x[k:k + 2]))[:1]  # batch 2: a size-1 batch would specialize
        torch.testing.assert_close(mixed[k:k + 1], alone, atol=1e-5, rtol=1e-5)
    pair.cm.set_adapter("default")


def test_mixed_batch_is_a_gather_and_batched_matmul(pair):
    pair.cm(input_ids=ids(), adapter_names=["x", "y"])
    key = next(k for k in pair.cm._graphs if k[-1] == ("mixed", ("x", "y")))
    gm = pair.cm._graphs[key][0]
    assert "index_select" in gm.code and "bmm" in gm.code
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr" and "lora_" in n.target}
    assert read and all(t.startswith(("peftc_adapters.x.", "peftc_adapters.y.")) for t in read)


def test_switching_back_captures_nothing(tmp_path, monkeypatch):
    pair = Pair("llama", tmp_path)
    cm, x = pair.cm, ids()
    captures = []
    real = eager.capture
    monkeypatch.setattr(eager, "capture", lambda *a, **k: captures.append(1) or real(*a, **k))
    order = ["x", "default", "y", ["x", "y"], "disabled", "x", "y", ["x", "y"], "disabled", "default"]
    seen = []
    for names in order:
        before = len(captures)
        if names == "disabled":
            with cm.disable_adapters():
                cm(input_ids=x)
        else:
            cm.set_adapter(names)
            cm(input_ids=x)
        seen.append(len(captures) - before)
    # "x" and "default" share the compiled graphs (bound into the slots); y, x+y and disabled are captured once
    assert seen == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    cm(input_ids=x, adapter_names=["x", "y"])
    cm(input_ids=x, adapter_names=["y", "x"])
    assert len(captures) == 4


def test_only_active_adapters_train_and_gradients_agree_with_peft(tmp_path):
    pair = Pair("llama", tmp_path)
    hf, cm = pair.hf.train(), pair.cm.train()
    x = ids()
    for names in (["x", "y"], "y", "x"):
        pair.set_adapter(names)
        active = [names] if isinstance(names, str) else names
        hf_trainable = {n for n, p in hf.named_parameters() if p.requires_grad}
        assert {n.split("lora_")[1].split(".")[1] for n in hf_trainable} == set(active)
        bank = cm._adapter_bank.adapters
        want = {id(t) for n in active for t in bank[n].tensors.values()}
        assert {id(t) for t in cm.trainable_parameters()} == want
        assert {id(p) for p in cm.parameters() if p.requires_grad} == want
        hf.zero_grad()
        cm.zero_grad()
        hf(input_ids=x, labels=x).loss.backward()
        cm(input_ids=x, labels=x).loss.backward()
        grads = dict(hf.named_parameters())
        for n in active:
            for slot, t in bank[n].tensors.items():
                module, kind = slot.rsplit(".lora_", 1)
                ref = grads[f"base_model.model.{module}.lora_{kind.split('.')[0]}.{n}.weight"].grad
                torch.testing.assert_close(t.grad, ref, atol=1e-5, rtol=1e-4)
        for n in set(bank) - set(active):
            assert all(t.grad is None for t in bank[n].tensors.values())


def test_bound_adapter_is_what_state_dict_save_and_merge_read(tmp_path):
    pair = Pair("llama", tmp_path)
    cm = pair.cm
    pair.set_adapter("x")
    a = cm._adapter_bank.adapters["x"].tensors
    sd = cm.adapter_state_dict()
    assert sd.keys() == a.keys() and all(torch.equal(sd[k], a[k]) for k in a)
    with torch.no_grad():
        merged = logits(cm.merge()(input_ids=ids()))
    torch.testing.assert_close(merged, pair.agree(), atol=1e-5, rtol=1e-5)


def test_errors_name_the_problem(tmp_path):
    pair = Pair("llama", tmp_path)
    cm = pair.cm
    with pytest.raises(AdapterError, match="loaded already"):
        cm.load_adapter(pair.dirs["x"], name="x")
    with pytest.raises(AdapterError, match="no dots"):
        cm.load_adapter(pair.dirs["x"], name="x.y")
    with pytest.raises(AdapterError, match="one per sample"):
        cm(input_ids=ids(), adapter_names=["x", "y", "x"])
    with pytest.raises(AdapterError, match="no adapter named `c`"):
        cm(input_ids=ids(), adapter_names=["x", "c"])
    cm.train()
    with pytest.raises(AdapterError, match="inference"):
        cm(input_ids=ids(), adapter_names=["x", "y"])


def test_ia3_adapters_switch_and_disable_as_in_peft(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama().eval()
    config = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    dirs = {}
    for n, seed in (("default", 1), ("x", 2)):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**config))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "ia3_l" in name:
                    p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
        pm.save_pretrained(str(tmp_path / n))
        dirs[n] = str(tmp_path / n)
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["default"]).eval()
    hf.load_adapter(dirs["x"], adapter_name="x")
    cm = peftc.compile(copy.deepcopy(base), dirs["default"], kwargs=dict(input_ids=ids()), dynamic=False).eval()
    cm.load_adapter(dirs["x"], name="x")
    x = ids()

    def agree():
        with torch.no_grad():
            got, want = cm(input_ids=x).logits, hf(input_ids=x).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return got

    first = agree()
    hf.set_adapter("x")
    cm.set_adapter("x")
    assert not torch.allclose(agree(), first)
    with hf.disable_adapter(), cm.disable_adapters():
        agree()
    hf.base_model.set_adapter(["default", "x"])
    cm.set_adapter(["default", "x"])  # IA3 multiplies the active adapters' scalings, as HF PEFT does
    agree()
    with pytest.raises(AdapterError, match="ia3.*only for lora"):  # HF PEFT's IA3 ignores adapter_names
        cm(input_ids=x, adapter_names=["default", "x"])
    hf.delete_adapter("default")
    cm.delete_adapter("default")
    assert cm.adapter_names == ["x"] and cm.active_adapters == hf.active_adapters == ["x"]
    agree()


def test_generate_serves_the_bound_adapter_and_refuses_a_configuration_it_cannot(tmp_path):
    pair = Pair("llama", tmp_path)
    prompt = ids(batch=1, seq=4)
    pair.set_adapter("x")  # bound into the compiled slots: generate's graphs compute with it
    want = pair.hf.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(pair.cm.generate(input_ids=prompt, max_new_tokens=3, do_sample=False), want)
    pair.set_adapter(["default", "x"])
    with pytest.raises(AdapterError, match="cm.generate"):
        pair.cm.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
    with pair.cm.disable_adapter(), pytest.raises(AdapterError, match="adapters disabled"):
        pair.cm.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)


def test_a_call_scans_no_rules_for_regularizers(pair, monkeypatch):
    """Which loss terms a call adds is decided at compile and switch time (cm._regularizers), not per call."""
    import peftc.method

    monkeypatch.setattr(peftc.method, "add_regularizers", lambda *a: pytest.fail("scanned rules in a call"))
    assert pair.cm._regularizers == ()
    for names in ("x", ["x", "y"], "default"):
        pair.set_adapter(names)
        assert pair.cm._regularizers == ()
        pair.agree()
