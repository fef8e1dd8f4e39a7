"""The PEFT drop-in inside transformers.Trainer as LLM users train: a float32 model with bf16=True
(mixed precision through torch.autocast), and a bfloat16 model with PEFT's default float32
adapters. The fused path runs, the loss goes down, and the saved adapter loads into stock PEFT
with the trained values."""
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import fastlora.peft as fp
from tiny_llama import N_LAYERS, VOCAB, base_model


STEPS = 60


class RepeatedBatch(torch.utils.data.Dataset):
    """Eight fixed random sequences: a tiny model can only lower its loss by memorising them."""

    def __init__(self):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, VOCAB, (8, 16), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("model_dtype, autocast_bf16", [(torch.float32, True), (torch.bfloat16, False)],
                         ids=["float32-model-bf16-autocast", "bfloat16-model-float32-adapters"])
def test_trainer_runs_fused_path_and_saves_peft_files(tmp_path, model_dtype, autocast_bf16):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers / accelerate deprecations
        model = get_peft_model(base_model(model_dtype), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                                  target_modules="all-linear"))
    assert fp.patch(model) == N_LAYERS
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=STEPS,
                             learning_rate=2e-2, bf16=autocast_bf16, use_cpu=True, logging_steps=1,
                             save_strategy="no",
                             report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=RepeatedBatch())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback warns: the fused path must run
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|accelerate|torch)\.")
        trainer.train()
    # every LoRA layer call of every step (forward; gradient checkpointing off) was fused
    assert fp.fast_path_calls(model) == STEPS * N_LAYERS
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS
    # clearly down: per-step noise is ~1% of the loss (the bfloat16 base learns more slowly, in
    # stock PEFT too)
    assert sum(losses[-4:]) / 4 < 0.95 * sum(losses[:4]) / 4, losses
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)

    model.save_pretrained(str(tmp_path / "adapter"))
    stock = PeftModel.from_pretrained(base_model(model_dtype), str(tmp_path / "adapter"))
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in stock.named_parameters() if "lora_" in n}
    assert trained.keys() == loaded.keys() and len(trained) == 2 * N_LAYERS
    for n in trained:
        assert torch.equal(trained[n], loaded[n]), n
    with torch.no_grad():
        assert torch.isfinite(stock(RepeatedBatch().ids[:2]).logits).all()
