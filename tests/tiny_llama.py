"""A tiny Llama built from a config (no download), shared by the PEFT tests."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

N_LAYERS = 14  # LoRA Linear layers: 2 decoder layers x (q, k, v, o, gate, up, down)
VOCAB = 128


def base_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=VOCAB)
    return LlamaForCausalLM(cfg).to(dtype)
