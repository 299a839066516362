"""Mask files keep their entries: a changed index is refused on load (recorded fingerprint), and `fish-tune mask`
never writes its summary or picture over the mask file (--show is read-only)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

import fish_tuning as ft
from conftest import lora, tiny_bert
from fish_tuning.cli import main


def _plain_mask() -> ft.FishMask:
    g = torch.Generator().manual_seed(0)
    scores = {"a.lora_A.weight": torch.rand(4, 8, generator=g), "a.lora_B.weight": torch.rand(8, 4, generator=g),
              "b.weight": torch.rand(3, generator=g)}
    return ft.select_mask(scores, keep=0.25, exclude=r"^b\.")


def _peft_pair(model=None) -> tuple[torch.nn.Module, ft.FishMask]:
    model = model if model is not None else lora(tiny_bert(), modules_to_save=["classifier"])
    g = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters() if p.requires_grad}
    return model, ft.select_mask(scores, keep=0.1, always_train="classifier", exclude=r"layer\.1\..*lora_B")


def _rewrite(path, tamper: bool = True, drop_fingerprint: bool = False) -> None:
    """Move one kept index to a free neighbour (still sorted, in range, same count) and / or drop the fingerprint."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["fish_mask"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if tamper:
        for name, idx in tensors.items():
            numel, kept = torch.Size(meta["shapes"][name]).numel(), set(idx.tolist())
            j = next((j for j, i in enumerate(idx.tolist()) if i + 1 < numel and i + 1 not in kept), None)
            if j is not None:
                idx[j] += 1
                break
    if drop_fingerprint:
        del meta["fingerprint"]
    save_file(tensors, str(path), metadata={"fish_mask": json.dumps(meta)})


def test_a_changed_index_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    _plain_mask().save(path)
    _rewrite(path)
    with pytest.raises(ValueError, match="corrupt mask file .*fingerprint .* does not match .*re-create or re-download"):
        ft.FishMask.load(path)


def test_a_changed_index_is_refused_in_a_peft_mask(tmp_path):
    model, mask = _peft_pair()
    path = tmp_path / "m.safetensors"
    mask.save(path, model=model)
    assert ft.FishMask.load(path, model=model).fingerprint() == mask.fingerprint()
    _rewrite(path)
    with pytest.raises(ValueError, match="fingerprint"):
        ft.FishMask.load(path, model=model)


def test_a_file_without_fingerprint_still_loads(tmp_path):
    """Older files carry no fingerprint: loaded as before (the same change with a fingerprint is refused)."""
    mask = _plain_mask()
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    mask.save(old)
    mask.save(new)
    _rewrite(old, tamper=False, drop_fingerprint=True)
    assert ft.FishMask.load(old).fingerprint() == mask.fingerprint()
    _rewrite(old)
    _rewrite(new)
    assert ft.FishMask.load(old).num_selected == mask.num_selected
    with pytest.raises(ValueError, match="fingerprint"):
        ft.FishMask.load(new)


def test_a_mask_remapped_to_another_adapter_name_still_loads(tmp_path):
    """The fingerprint is checked under the names it was saved with, before the adapter name is mapped."""
    model, mask = _peft_pair()
    path = tmp_path / "m.safetensors"
    mask.save(path, model=model)
    loaded = ft.FishMask.load(path, adapter_name="sst2")
    assert all(".sst2." in n for n in loaded.names) and loaded.excluded and all(".sst2." in n for n in loaded.excluded)
    assert [n.replace(".sst2.", ".default.") for n in loaded.names] == mask.names
    # saved under "sst2", loaded into a model whose active adapter is "default"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                        modules_to_save=["classifier"])
    other, sst2_mask = _peft_pair(get_peft_model(tiny_bert(), config, adapter_name="sst2"))
    assert all(".sst2." in n for n in sst2_mask.names)
    sst2_mask.save(path, model=other)
    assert ft.FishMask.load(path, model=lora(tiny_bert(), modules_to_save=["classifier"])).num_selected == \
        sst2_mask.num_selected
    _rewrite(path)
    with pytest.raises(ValueError, match="fingerprint"):
        ft.FishMask.load(path, adapter_name="x")


def test_save_adapter_load_adapter_round_trip_under_another_name(tmp_path):
    model, mask = _peft_pair()
    ft.save_adapter(model, mask, tmp_path / "a")
    _, loaded = ft.load_adapter(tiny_bert(), tmp_path / "a", adapter_name="sst2")
    assert loaded.num_selected == mask.num_selected
    _rewrite(tmp_path / "a" / ft.FishMask.FILE_NAME)
    with pytest.raises(ValueError, match="fingerprint"):
        ft.load_adapter(tiny_bert(), tmp_path / "a", adapter_name="sst2")


# ----------------------------------------------------------------------------- the CLI never clobbers the mask
def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fish-tune: error: ") and "\n" not in err, err
    return err


def test_show_leaves_the_mask_file_untouched(tmp_path, capsys):
    """A mask named ``m.json`` used to be replaced by its own summary (default path: stem + .json), rc 0."""
    path = tmp_path / "m.json"
    _plain_mask().save(path)
    before = path.read_bytes()
    assert main(["mask", "--show", str(path), "--png", "none"]) == 2
    assert "--summary_json" in _error(capsys) and path.read_bytes() == before
    assert main(["mask", "--show", str(path), "--png", "none", "--summary_json", str(tmp_path / "s.json")]) == 0
    assert path.read_bytes() == before and json.loads((tmp_path / "s.json").read_text())["num_selected"] == 16
    assert ft.FishMask.load(path).num_selected == 16


@pytest.mark.parametrize("mask_name, extra, message", [
    ("m.json", ["--png", "none"], "summary would overwrite the mask file"),  # default summary = stem + .json
    ("m.png", ["--summary_json", "s.json"], "picture would overwrite the mask file"),  # default picture
    ("m.safetensors", ["--summary_json", "m.safetensors", "--png", "none"], "summary would overwrite the mask"),
    ("m.safetensors", ["--summary_json", "./sub/../m.safetensors"], "summary would overwrite the mask"),
    ("m.safetensors", ["--png", "m.safetensors"], "picture would overwrite the mask file"),
    ("m.safetensors", ["--summary_json", "link.json", "--png", "none"], "summary would overwrite the mask"),
    ("m.safetensors", ["--summary_json", "s.out", "--png", "s.out"], "both be written to"),
])
@pytest.mark.parametrize("command", ["show", "compute"])
def test_outputs_that_are_one_file_are_refused_before_anything_is_written(
        tmp_path, capsys, monkeypatch, command, mask_name, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    _plain_mask().save(mask_name)
    os.symlink(mask_name, "link.json")
    before = sorted(os.listdir(tmp_path)), (tmp_path / mask_name).read_bytes()
    (tmp_path / "train.csv").write_text("sentence,label\ngood,1\nbad,0\n")
    if command == "show":
        argv = ["mask", "--show", mask_name, *extra]
    else:  # refused before the model (a path that does not exist) is looked at
        argv = ["mask", "--model_name_or_path", "no-such-model", "--train_file", "train.csv", "--keep", "0.1",
                "--output", mask_name, *extra]
    assert main(argv) == 2
    err = _error(capsys)
    assert message in err and ("--summary_json" in err or "--png" in err), err
    os.remove("train.csv")
    assert (sorted(os.listdir(tmp_path)), (tmp_path / mask_name).read_bytes()) == before
    assert ft.FishMask.load(mask_name).num_selected == _plain_mask().num_selected
