"""compute_fisher on batch layouts whose rows are not one labelled sample each.

Packed rows (padding-free collators) hold several examples: the squared gradient of a row is then the squared
gradient of a sum, so compute_fisher must refuse them before any pass. A class label of -100 (ignored by the
model's own loss) marks a row without a label: it scores nothing and is not counted in N.
"""

import pytest
import torch
from transformers import DataCollatorWithFlattening

import fish_tuning as ft
from conftest import cls_batches, lm_batches, lora, tiny_bert
from fish_tuning.loglik import sample_labels

ENGINES = ["auto", "vectorized", "loop"]


def _examples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 64, (6 + i % 3,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return out


def _packed(layout):
    """One packed row of 4 examples, marked only by the collator keys of ``layout``."""
    full = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(_examples())
    keep = {"position_ids": ("position_ids",), "cu_seq_lens": ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                                               "max_length_k"), "seq_idx": ("seq_idx",)}[layout]
    return {k: v for k, v in full.items() if k in ("input_ids", "labels") + keep}


def _rel_err(got, ref):
    return max(float((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)) for n in ref)


def _forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("layout", ["position_ids", "cu_seq_lens", "seq_idx"])
@pytest.mark.parametrize("engine", ENGINES)
def test_packed_batch_raises_before_any_pass(llama_lora, engine, layout):
    batch = _packed(layout)
    assert batch["input_ids"].shape[0] == 1  # one row, four examples
    calls, handle = _forwards(llama_lora)
    with pytest.raises(ValueError, match="packed") as err:
        ft.compute_fisher(llama_lora, [batch], num_samples=4, engine=engine, progress=False)
    handle.remove()
    assert "DataCollatorWithPadding" in str(err.value) and "FishCallback(mask=" in str(err.value)
    assert not calls  # refused before the model ran


def test_packed_batch_after_normal_ones_raises(llama_lora):
    batches = [lm_batches(1, 2)[0], _packed("position_ids")]
    with pytest.raises(ValueError, match="packed"):
        ft.compute_fisher(llama_lora, batches, num_samples=8, progress=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_padded_batches_with_position_ids_still_work(llama_lora, engine):
    """Left padding (positions 1, 1, 0, 1, ... as generation builds them) and right padding at position 0 are
    padding, not packing; one example per flattened row is one sample."""
    batch = lm_batches(1, 4)[0]
    mask = batch["attention_mask"]
    mask[0, :3] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    batch["labels"][mask == 0] = -100
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    pos[1, -2:] = 0
    batch["position_ids"] = pos
    single = [DataCollatorWithFlattening(return_flash_attn_kwargs=True)([ex]) for ex in _examples(2)]
    got = ft.compute_fisher(llama_lora, [batch] + single, num_samples=6, engine=engine, progress=False)
    ref = ft.compute_fisher(llama_lora, [batch] + single, num_samples=6, engine="loop", progress=False)
    assert _rel_err(got, ref) <= 1e-5
    assert sum(float(v.sum()) for v in got.values()) > 0


def _cls_with_ignored():
    """Two batches of 8; rows 0, 2 and 7 of the first have no label (-100)."""
    batches = cls_batches(2, 8)
    batches[0]["labels"][[0, 2, 7]] = -100
    return batches


def _rows(batch, idx):
    return {k: v[idx] for k, v in batch.items()}


@pytest.mark.parametrize("engine", ENGINES)
def test_ignored_class_labels_are_not_samples(engine):
    model = lora(tiny_bert())
    batches = _cls_with_ignored()
    labelled = [1, 3, 4, 5, 6]
    # num_samples=8 counts labelled rows: the 5 of batch 0, then the first 3 of batch 1
    got = ft.compute_fisher(model, batches, num_samples=8, engine=engine, progress=False)
    ref = ft.compute_fisher(model, [_rows(batches[0], labelled), _rows(batches[1], slice(0, 3))], num_samples=8,
                            engine="loop", progress=False)
    assert _rel_err(got, ref) <= 1e-5
    # N is the labelled count: one batch with 3 unlabelled rows scores 5 samples
    with pytest.warns(UserWarning, match="only 5 samples available"):
        one = ft.compute_fisher(model, batches[:1], num_samples=8, engine=engine, progress=False)
    ref5 = ft.compute_fisher(model, [_rows(batches[0], labelled)], num_samples=5, engine="loop", progress=False)
    assert _rel_err(one, ref5) <= 1e-5


@pytest.mark.parametrize("engine", ENGINES)
def test_ignored_class_labels_expected_fisher(engine):
    """Drawn labels keep the unlabelled rows unlabelled: 5 samples, not 8."""
    model = lora(tiny_bert())
    with pytest.warns(UserWarning, match="only 5 samples available"):
        got = ft.compute_fisher(model, _cls_with_ignored()[:1], num_samples=8, kind="expected", engine=engine,
                                progress=False)
    assert all(torch.isfinite(v).all() for v in got.values())


def test_sample_labels_keeps_unlabelled_rows():
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, -100, 2, -100, 1, 1])
    drawn = sample_labels(logits, labels, torch.Generator().manual_seed(0))
    assert drawn.tolist()[1] == -100 and drawn.tolist()[3] == -100
    assert all(0 <= int(d) < 3 for i, d in enumerate(drawn) if i not in (1, 3))


@pytest.mark.parametrize("engine", ["auto", "loop"])
def test_every_class_label_ignored_raises_clearly(engine):
    model = lora(tiny_bert())
    batches = cls_batches(2, 4)
    for b in batches:
        b["labels"][:] = -100
    with pytest.raises(ValueError, match="every label of the calibration batches is -100"):
        ft.compute_fisher(model, batches, num_samples=8, engine=engine, progress=False)
