"""AdaLoRA (peftc/methods/adalora.py) against HF PEFT with identical weights: trainable count, keys, outputs, loss
with the orthogonality penalty, gradients, merge; and the rank allocation of a few training steps, step for step."""

from __future__ import annotations

import copy

import pytest
import torch

import peftc
from conftest import ids, tiny_llama
from test_methods_hf import _ops, hf_key, plain_ops

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=6, deltaT=1, beta1=0.8, beta2=0.7,
                lora_alpha=8)


def twins(seed=0, **options):
    """peftc's and HF PEFT's AdaLoRA on one tiny Llama, with the same non-zero adapter weights."""
    torch.manual_seed(seed)
    base = tiny_llama(num_hidden_layers=1).eval()
    x = ids()
    cm = peftc.compile(copy.deepcopy(base), peftc.AdaLoRA(target=TARGETS, **{**SCHEDULE, **options}),
                       kwargs={"input_ids": x, "labels": x}, dynamic=False)
    # task_type: HF's plain PeftModel.forward calls the base model directly, skipping AdaLoraModel.forward, where
    # the orthogonality penalty is added; PeftModelForCausalLM goes through it
    hf = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM",
                                                                     **{**SCHEDULE, **options})).eval()
    hf_state = peft.get_peft_model_state_dict(hf)
    ours = cm.adapter_state_dict()
    assert {hf_key(k, hf_state): tuple(v.shape) for k, v in ours.items()} == \
        {k: tuple(v.shape) for k, v in hf_state.items()}
    assert cm.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    torch.manual_seed(1)
    weights = {k: torch.randn_like(v) * 0.3 for k, v in ours.items()}
    cm.load_adapter_state_dict(weights)
    peft.set_peft_model_state_dict(hf, {hf_key(k, hf_state): v for k, v in weights.items()})
    return base, cm, hf, hf_state


def hf_param(hf, name):
    return hf.get_parameter(f"base_model.model.{name}.default")


def test_adalora_is_identity_at_init():
    torch.manual_seed(0)
    base = tiny_llama(num_hidden_layers=1).eval()
    cm = peftc.compile(base, peftc.AdaLoRA(target=TARGETS, **SCHEDULE), kwargs={"input_ids": ids()}, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(cm(input_ids=ids()).logits, base(input_ids=ids()).logits, atol=0, rtol=0)


def test_adalora_matches_hf_outputs_loss_grads_and_merge():
    base, cm, hf, hf_state = twins()
    x = ids(seed=2)
    ours, theirs = cm(input_ids=x, labels=x), hf(input_ids=x, labels=x)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    plain = base(input_ids=x, labels=x).loss
    # the orthogonality penalty is in the loss, as in HF PEFT's forward
    assert ours.loss - plain > 0.1
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    for p in cm.params:
        if p.trainable:
            torch.testing.assert_close(cm.get_parameter(p.name).grad, hf_param(hf, p.name).grad, atol=1e-5, rtol=1e-4)
    merged = cm.merge()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, hf.merge_and_unload()(input_ids=x).logits,
                                   atol=1e-5, rtol=1e-5)
    assert merged.counters["merge-reparam.method-adalora"] == 3
    assert _ops(merged.graph_module) == plain_ops(base, {"input_ids": x, "labels": x})  # the capture had labels


def test_update_and_allocate_matches_hf_rank_allocator():
    """Same weights, same batches, SGD on both; after every step the singular values (masked ones are zeroed), the
    rank pattern and the sensitivity EMAs agree with HF PEFT's RankAllocator through warmup, the cubic budget, the
    final allocation (step total_step - tfinal) and the final phase."""
    _, cm, hf, _ = twins()
    ours_opt = torch.optim.SGD(cm.trainable_parameters(), lr=0.5)
    hf_opt = torch.optim.SGD([p for p in hf.parameters() if p.requires_grad], lr=0.5)
    names = [p.name for p in cm.params if p.trainable]
    kept = []
    for step in range(SCHEDULE["total_step"]):
        x = ids(seed=10 + step)
        for model, opt in ((cm, ours_opt), (hf, hf_opt)):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
        allocator = cm.update_and_allocate(step)
        hf.base_model.update_and_allocate(step)
        hf_alloc = hf.base_model.rankallocator
        for name in names:
            torch.testing.assert_close(cm.get_parameter(name), hf_param(hf, name), atol=1e-5, rtol=1e-4)
            if name in allocator.exp_avg_ipt:
                torch.testing.assert_close(allocator.exp_avg_ipt[name], hf_alloc.exp_avg_ipt[name + ".default"],
                                           atol=1e-6, rtol=1e-4)
                torch.testing.assert_close(allocator.exp_avg_unc[name], hf_alloc.exp_avg_unc[name + ".default"],
                                           atol=1e-6, rtol=1e-4)
        hf_pattern = hf.peft_config["default"].rank_pattern
        if hf_pattern is None:
            assert allocator.rank_pattern is None
        else:
            assert allocator.rank_pattern == {k.removesuffix(".default"): v for k, v in hf_pattern.items()}
        kept.append(sum(sum(v) for v in (allocator.rank_pattern or {}).values()))
        for opt in (ours_opt, hf_opt):
            opt.zero_grad()
    assert kept[:2] == [0, 0] and kept[-1] == 3 * SCHEDULE["target_r"]  # no mask in warmup; the target at the end
    assert allocator.exp_avg_ipt == {}  # reset at the final allocation, as HF resets it
    e = cm.get_parameter("model.layers.0.self_attn.q_proj.lora_E")
    assert (e.detach().view(-1) == 0).tolist() == [not k for k in
                                                   allocator.rank_pattern["model.layers.0.self_attn.q_proj.lora_E"]]


@pytest.mark.parametrize("options, message", [(dict(total_step=0), "total_step"),
                                               (dict(tinit=4), "no budgeting phase"), (dict(beta1=1.0), "beta1")])
def test_adalora_refuses_bad_schedules(options, message):
    with pytest.raises(peftc.SpecError, match=message):
        peftc.AdaLoRA(target=TARGETS, **{**SCHEDULE, **options})


def test_adalora_peft_format_both_ways(tmp_path):
    """Saved after a rank allocation, in HF PEFT's format (full-size tensors, masked singular values zero): HF reads
    it to the same outputs; an adapter HF saved (before allocation) compiles to HF's outputs."""
    base, cm, hf, _ = twins()
    x = ids(seed=4)
    with pytest.raises(peftc.PeftcError, match="no sensitivity recorded"):
        cm.update_and_allocate(4)
    for step in (3, 4):  # a cubic-budget step, then the final allocation (total_step - tfinal) down to target_r
        cm(input_ids=x, labels=x).loss.backward()
        cm.update_and_allocate(step)
    assert sum(sum(v) for v in cm.update_and_allocate(5).rank_pattern.values()) == 3 * SCHEDULE["target_r"]
    with torch.no_grad():
        ours = cm(input_ids=x).logits
        assert cm.save_pretrained(tmp_path / "ours") == "peft"
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
        torch.testing.assert_close(loaded(input_ids=x).logits, ours, atol=1e-5, rtol=1e-5)
        hf.save_pretrained(str(tmp_path / "hf"))
        again = peftc.compile(copy.deepcopy(base), tmp_path / "hf", kwargs={"input_ids": x}, dynamic=False)
        torch.testing.assert_close(again(input_ids=x).logits, hf(input_ids=x).logits, atol=1e-5, rtol=1e-5)
        assert again.spec.rules[0].total_step == SCHEDULE["total_step"]
    with pytest.raises(peftc.SpecError, match="rank_pattern"):
        peftc.Spec.from_peft(peft.AdaLoraConfig(target_modules=TARGETS, total_step=6,
                                                rank_pattern={"q_proj.lora_E": [True, False]}))
