"""FishCallback in TRL's SFTTrainer on a tiny causal LM (prompt/completion data, completion-only loss)."""

import pytest
import torch

import fish_tuning as ft
from conftest import VOCAB, lora, tiny_llama
from helpers import assert_only_kept_moved

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def sft_data(n=24, seed=3):
    g = torch.Generator().manual_seed(seed)
    words = lambda k: " ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (k,), generator=g))  # noqa: E731
    return datasets.Dataset.from_dict({"prompt": [words(5) for _ in range(n)], "completion": [words(4) for _ in range(n)]})


def test_sft_trainer_masked_training(tmp_path):
    model = lora(tiny_llama(), targets=("q_proj", "v_proj"), task="CAUSAL_LM")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = ft.FishCallback(keep=0.05, num_samples=16)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                         weight_decay=0.1, report_to=[], use_cpu=True, save_strategy="steps", save_steps=3,
                         max_length=32, bf16=False, disable_tqdm=True, logging_steps=1, seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=word_tokenizer(),
                             callbacks=[cb])
    trainer.train()
    mask = cb.mask
    assert cb.source == "fisher" and mask.num_selected == round(0.05 * mask.num_candidates)
    assert mask.meta["fisher"]["num_samples"] == 16 and mask.meta["fisher"]["kept"] > 0
    assert assert_only_kept_moved(model, mask, before) > 0.9 * mask.num_selected
    assert any(e.get("fish/kept") == mask.num_selected for e in trainer.state.log_history)
    saved = ft.FishMask.load(tmp_path / "checkpoint-3" / ft.FishMask.FILE_NAME, model)
    assert all(torch.equal(saved.indices[n], mask.indices[n]) for n in mask.names)
