"""HF PEFT's adapter format both ways (peftc/peft_format.py), modules_to_save, task types and HF's all-linear rule.

Every parity check runs the real peft package on the same base weights.
"""

import copy
import json
import re

import pytest
import torch

import peftc
from peftc.capture import ModelInfo
from peftc.peft_format import peft_selects

from conftest import ids, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

LENGTH = 3


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def perturb(cm, scale=0.1, seed=1):
    """Move every trainable tensor off its init, so the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def peft_model(base, directory):
    return peft.PeftModel.from_pretrained(base, str(directory)).eval()


def adapted_by_peft(model, config) -> set[str]:
    pm = peft.get_peft_model(model, config)
    marker = {"LORA": ".lora_A", "IA3": ".ia3_l", "LN_TUNING": ".ln_tuning_layers"}[str(config.peft_type.value)]
    return {n.removeprefix("base_model.model.").split(marker)[0] for n, _ in pm.named_parameters() if marker in n}


def adapted_by_peftc(cm, method="lora", marker=".lora_A") -> set[str]:
    return {p.name.split(marker)[0] for p in cm.params if p.method == method and marker in p.name}


def assert_close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


# ---- out: cm.save_pretrained ==> PeftModel.from_pretrained -------------------------------------------------------
SAVE_CASES = {
    "llama-regex-dora-patterns": (tiny_llama, peftc.LoRA(target="q_proj|v_proj", r=4, alpha=8, use_dora=True,
                                                         rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16})),
    "llama-rslora-exclude": (tiny_llama, peftc.LoRA(target="all-linear", r=4, alpha=8, use_rslora=True,
                                                    exclude=r".*layers\.0\.mlp\..*")),
    "gpt2-conv1d-all-linear": (tiny_gpt2, peftc.LoRA(target="all-linear", r=4, alpha=4)),
    "bert-seq-cls": (tiny_bert, peftc.Spec(peftc.LoRA(target="all-linear", r=4), task_type="SEQ_CLS")),
    "bert-modules-to-save": (tiny_bert, peftc.Spec(peftc.LoRA(target=["query", "value"], r=4),
                                                   peftc.ModulesToSave(target=["classifier"]))),
    "llama-ia3": (tiny_llama, peftc.IA3(target=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])),
    "gpt2-ia3": (tiny_gpt2, peftc.IA3(target=["c_attn", "mlp.c_proj"], feedforward="mlp.c_proj")),
    "llama-ln-tuning": (tiny_llama, peftc.NormTuning()),
    "bert-ln-tuning-seq-cls": (tiny_bert, peftc.Spec(peftc.NormTuning(target=["LayerNorm"]), task_type="SEQ_CLS")),
    "llama-prompt": (tiny_llama, peftc.PromptTuning(length=LENGTH)),
    "bert-prompt-seq-cls": (tiny_bert, peftc.Spec(peftc.PromptTuning(length=LENGTH), task_type="SEQ_CLS")),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_saved_adapter_loads_in_peft_with_the_same_outputs(case, tmp_path):
    make, spec = SAVE_CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    base, fresh = copy.deepcopy(model), copy.deepcopy(model)
    x = ids()
    lengthens = "prompt" in case  # prompt tuning needs a dynamic sequence length
    cm = peftc.compile(model, spec, kwargs=dict(input_ids=x), dynamic=lengthens)
    perturb(cm)
    assert cm.save_pretrained(tmp_path) == "peft"
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    pm = peft_model(base, tmp_path)
    x2 = ids(seed=3)
    ours = logits(cm(input_ids=x2))
    plain = logits(fresh(input_ids=x2))
    assert not torch.allclose(ours[:, -plain.shape[1]:], plain, atol=1e-3)  # the adapter is read
    assert_close(logits(pm(input_ids=x2)), ours)
    # The same directory back into peftc, both ways in.
    again = peftc.compile(fresh, tmp_path, kwargs=dict(input_ids=x), dynamic=lengthens)
    assert_close(logits(again(input_ids=x2)), ours)
    assert again.parameter_counts()[0] == cm.parameter_counts()[0]


def test_saved_keys_and_config_are_peft_s(tmp_path):
    torch.manual_seed(0)
    cm = peftc.compile(tiny_llama(), peftc.LoRA(target="q_proj|v_proj", r=4, alpha=8, use_dora=True,
                                                rank_pattern={"v_proj": 2}), kwargs=dict(input_ids=ids()), dynamic=False)
    cm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert saved["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 2)
    assert saved["base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"].shape == (16,)
    assert len(saved) == 12
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_dora"] is True
    # peftc's regex selects a dotted suffix; written as a PEFT full-match regex that selects the same paths.
    assert config["target_modules"] == r"(?:.*\.)?(?:q_proj|v_proj)"
    assert all(re.fullmatch(config["target_modules"], m) for m in adapted_by_peftc(cm))


def test_modules_to_save_is_a_full_trainable_copy_under_peft_s_names(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert().eval()
    head = model.classifier.weight.detach().clone()
    cm = peftc.compile(model, peftc.Spec(peftc.LoRA(target=["query"], r=4), peftc.ModulesToSave(target=["classifier"])),
                       kwargs=dict(input_ids=ids()), dynamic=False)
    trainable = {p.name for p in cm.params if p.trainable}
    assert {"classifier.modules_to_save.weight", "classifier.modules_to_save.bias"} <= trainable
    assert "classifier.lora_A.weight" not in trainable
    perturb(cm)
    torch.testing.assert_close(model.classifier.weight, head, rtol=0, atol=0)  # the original stays as it was
    cm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    copy_ = cm.params["classifier.weight"].tensor + cm.params["classifier.modules_to_save.weight"].tensor
    torch.testing.assert_close(saved["base_model.model.classifier.weight"], copy_.detach())
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    hf = peft.get_peft_model(tiny_bert(), peft.LoraConfig(target_modules=["query"], r=4,
                                                          modules_to_save=["classifier"]))
    assert cm.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)


def test_prefix_saves_as_peft_prompt_embeddings(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    base, fresh = copy.deepcopy(model), copy.deepcopy(model)
    x = ids()
    for projection, directory in ((False, tmp_path / "plain"), (True, tmp_path / "projected")):
        cm = peftc.compile(copy.deepcopy(model), peftc.Prefix(length=LENGTH, projection=projection),
                           kwargs=dict(input_ids=x), dynamic=False)
        perturb(cm)
        assert cm.save_pretrained(directory) == "peft"
        pm = peft_model(copy.deepcopy(base), directory)
        # HF PEFT keeps the prefix in the KV cache, so transformers numbers the real tokens from LENGTH on.
        positions = torch.arange(LENGTH, LENGTH + x.shape[1]).expand(x.shape[0], -1)
        ours = logits(cm(input_ids=x, position_ids=positions))
        assert_close(logits(pm(input_ids=x)), ours)
    # the projected prefix comes back as the prefixes it computes (PEFT's saved form), per layer
    again = peftc.CompiledModel.from_pretrained(fresh, tmp_path / "projected", kwargs=dict(input_ids=x), dynamic=False)
    assert again.spec.rules == (peftc.Prefix(length=LENGTH),)
    assert_close(logits(again(input_ids=x, position_ids=positions)), ours)


# ---- peftc's layout, for what PEFT has no format for --------------------------------------------------------------
PEFTC_CASES = {
    "bitfit": (tiny_gpt2, peftc.BitFit()),
    "sparse-delta": (tiny_llama, peftc.SparseDelta(target=r".*_proj\.weight", density=0.05)),
    "per-slice-lora": (tiny_llama, peftc.LoRA(target="q_proj", r={"a": 2, "b": 4}, alpha={"a": 2, "b": 4},
                                              slices={"a": (0, 8), "b": (16, 32)})),
    "lora-and-prefix": (tiny_llama, peftc.Spec(peftc.LoRA(target="v_proj", r=2), peftc.Prefix(length=2))),
}


@pytest.mark.parametrize("case", list(PEFTC_CASES))
def test_methods_peft_has_no_format_for_save_in_peftc_layout(case, tmp_path):
    make, spec = PEFTC_CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    fresh = copy.deepcopy(model)
    x = ids()
    cm = peftc.compile(model, spec, kwargs=dict(input_ids=x), dynamic=False)
    perturb(cm)
    with pytest.raises(peftc.SpecError, match="format='peftc'"):
        cm.save_pretrained(tmp_path / "peft", format="peft")
    assert cm.save_pretrained(tmp_path / "out") == "peftc"
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"peftc_spec.json", "peftc_adapter.safetensors"}
    again = peftc.compile(fresh, tmp_path / "out", kwargs=dict(input_ids=x), dynamic=False)
    assert again.spec == cm.spec
    assert_close(logits(again(input_ids=x)), logits(cm(input_ids=x)))


def test_sparse_delta_masks_travel_with_the_peftc_layout(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    weight = model.model.layers[0].mlp.down_proj.weight
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[0, :5] = True
    x = ids()
    cm = peftc.compile(model, peftc.SparseDelta(masks={"model.layers.0.mlp.down_proj.weight": mask}),
                       kwargs=dict(input_ids=x), dynamic=False)
    perturb(cm)
    cm.save_pretrained(tmp_path)
    again = peftc.compile(copy.deepcopy(model), tmp_path, kwargs=dict(input_ids=x), dynamic=False)
    torch.testing.assert_close(again.spec.rules[0].masks["model.layers.0.mlp.down_proj.weight"], mask)
    assert_close(logits(again(input_ids=x)), logits(cm(input_ids=x)))


# ---- in: PEFT-trained adapters into peftc --------------------------------------------------------------------------
def _peft_trained(make, config, directory):
    torch.manual_seed(0)
    model = make().eval()
    bases = [copy.deepcopy(model) for _ in range(3)]
    pm = peft.get_peft_model(model, config).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(directory))
    return pm, bases


LOAD_CASES = {
    "lora-dora-patterns": (tiny_llama, lambda: peft.LoraConfig(
        target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, use_dora=True,
        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4})),
    "lora-regex-rslora": (tiny_llama, lambda: peft.LoraConfig(target_modules=r".*layers\.1\..*(q|k)_proj", r=4,
                                                              use_rslora=True, lora_alpha=16)),
    "lora-layers-to-transform": (tiny_llama, lambda: peft.LoraConfig(
        target_modules=["o_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers", r=2)),
    "lora-gpt2-all-linear": (tiny_gpt2, lambda: peft.LoraConfig(target_modules="all-linear", r=4)),
    "lora-bert-seq-cls": (tiny_bert, lambda: peft.LoraConfig(target_modules="all-linear", r=4, task_type="SEQ_CLS")),
    "lora-bert-modules-to-save": (tiny_bert, lambda: peft.LoraConfig(
        target_modules=["query", "key", "dense"], exclude_modules=["pooler.dense"], r=4,
        modules_to_save=["classifier"])),
    "ia3": (tiny_llama, lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                               feedforward_modules=["down_proj"])),
    "ln-tuning": (tiny_llama, lambda: peft.LNTuningConfig(task_type="CAUSAL_LM")),
    "prompt-tuning": (tiny_llama, lambda: peft.PromptTuningConfig(num_virtual_tokens=LENGTH, task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_peft_adapters_compile_from_their_directory(case, tmp_path):
    make, config = LOAD_CASES[case]
    pm, (base, plain_base, _) = _peft_trained(make, config(), tmp_path)
    x, x2 = ids(), ids(seed=4)
    theirs = logits(pm(input_ids=x2))
    plain = logits(plain_base(input_ids=x2))
    assert not torch.allclose(theirs[:, -plain.shape[1]:], plain, atol=1e-3)
    cm = peftc.compile(base, tmp_path, kwargs=dict(input_ids=x), dynamic=case == "prompt-tuning")
    assert_close(logits(cm(input_ids=x2)), theirs)
    assert cm.parameter_counts()[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)


def test_from_pretrained_and_load_adapter_agree_with_peft(tmp_path):
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, use_dora=True,
                             modules_to_save=["lm_head"])
    pm, (b1, b2, _) = _peft_trained(tiny_llama, config, tmp_path)
    x, x2 = ids(), ids(seed=4)
    theirs = logits(pm(input_ids=x2))
    cm = peftc.CompiledModel.from_pretrained(b1, tmp_path / "adapter_config.json", kwargs=dict(input_ids=x), dynamic=False)
    assert_close(logits(cm(input_ids=x2)), theirs)
    loaded = peftc.compile(b2, peftc.Spec.from_peft(pm.peft_config["default"]), kwargs=dict(input_ids=x), dynamic=False)
    loaded.load_adapter(tmp_path)
    assert_close(logits(loaded(input_ids=x2)), theirs)


def test_peft_prefix_tuning_loads_given_peft_s_positions(tmp_path):
    config = peft.PrefixTuningConfig(num_virtual_tokens=LENGTH, task_type="CAUSAL_LM", prefix_projection=True,
                                     encoder_hidden_size=16)
    pm, (b1, _, _) = _peft_trained(tiny_llama, config, tmp_path)
    x = ids()
    cm = peftc.compile(b1, tmp_path, kwargs=dict(input_ids=x), dynamic=False)
    assert cm.spec.rules[0] == peftc.Prefix(length=LENGTH)  # PEFT saved the projected prefixes
    positions = torch.arange(LENGTH, LENGTH + x.shape[1]).expand(x.shape[0], -1)
    assert_close(logits(cm(input_ids=x, position_ids=positions)), logits(pm(input_ids=x)))


# ---- Spec.from_peft ------------------------------------------------------------------------------------------------
def test_from_peft_takes_a_dir_a_file_a_config_object_and_a_dict(tmp_path):
    config = peft.LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=8, lora_dropout=0.1)
    pm, _ = _peft_trained(tiny_llama, config, tmp_path)
    specs = [peftc.Spec.from_peft(s) for s in (tmp_path, tmp_path / "adapter_config.json", pm.peft_config["default"],
                                               json.loads((tmp_path / "adapter_config.json").read_text()))]
    assert all(s == specs[0] for s in specs)
    assert specs[0].rules == (peftc.LoRA(target=("q_proj",), r=4, alpha=8, dropout=0.1),)


TARGET_FORMS = [
    dict(target_modules=r".*\.(q|v)_proj"),
    dict(target_modules=r"model\.layers\.0\.self_attn\.k_proj|.*mlp\.gate_proj"),
    dict(target_modules=["q_proj", "mlp.up_proj", "model.layers.1.self_attn.o_proj"]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=0),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 1], layers_pattern=["h", "layers"]),
    dict(target_modules=["q_proj", "model.layers.0.mlp.down_proj"], layers_to_transform=[1], layers_pattern="layers"),
    dict(target_modules="all-linear", exclude_modules=r".*layers\.1\..*"),
    dict(target_modules="all-linear", exclude_modules=["k_proj", "mlp.up_proj"]),
    dict(target_modules=["q_proj", "v_proj", "o_proj"], modules_to_save=["o_proj"]),
]


@pytest.mark.parametrize("form", TARGET_FORMS, ids=[str(i) for i in range(len(TARGET_FORMS))])
def test_from_peft_selects_what_peft_selects(form):
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=2)
    config = peft.LoraConfig(r=2, **form)
    spec = peftc.Spec.from_peft(config)
    cm = peftc.compile(copy.deepcopy(model), spec, kwargs=dict(input_ids=ids()), dynamic=False)
    expected = adapted_by_peft(copy.deepcopy(model), peft.LoraConfig(r=2, **form))
    assert adapted_by_peftc(cm) == expected
    # the save side's reading of a PEFT config agrees with PEFT too
    assert peft_selects({**config.to_dict(), "target_modules": form["target_modules"]}, ModelInfo.of(model)) \
        == expected


def test_from_peft_refuses_unsupported_types_and_keys():
    with pytest.raises(peftc.SpecError, match="LORA, IA3, PREFIX_TUNING, PROMPT_TUNING, LN_TUNING"):
        peftc.Spec.from_peft(peft.FourierFTConfig(target_modules=["q_proj"]))
    with pytest.raises(peftc.SpecError, match="`layer_replication`.*supported keys: .*lora_alpha"):
        peftc.Spec.from_peft(peft.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 1]]))
    with pytest.raises(peftc.SpecError, match="init_lora_weights"):
        peftc.Spec.from_peft(peft.LoraConfig(target_modules=["q_proj"], init_lora_weights="orthogonal"))
    with pytest.raises(peftc.SpecError, match="target_modules is not set"):
        peftc.Spec.from_peft({"peft_type": "LORA", "r": 4})


def test_a_base_that_does_not_fit_raises_and_leaves_cm_unchanged(tmp_path):
    _peft_trained(lambda: tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], r=4), tmp_path / "small")
    cm = peftc.compile(tiny_llama(hidden_size=48, num_attention_heads=4, num_key_value_heads=2),
                       peftc.LoRA(target=["q_proj"], r=4), kwargs=dict(input_ids=ids()), dynamic=False)
    before = {k: v.clone() for k, v in cm.adapter_state_dict().items()}
    with pytest.raises(peftc.AdapterError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight.*\(4, 32\)"
                                                 r".*\(4, 48\)"):
        cm.load_adapter(tmp_path / "small")
    after = cm.adapter_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(peftc.AdapterError):
        peftc.compile(tiny_llama(hidden_size=48, num_attention_heads=4, num_key_value_heads=2), tmp_path / "small",
                      kwargs=dict(input_ids=ids()), dynamic=False)


# ---- all-linear and the task type ----------------------------------------------------------------------------------
def _tiny_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                          num_hidden_layers=1, num_attention_heads=4))


def _tiny_distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=1,
                                                                n_heads=4))


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32,
                                               intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                               num_labels=3))


ALL_LINEAR = {
    "llama": (tiny_llama, None, "input_ids"),
    "gpt2": (tiny_gpt2, None, "input_ids"),
    "bert": (tiny_bert, None, "input_ids"),
    "bert-seq-cls": (tiny_bert, "SEQ_CLS", "input_ids"),
    "roberta-seq-cls": (_tiny_roberta, "SEQ_CLS", "input_ids"),
    "distilbert": (_tiny_distilbert, None, "input_ids"),
    "vit": (_tiny_vit, None, "pixel_values"),
    "vit-seq-cls": (_tiny_vit, "SEQ_CLS", "pixel_values"),
}


@pytest.mark.parametrize("case", list(ALL_LINEAR))
def test_all_linear_trains_what_hf_peft_trains(case):
    make, task_type, key = ALL_LINEAR[case]
    torch.manual_seed(0)
    model = make()
    hf = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=4,
                                                                   task_type=task_type))
    inputs = {key: ids() if key == "input_ids" else torch.randn(2, 3, 8, 8)}
    cm = peftc.compile(model, peftc.Spec(peftc.LoRA(target="all-linear", r=4), task_type=task_type), kwargs=inputs, dynamic=False)
    assert cm.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    hf_lora = {n.removeprefix("base_model.model.").split(".lora_A")[0] for n, _ in hf.named_parameters()
               if ".lora_A" in n}
    assert adapted_by_peftc(cm) == hf_lora


def test_bert_classifier_gets_lora_without_a_task_type_and_a_full_copy_with_seq_cls():
    cm = peftc.compile(tiny_bert(), peftc.LoRA(target="all-linear", r=4), kwargs=dict(input_ids=ids()), dynamic=False)
    assert "classifier" in adapted_by_peftc(cm)
    seq = peftc.compile(tiny_bert(), peftc.Spec(peftc.LoRA(target="all-linear", r=4), task_type="SEQ_CLS"),
                        kwargs=dict(input_ids=ids()), dynamic=False)
    assert "classifier" not in adapted_by_peftc(seq)
    assert {"classifier.modules_to_save.weight", "classifier.modules_to_save.bias"} <= \
        {p.name for p in seq.params if p.trainable}


def test_task_type_is_validated_and_round_trips_through_spec_files(tmp_path):
    with pytest.raises(peftc.SpecError, match="SEQ_CLS"):
        peftc.Spec(peftc.LoRA(), task_type="CLASSIFY")
    spec = peftc.Spec(peftc.LoRA(target=["query"]), peftc.ModulesToSave(target=["classifier"]), task_type="SEQ_CLS")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_dict()))
    assert peftc.Spec.load(path) == spec
