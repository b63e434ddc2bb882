"""Bottleneck adapters (AdapterHub's seq_bn / double_seq_bn / par_bn) against a hand-written eager reference.

The `adapters` package pins transformers 4.x, so the reference below restates its documented math
(`Adapter.pre_forward / forward / post_forward`, `ParallelAdapter`, `bottleneck_layer_forward`) and applies it to the
HF model with hooks at the places AdapterHub's integrations put it: BERT's `BertSelfOutput` / `BertOutput` (with
their LayerNorm), and after the attention and MLP of pre-norm blocks (GPT-2, Llama: no norm, residual = the stream
before the block's input norm). Same weights in both, outputs within 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc.passes.insert_adapter import InsertAdapter, adapter_params
from conftest import ids, tiny_bert, tiny_gpt2, tiny_llama

ACT = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
       "tanh": torch.tanh}


def reference_layer(rule, w, hidden_states, input_tensor, layer_norm):
    """AdapterHub's bottleneck_layer_forward(hidden_states, input_tensor, layer_norm) for one adapter, given its
    tensors `w` (keys inside `adapters.<name>`)."""
    H = hidden_states.shape[-1]

    def adapter(x):
        z, down = x, "adapter_down.0"
        if rule.ln_before:
            z, down = F.layer_norm(z, (H,), w["adapter_down.0.weight"], w["adapter_down.0.bias"]), "adapter_down.1"
        z = ACT[rule.non_linearity](F.linear(z, w[f"{down}.weight"], w[f"{down}.bias"]))
        up = F.linear(z, w["adapter_up.weight"], w["adapter_up.bias"])
        up = up * (w["scaling"] if rule.scaling in ("learned", "channel") else rule.scaling)
        if rule.use_gating:
            up = up * torch.mean(torch.sigmoid(F.linear(x, w["gate.weight"], w["gate.bias"])), dim=1).unsqueeze(-1)
        return up

    def ln_after(o):
        return F.layer_norm(o, (H,), w["adapter_norm_after.weight"], w["adapter_norm_after.bias"])

    if rule.is_parallel:  # ParallelAdapter: pre_forward hands the block input in; post_forward adds the output
        out = adapter(input_tensor)
        if rule.ln_after:
            out = ln_after(out)
        hidden = out + hidden_states
    else:
        hs = hidden_states
        if rule.residual_before_ln is True:
            residual = hs
        if rule.original_ln_before:
            hs = hs + input_tensor
            if layer_norm is not None:
                if rule.residual_before_ln == "post_add":
                    residual = hs
                hs = layer_norm(hs)
        if not rule.residual_before_ln:
            residual = hs
        out = adapter(hs)
        if rule.adapter_residual_before_ln:
            out = out + residual
        if rule.ln_after:
            out = ln_after(out)
        if not rule.adapter_residual_before_ln:
            out = out + residual
        hidden = out
    if rule.original_ln_after:
        hidden = layer_norm(hidden + input_tensor) if layer_norm is not None else hidden + input_tensor
    return hidden


def with_reference_adapters(model, rule, state):
    """A copy of `model` with AdapterHub's adapters hooked in where its integrations put them."""
    model = copy.deepcopy(model)

    def weights(prefix):
        prefix += f".adapters.{rule.name}."
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    def patch_post_norm(module, prefix):  # BertSelfOutput / BertOutput: dense -> dropout -> adapter layer (+ LN)
        w = weights(prefix)

        def forward(hidden_states, input_tensor):
            h = module.dropout(module.dense(hidden_states))
            return reference_layer(rule, w, h, input_tensor, module.LayerNorm)
        module.forward = forward

    def hook_pre_norm(norm, block, prefix):  # residual = the input norm's input; the model adds it back itself
        w, seen = weights(prefix), {}
        norm.register_forward_pre_hook(lambda m, args: seen.update(r=args[0]))

        def after(m, args, out):
            h = out[0] if isinstance(out, tuple) else out
            new = reference_layer(rule, w, h, seen["r"], None) - seen["r"]
            return (new, *out[1:]) if isinstance(out, tuple) else new
        block.register_forward_hook(after)

    wanted = {"attention": rule.mh_adapter, "output": rule.output_adapter}
    if hasattr(model, "bert"):
        for i, layer in enumerate(model.bert.encoder.layer):
            if i in rule.leave_out:
                continue
            if wanted["attention"]:
                patch_post_norm(layer.attention.output, f"bert.encoder.layer.{i}.attention.output")
            if wanted["output"]:
                patch_post_norm(layer.output, f"bert.encoder.layer.{i}.output")
        return model
    layers, names, root = (model.transformer.h, ("ln_1", "attn", "ln_2", "mlp"), "transformer.h") \
        if hasattr(model, "transformer") else \
        (model.model.layers, ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"), "model.layers")
    for i, layer in enumerate(layers):
        if i in rule.leave_out:
            continue
        n1, attn, n2, mlp = (getattr(layer, n) for n in names)
        if wanted["attention"]:
            hook_pre_norm(n1, attn, f"{root}.{i}.attention_adapters")
        if wanted["output"]:
            hook_pre_norm(n2, mlp, f"{root}.{i}.output_adapters")
    return model


def check_against_reference(make, rule, seed=0):
    torch.manual_seed(seed)
    base = make().eval()
    kwargs = dict(input_ids=ids(), attention_mask=torch.tensor([[1] * 8, [1] * 5 + [0] * 3]))
    cm = peftc.compile(base, rule, kwargs=kwargs, dynamic=False)
    with torch.no_grad():
        y_base = base(**kwargs).logits
        if rule.init_weights == "mam_adapter":  # up-projection zeros: the model is unchanged
            torch.testing.assert_close(cm(**kwargs).logits, y_base, atol=0, rtol=0)
    torch.manual_seed(seed + 1)
    state = {k: torch.randn_like(v) * 0.3 for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(state)
    ref = with_reference_adapters(base, rule, state)
    with torch.no_grad():
        y_ref, y = ref(**kwargs).logits, cm(**kwargs).logits
    assert (y_ref - y_base).abs().max() > 1e-3  # the adapters change the outputs
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    gm = cm.method_graph_for(**kwargs)  # running the pass again changes nothing
    code = gm.code
    assert not InsertAdapter(rule).run(gm, peftc.PassContext(cm.params, cm._info, training=False)).modified
    assert gm.code == code
    return cm


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


@pytest.mark.parametrize("config", ["seq_bn", "double_seq_bn", "par_bn"])
@pytest.mark.parametrize("model", list(MODELS))
def test_presets_match_adapterhub_math(model, config):
    rule = peftc.Adapter(config=config)
    cm = check_against_reference(MODELS[model], rule)
    hidden, d = 32, rule.bottleneck(32)
    per_adapter = hidden * d + d + d * hidden + hidden
    sites = 2 * (2 if config == "double_seq_bn" else 1)  # 2 layers; Houlsby adds one after attention too
    assert cm.parameter_counts()[0] == sites * per_adapter
    assert d == (2 if config != "par_bn" else 16)  # reduction factors 16 and 2 on hidden 32
    kinds = ("attention", "output") if config == "double_seq_bn" else ("output",)
    assert {k: v for k, v in cm.counters.items() if k.startswith("insert-adapter")} == \
        {f"insert-adapter.{k}": 2 for k in kinds}
    keys = set(cm.adapter_state_dict())
    expected_block = {"llama": "model.layers.1.output_adapters", "gpt2": "transformer.h.1.output_adapters",
                      "bert": "bert.encoder.layer.1.output"}[model]
    assert f"{expected_block}.adapters.default.adapter_down.0.weight" in keys
    assert f"{expected_block}.adapters.default.adapter_up.bias" in keys


OPTIONS = [
    dict(config="seq_bn", residual_before_ln=False, ln_before=True, ln_after=True, adapter_residual_before_ln=True,
         non_linearity="gelu"),
    dict(config="par_bn", scaling="learned", use_gating=True, ln_after=True),
    dict(config="double_seq_bn", original_ln_after=False, original_ln_before=True, scaling="channel",
         non_linearity="gelu_new", leave_out=[0]),
    dict(config="houlsby", reduction_factor=4, init_weights="houlsby", non_linearity="tanh"),
]


CASES = [("bert", o) for o in OPTIONS] + [("gpt2", OPTIONS[0]), ("gpt2", OPTIONS[2])]  # post- and pre-norm


@pytest.mark.parametrize("model,options", CASES,
                         ids=[f"{m}-" + "-".join(f"{k}={v}" for k, v in o.items())[:60] for m, o in CASES])
def test_options_match_adapterhub_math(model, options):
    check_against_reference(MODELS[model], peftc.Adapter(**options))


def test_post_add_residual_on_a_post_norm_model_and_refused_on_a_pre_norm_one():
    rule = peftc.Adapter(config="pfeiffer", residual_before_ln="post_add", mh_adapter=True)
    check_against_reference(tiny_bert, rule)
    with pytest.raises(peftc.PassError, match="post_add"):
        peftc.compile(tiny_gpt2(), rule, kwargs=dict(input_ids=ids()), dynamic=False)
    with pytest.raises(peftc.SpecError, match="original_ln_before"):
        peftc.Adapter(config="par_bn", residual_before_ln="post_add")


def test_inits_are_adapterhubs():
    torch.manual_seed(0)
    cm = peftc.compile(tiny_llama(hidden_size=64, num_hidden_layers=1), peftc.Adapter(reduction_factor=1),
                       kwargs=dict(input_ids=ids()), dynamic=False)
    key = "model.layers.0.output_adapters.adapters.default."
    bert = cm.adapter_state_dict()

    def made(config, **options):  # what the pass adds, without a capture
        rule = peftc.Adapter(config=config, reduction_factor=1, **options)
        return {k: init(torch.empty(shape)) for k, (shape, init) in adapter_params(rule, 64).items()}

    mam, houlsby = made("par_bn"), made("seq_bn", init_weights="houlsby")
    for w in (bert[key + "adapter_down.0.weight"], bert[key + "adapter_up.weight"]):
        assert abs(w.std().item() - 0.02) < 0.003 and abs(w.mean().item()) < 0.003
    assert all(not v.any() for k, v in bert.items() if k.endswith("bias"))
    assert not mam["adapter_up.weight"].any() and not mam["adapter_up.bias"].any()
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    down = mam["adapter_down.0.weight"]
    assert down.abs().max() <= bound and down.abs().max() > 0.9 * bound
    for w in (houlsby["adapter_down.0.weight"], houlsby["adapter_up.weight"]):
        assert w.abs().max() <= 0.02 and w.std() > 0.005


def test_trains_only_the_adapters_with_dropout_in_training_graphs():
    torch.manual_seed(0)
    base = tiny_gpt2()
    kwargs = dict(input_ids=ids(), labels=ids())
    cm = peftc.compile(base, peftc.Adapter(config="par_bn", dropout=0.5, scaling="learned"), kwargs=kwargs, dynamic=False)
    cm.train()
    cm(**kwargs).loss.backward()
    trained = {n for n, p in cm.named_parameters() if p.grad is not None}
    assert trained == {p.name for p in cm.params if p.trainable} and len(trained) == 2 * 5
    cm.eval()
    with torch.no_grad():
        a, b = cm(**kwargs).logits, cm(**kwargs).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # no dropout in eval


def test_merge_is_refused_and_export_is_unmerged(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(input_ids=ids())
    cm = peftc.compile(tiny_gpt2(n_layer=1), peftc.Adapter(config="seq_bn"), kwargs=kwargs, prune_grads=False)
    with pytest.raises(peftc.PassError, match="adapter"):
        cm.merge()
    report = cm.export_onnx(tmp_path / "m.onnx", merged=False)
    assert (tmp_path / "m.onnx").exists() and report is not None


def test_spec_file_rerun_and_no_sub_block(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text('[[adapter]]\nconfig = "double_seq_bn"\nreduction_factor = 8\nleave_out = [1]\n')
    spec = peftc.Spec.load(path)
    (rule,) = spec.rules
    assert rule == peftc.Adapter(config="double_seq_bn", reduction_factor=8, leave_out=(1,))
    assert rule.mh_adapter and rule.non_linearity == "swish"
    assert peftc.Spec.from_dict(spec.to_dict()) == spec
    cm = peftc.compile(tiny_llama(), spec, kwargs=dict(input_ids=ids()), dynamic=False )
    assert len(cm.adapter_state_dict()) == 2 * 4  # layer 0 only, attention and output
    gm, code = cm.graph_module, cm.graph_module.code
    result = InsertAdapter(rule).run(gm, peftc.PassContext(cm.params, cm._info, training=False))
    assert not result.modified and gm.code == code
    with pytest.raises(peftc.SpecError, match="sub-block"):
        peftc.compile(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), peftc.Adapter(),
                      args=(torch.randn(2, 8),), dynamic=False)
    with pytest.raises(peftc.SpecError, match="seq_bn"):
        peftc.Adapter(config="lora")
