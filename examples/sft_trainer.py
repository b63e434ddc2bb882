"""Fine-tune a tiny Llama with LoRA through peftc and TRL's SFTTrainer, with TRL's defaults; save the adapter in
HF PEFT's format.

Run: .venv/bin/python examples/sft_trainer.py [output_dir]
"""

import sys
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

import peftc

TEXTS = ["the cat sat on the mat", "a dog ran under the log", "the dog sat on a log", "a cat ran on the mat"]


def word_tokenizer(texts):
    """A word-level tokenizer over the corpus: no download."""
    words = sorted({w for t in texts for w in t.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def main(output_dir: str, max_steps: int = 20) -> list[float]:
    torch.manual_seed(0)
    tokenizer = word_tokenizer(TEXTS)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    cm = peftc.compile(model, peftc.LoRA(target="q_proj|v_proj", r=8, alpha=16),
                       kwargs={"input_ids": torch.zeros(2, 8, dtype=torch.long)})
    cm.print_trainable_parameters()

    # SFTConfig's defaults: bf16 autocast and gradient checkpointing (peftc: schedule-recompute of every layer).
    args = SFTConfig(output_dir=output_dir, max_steps=max_steps, use_cpu=True, report_to=[], logging_steps=5,
                     learning_rate=1e-2)
    trainer = SFTTrainer(model=cm, args=args, train_dataset=Dataset.from_dict({"text": TEXTS * 8}),
                         processing_class=tokenizer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("losses:", ", ".join(f"{x:.3f}" for x in losses))

    cm.save_pretrained(f"{output_dir}/adapter")  # peft.PeftModel.from_pretrained(base, ...) loads it
    print(f"saved the adapter to {output_dir}/adapter")
    return losses


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="peftc-sft-"))
