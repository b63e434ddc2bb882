"""Fine-tune a small Llama with LoRA on q/v through peftc, then save the adapter with safetensors.

Run: .venv/bin/python examples/lora_llama.py
"""

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import peftc


def main() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 128, (4, 16))
    cm = peftc.compile(model, peftc.LoRA(target="q_proj|v_proj", r=8, alpha=16), kwargs={"input_ids": ids})
    cm.print_trainable_parameters()
    opt = torch.optim.AdamW(cm.trainable_parameters(), lr=1e-2)
    for step in range(20):
        loss = cm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    save_file({k: v.contiguous() for k, v in cm.adapter_state_dict().items()}, "adapter.safetensors")
    print("saved adapter.safetensors")


if __name__ == "__main__":
    main()
