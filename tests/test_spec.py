"""Spec: validated where it is written; the same spec loads from TOML and JSON; errors name the key and the fix."""

import json

import pytest

import peftc
from peftc.pipeline import Pipeline


def test_lora_defaults_and_scaling():
    rule = peftc.LoRA(target="q_proj|v_proj", r=8, alpha=16)
    assert rule.scaling == 2.0
    assert peftc.LoRA(target="q_proj", r=16, alpha=8, use_rslora=True).scaling == 2.0  # alpha / sqrt(r)
    assert peftc.LoRA(target=["q_proj", "v_proj"]).target == ("q_proj", "v_proj")


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "`r` must be a positive integer"),
    ({"r": 2.5}, "`r` must be a positive integer"),
    ({"alpha": -1}, "`alpha` must be a positive number"),
    ({"dropout": 1.0}, r"`dropout` must be in \[0, 1\)"),
    ({"target": "q_proj("}, "`target` = 'q_proj\\(' is not a valid regular expression"),
    ({"target": 3}, "`target` must be a regex string"),
    ({"target": []}, "`target` is an empty list"),
    ({"use_rslora": "yes"}, "`use_rslora` must be true or false"),
])
def test_invalid_rules_name_the_key(kwargs, message):
    with pytest.raises(peftc.SpecError, match=message):
        peftc.LoRA(**{"target": "q_proj", **kwargs})


def test_toml_and_json_load_the_same_spec(tmp_path):
    toml = tmp_path / "spec.toml"
    toml.write_text('[[lora]]\ntarget = "q_proj|v_proj"\nr = 8\nalpha = 16\ndropout = 0.05\n\n'
                    '[[lora]]\ntarget = ["down_proj"]\nr = 4\nuse_rslora = true\nexclude = ".*layers\\\\.0\\\\..*"\n')
    spec = peftc.Spec.load(toml)
    assert spec.rules == (peftc.LoRA(target="q_proj|v_proj", r=8, alpha=16, dropout=0.05),
                          peftc.LoRA(target=["down_proj"], r=4, use_rslora=True, exclude=r".*layers\.0\..*"))
    js = tmp_path / "spec.json"
    js.write_text(json.dumps(spec.to_dict()))
    assert peftc.Spec.load(js) == spec


@pytest.mark.parametrize("text, suffix, message", [
    ('[[lora]]\ntarget = "q"\nrank = 8\n', ".toml", "unknown key `rank`; did you mean r"),
    ('[[lora]]\ntarget = "q"\nr = 0\n', ".toml", r"\[\[lora\]\] #1: LoRA: `r` must be a positive integer"),
    ('[[loras]]\ntarget = "q"\n', ".toml", "unknown method table `loras`; did you mean lora"),
    ('[[lora]\n', ".toml", "invalid TOML"),
    ('{"lora": [{"target": "q"}', ".json", "invalid JSON"),
    ('lora: []', ".yaml", "unknown spec format"),
    ('', ".toml", "the spec is empty"),
])
def test_bad_spec_files(tmp_path, text, suffix, message):
    path = tmp_path / f"spec{suffix}"
    path.write_text(text)
    with pytest.raises(peftc.SpecError, match=message) as err:
        peftc.Spec.load(path)
    assert isinstance(err.value, peftc.PeftcError)


def test_missing_spec_file(tmp_path):
    with pytest.raises(peftc.SpecError, match="does not exist"):
        peftc.Spec.load(tmp_path / "nope.toml")


def test_pipeline_text():
    pipeline = Pipeline.parse("insert-lora{r=4,target=q_proj|v_proj,dropout=0.1}")
    assert str(pipeline) == "freeze-base,insert-lora"
    assert pipeline.passes[1].rule == peftc.LoRA(target="q_proj|v_proj", r=4, dropout=0.1)
    with pytest.raises(peftc.SpecError, match="unknown pass `insert-lorra`; did you mean insert-lora"):
        Pipeline.parse("insert-lorra{r=4}")
    with pytest.raises(peftc.SpecError, match="unknown key `rank`"):
        Pipeline.parse("insert-lora{rank=4}")
    with pytest.raises(peftc.SpecError, match="cannot parse"):
        Pipeline.parse("insert-lora{r=4")


def test_prune_grads_is_on_by_default_and_last():
    spec = peftc.Spec(peftc.LoRA(target="q_proj"), peftc.IA3(target="down_proj"))
    pipeline = Pipeline.for_spec(spec)
    assert str(pipeline) == \
        "freeze-base,insert-lora,insert-ia3,prune-grads,fuse-linear-cross-entropy,recompute-cheap"
    assert str(pipeline.method) == "freeze-base,insert-lora,insert-ia3"
    assert str(pipeline.training) == "prune-grads,fuse-linear-cross-entropy,recompute-cheap"
    assert str(Pipeline.for_spec(spec, prune_grads=False)) == \
        "freeze-base,insert-lora,insert-ia3,fuse-linear-cross-entropy,recompute-cheap"
    assert str(Pipeline.for_spec(spec, prune_grads=False, fuse_loss=False, recompute=False)) == \
        "freeze-base,insert-lora,insert-ia3"


def test_training_passes_go_after_every_method_pass():
    with pytest.raises(peftc.SpecError, match="method pass `insert-lora` comes after training pass `prune-grads`"):
        Pipeline.parse("prune-grads,insert-lora{target=q_proj}")
