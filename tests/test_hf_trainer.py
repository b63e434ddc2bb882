"""transformers.Trainer and TRL's SFTTrainer train a CompiledModel with their default settings."""

import os

import pytest
import torch

import peftc

from conftest import tiny_llama

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")


def compiled(seed=0, vocab=64, adapter_seed=None):
    """A tiny Llama (base weights from `seed`) with LoRA (initialized from `adapter_seed`, else right after)."""
    torch.manual_seed(seed)
    model = tiny_llama(num_hidden_layers=1, vocab_size=vocab)
    if adapter_seed is not None:
        torch.manual_seed(adapter_seed)
    return peftc.compile(model, peftc.LoRA(target="q_proj|v_proj", r=4, alpha=8),
                         kwargs={"input_ids": torch.zeros(2, 8, dtype=torch.long)})


def lm_dataset(rows=16, seq=8):
    """Two repeated token patterns: learnable in a few steps, so the loss falls."""
    pattern = torch.arange(seq).repeat(rows, 1) * 3 % 64
    pattern[1::2] = pattern[1::2].flip(-1)
    return datasets.Dataset.from_dict({"input_ids": pattern.tolist(), "labels": pattern.tolist(),
                                       "attention_mask": torch.ones_like(pattern).tolist(),
                                       "source": ["synthetic"] * rows})  # a column forward does not take


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("bf16", [False, True])
def test_trainer_with_default_arguments_trains_and_resumes_exactly(tmp_path, bf16):
    from transformers import Trainer, TrainingArguments

    def args(out):
        return TrainingArguments(output_dir=str(out), max_steps=4, use_cpu=True, report_to=[], bf16=bf16,
                                 logging_steps=1, save_steps=2, learning_rate=2e-2)

    cm = compiled()
    before = {k: v.clone() for k, v in cm.adapter_state_dict().items()}
    trainer = Trainer(model=cm, args=args(tmp_path / "run"), train_dataset=lm_dataset())
    trainer.train()
    full = losses(trainer)
    assert len(full) == 4 and full[-1] < full[0]
    after = cm.adapter_state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if ".lora_B." in k)
    expected = (("cpu", torch.bfloat16),) if bf16 else ()
    assert expected in {key[3] for key in cm._graphs if key[0]}  # with bf16, a graph captured under autocast

    # The checkpoint holds the adapter in PEFT's format, not the base weights; resuming from it in a fresh model
    # reproduces the uninterrupted run.
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(checkpoint))
    assert "model.safetensors" not in os.listdir(checkpoint)
    from safetensors.torch import load_file
    saved = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
    assert set(saved) == {"base_model.model." + k for k in before}
    resumed_model = compiled(adapter_seed=123)  # the same base (a PEFT checkpoint holds none), other adapters
    assert not torch.equal(resumed_model.adapter_state_dict()[next(iter(before))], next(iter(before.values())))
    resumed = Trainer(model=resumed_model, args=args(tmp_path / "resumed"), train_dataset=lm_dataset())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert losses(resumed) == full  # steps 1-2 read back from the checkpoint's state, steps 3-4 trained again
    assert resumed.state.log_history[-2]["loss"] == full[-1]
    assert all(torch.equal(v, after[k]) for k, v in resumed_model.adapter_state_dict().items())
    if not bf16:  # what Trainer wrote is an adapter HF PEFT loads, computing what the compiled model does
        peft = pytest.importorskip("peft")
        assert isinstance(cm, peft.PeftModel) and cm.get_base_model() is cm
        torch.manual_seed(0)
        pm = peft.PeftModel.from_pretrained(tiny_llama(num_hidden_layers=1, vocab_size=64),
                                            str(tmp_path / "run" / "checkpoint-4")).eval()
        ids = torch.arange(16).reshape(2, 8)
        with torch.no_grad():
            torch.testing.assert_close(cm.eval()(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_evaluate_reports_eval_loss_with_default_arguments(tmp_path):
    """Labels are found on the class; the loss is the model's own (Trainer counts num_items_in_batch over the shifted
    labels because `loss_type` is the source's: without it, train and eval losses were scaled by 28/32 here)."""
    from transformers import Trainer, TrainingArguments

    cm = compiled()
    trainer = Trainer(model=cm, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                      eval_dataset=lm_dataset(rows=4))
    assert trainer.label_names == ["labels"]  # found on the class, as for the source model
    metrics = trainer.evaluate()
    cm.eval()
    batch = lm_dataset(rows=4)[:]
    with torch.no_grad():
        expected = cm(input_ids=torch.tensor(batch["input_ids"]), labels=torch.tensor(batch["labels"])).loss
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-6)


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_sft_trainer_with_its_defaults(tmp_path):
    trl = pytest.importorskip("trl")
    words = "the cat sat on a mat and dog ran under log".split()
    texts = ["the cat sat on the mat", "a dog ran under the log", "the dog sat on a log"] * 6
    cm = compiled(vocab=32)
    before = {k: v.clone() for k, v in cm.adapter_state_dict().items()}

    def sft(model, out):
        config = trl.SFTConfig(output_dir=str(out), max_steps=5, use_cpu=True, report_to=[], logging_steps=1,
                               learning_rate=2e-2, save_steps=3)
        assert config.bf16 and config.gradient_checkpointing  # TRL's defaults, which the test keeps
        return trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                              processing_class=word_tokenizer(words))

    trainer = sft(cm, tmp_path / "run")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 5 and logs[-1]["loss"] < logs[0]["loss"]
    assert all(0 < h["entropy"] and 0 <= h["mean_token_accuracy"] <= 1 for h in logs)
    after = cm.adapter_state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if ".lora_B." in k)
    # TRL's fused LM head ran the compiled backbone under bf16 autocast, with every block recomputed.
    assert cm.is_gradient_checkpointing and "sft" in cm.model_tags
    assert (("cpu", torch.bfloat16),) in {key[3] for key in cm._graphs if key[4] == "model"}
    assert cm.config.pad_token_id == 0  # TRL aligned the source model's config with the tokenizer
    # Its checkpoints hold the adapter in PEFT's format, and resuming from one reproduces the run's last steps.
    checkpoint = tmp_path / "run" / "checkpoint-3"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    resumed = sft(compiled(vocab=32, adapter_seed=123), tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h] == [h["loss"] for h in logs]


def test_sft_trainer_example_runs_end_to_end(tmp_path):
    pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    from examples.sft_trainer import main

    losses = main(str(tmp_path), max_steps=10)
    assert len(losses) == 2 and losses[-1] < losses[0]
    config = peft.PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert config.peft_type == "LORA" and config.r == 8
