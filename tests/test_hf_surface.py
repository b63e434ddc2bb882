"""The Hugging Face model surface of CompiledModel (peftc/hf.py), each attribute with HF's meaning."""

import copy
import inspect

import pytest
import torch

import peftc
from peftc.passes.schedule_recompute import BLOCK_KEY, REGION_KEY

from conftest import ids, tiny_llama

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    model = tiny_llama()
    cm = peftc.compile(model, peftc.LoRA(target="q_proj|v_proj", r=4, alpha=8), kwargs={"input_ids": ids()},
                       dynamic=False)
    return model, cm


def test_model_attributes_are_the_source_models(llama):
    model, cm = llama
    assert cm.config is model.config
    assert cm.generation_config is model.generation_config
    assert cm.main_input_name == "input_ids"
    assert cm.device == torch.device("cpu") and cm.dtype == torch.float32
    assert cm.get_input_embeddings() is model.get_input_embeddings()
    assert cm.get_input_embeddings().weight is cm.model.embed_tokens.weight  # the one tensor, frozen
    assert cm.get_output_embeddings() is model.lm_head
    assert cm.accepts_loss_kwargs  # Llama's forward takes num_items_in_batch through **kwargs
    assert cm.enable_input_require_grads() is None


def test_forward_signature_is_the_source_models(llama):
    model, cm = llama
    assert inspect.signature(cm.forward) == inspect.signature(model.forward)
    assert "labels" in inspect.signature(cm.forward).parameters
    assert copy.deepcopy(cm).forward.__signature__ == inspect.signature(model.forward)


def test_plain_module_surface():
    from examples.tiny_models import tiny_mlp

    model, (x,) = tiny_mlp()
    cm = peftc.compile(model, peftc.LoRA(target="up", r=2), args=(x,), dynamic=False)
    assert not cm.accepts_loss_kwargs  # forward(x): no num_items_in_batch to pass
    assert cm.main_input_name == "x"
    assert list(inspect.signature(cm.forward).parameters) == ["x"]
    assert not hasattr(cm, "config")
    assert cm.base_model is cm  # no separate backbone: HF's base_model is the model itself


def test_print_trainable_parameters_prints_like_hf_peft(capsys):
    torch.manual_seed(0)
    model = tiny_llama()
    hf = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    cm = peftc.compile(model, peftc.LoRA(target="q_proj|v_proj", r=4), kwargs={"input_ids": ids()}, dynamic=False)
    hf.print_trainable_parameters()
    theirs = capsys.readouterr().out
    assert cm.print_trainable_parameters() is None
    assert capsys.readouterr().out == theirs


def test_add_model_tags_keeps_existing_tags(llama):
    _, cm = llama
    cm.add_model_tags(["trl", "sft"])
    cm.add_model_tags("sft")
    cm.add_model_tags("peftc")
    assert cm.model_tags == ["trl", "sft", "peftc"]


def _checkpointed_blocks(cm, kwargs):
    """The blocks recomputed whole (the default recompute-cheap recomputes regions of them)."""
    return [n.meta[BLOCK_KEY] for n in cm.graph_for(**kwargs).graph.nodes
            if BLOCK_KEY in n.meta and REGION_KEY not in n.meta]


def test_gradient_checkpointing_is_schedule_recompute_of_every_block():
    torch.manual_seed(0)
    cm = peftc.compile(tiny_llama(), peftc.LoRA(target="q_proj|v_proj", r=4), kwargs={"input_ids": ids()},
                       dynamic=False)
    cm.train()
    kwargs = {"input_ids": ids(), "labels": ids(seed=1)}
    torch.manual_seed(1)
    cm.load_adapter_state_dict({k: torch.randn_like(v) * 0.1 for k, v in cm.adapter_state_dict().items()})

    def grads():
        for p in cm.trainable_parameters():
            p.grad = None
        cm(**kwargs).loss.backward()
        return [p.grad.clone() for p in cm.trainable_parameters()]

    plain = grads()
    assert not cm.is_gradient_checkpointing and _checkpointed_blocks(cm, kwargs) == []
    cm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert cm.is_gradient_checkpointing
    assert _checkpointed_blocks(cm, kwargs) == ["model.layers.0", "model.layers.1"]  # the cached graph too
    for a, b in zip(grads(), plain):
        torch.testing.assert_close(a, b)
    # A signature captured while enabled is checkpointed as well.
    other = {"input_ids": ids(), "labels": ids(seed=1), "output_hidden_states": True}
    assert _checkpointed_blocks(cm, other) == ["model.layers.0", "model.layers.1"]

    cm.gradient_checkpointing_disable()
    assert not cm.is_gradient_checkpointing
    assert _checkpointed_blocks(cm, kwargs) == [] and _checkpointed_blocks(cm, other) == []
    for a, b in zip(grads(), plain):
        torch.testing.assert_close(a, b)

    cm.activation_checkpointing_enable(every_n_layers=2)  # HF: layers 0, 2, 4, ...
    assert _checkpointed_blocks(cm, kwargs) == ["model.layers.0"]
    cm.activation_checkpointing_disable()
    with pytest.raises(peftc.PeftcError, match="offload"):
        cm.gradient_checkpointing_enable(offload=True)
    with pytest.raises(peftc.PeftcError, match="preserve_rng_state"):
        cm.gradient_checkpointing_enable({"preserve_rng_state": False})
    assert not cm.is_gradient_checkpointing


def test_base_model_is_the_compiled_backbone_with_the_same_adapters():
    torch.manual_seed(0)
    model = tiny_llama()
    hf = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                                   lora_alpha=8, lora_dropout=0.0))
    cm = peftc.compile(model, peftc.LoRA(target="q_proj|v_proj", r=4, alpha=8), kwargs={"input_ids": ids()},
                       dynamic=False)
    torch.manual_seed(1)
    weights = {k: torch.randn_like(v) * 0.1 for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(weights)
    peft.set_peft_model_state_dict(hf, {f"base_model.model.{k}": v for k, v in weights.items()})
    cm.train(), hf.train()

    ours = cm.base_model(input_ids=ids()).last_hidden_state
    theirs = hf.base_model.model.model(input_ids=ids()).last_hidden_state
    torch.testing.assert_close(ours, theirs)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    lora_b = dict(cm.named_parameters())["model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(lora_b.grad, hf.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight.grad)
    # The full model and the backbone read one table: the head applied to the backbone gives the model's logits.
    logits = cm(input_ids=ids()).logits
    torch.testing.assert_close(cm.get_output_embeddings()(cm.base_model(input_ids=ids()).last_hidden_state), logits)


def test_output_layer_with_an_adapter_is_not_handed_out():
    torch.manual_seed(0)
    cm = peftc.compile(tiny_llama(), peftc.LoRA(target="lm_head", r=2), kwargs={"input_ids": ids()}, dynamic=False)
    with pytest.raises(peftc.PeftcError, match="output layer `lm_head` is fine-tuned"):
        cm.get_output_embeddings()


def test_class_is_made_for_the_source_class_and_is_a_peft_model(llama, tmp_path):
    """What transformers.Trainer reads off the class: label names, return_loss, PeftModel (save/resume in PEFT's
    format); what it must not reach: PeftModel's own machinery, which raises a PeftcError that hasattr reads as
    absent."""
    from transformers.utils import can_return_loss, find_labels

    from peftc.hf import UnsupportedPeftAPI

    model, cm = llama
    assert type(cm).__name__ == "CompiledModel[LlamaForCausalLM]" and type(cm).source_class is type(model)
    assert isinstance(cm, peftc.CompiledModel) and isinstance(cm, peft.PeftModel)
    assert type(copy.deepcopy(cm)) is type(cm)
    assert find_labels(type(cm)) == find_labels(type(model)) == ["labels"]
    assert can_return_loss(type(cm)) == can_return_loss(type(model))
    assert cm.get_base_model() is cm and cm.active_adapters == ["default"]
    assert not hasattr(cm, "peft_config")
    with pytest.raises(UnsupportedPeftAPI, match="get_prompt.*save_pretrained, load_adapter"):
        cm.get_prompt(2)
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        cm.no_such_thing  # nn.Module's __getattr__, not PeftModel's (which would ask its base model)
    with pytest.raises(peftc.SpecError, match="not an adapter directory"):  # another name: one more adapter
        cm.load_adapter(tmp_path, "other")
    with pytest.raises(peftc.SpecError, match="safe_serialization=False is not supported"):
        cm.save_pretrained(tmp_path / "x", safe_serialization=False)


def test_save_pretrained_takes_a_trainers_state_dict_and_writes_on_the_main_process_only(llama, tmp_path):
    from safetensors.torch import load_file

    _, cm = llama
    assert cm.save_pretrained(tmp_path / "not_main", is_main_process=False) == "peft"
    assert not (tmp_path / "not_main").exists()
    state = {k: v + 1 if k in cm.adapter_state_dict() else v for k, v in cm.state_dict().items()}
    cm.save_pretrained(tmp_path / "given", state_dict=state)
    saved = load_file(tmp_path / "given" / "adapter_model.safetensors")
    for k, v in cm.adapter_state_dict().items():
        assert torch.equal(saved["base_model.model." + k], v + 1)  # the state dict's tensors, not the live ones
    assert sorted(p.name for p in (tmp_path / "given").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]  # no temporaries


def test_plain_module_class_carries_its_signature_and_is_no_peft_model():
    from transformers.utils import find_labels

    from examples.tiny_models import tiny_mlp

    model, (x,) = tiny_mlp()
    cm = peftc.compile(model, peftc.LoRA(target="up", r=2), args=(x,), dynamic=False)
    assert type(cm).__name__ == f"CompiledModel[{type(model).__name__}]"
    assert not isinstance(cm, peft.PeftModel)
    assert list(inspect.signature(type(cm).forward).parameters) == ["self", "x"]
    assert find_labels(type(cm)) == []
