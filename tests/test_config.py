"""FishConfig: one validated configuration object, used by the callback and saved with the mask."""

import pytest
from transformers import HfArgumentParser

import fish_tuning as ft


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep=0.1, budget=5), "exactly one"), (dict(keep=2.0), "keep"), (dict(budget=-1), "budget"),
    (dict(strategy="best"), "strategy"), (dict(alpha=2), "alpha"), (dict(num_samples=0), "num_samples"),
    (dict(fisher_kind="true"), "fisher_kind"), (dict(fisher_engine="fast"), "fisher_engine"),
    (dict(exclude=["layer["]), "exclude"), (dict(seed=-3), "seed"),
])
def test_bad_values_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ft.FishConfig(**kwargs)


def test_parses_from_the_command_line_with_help():
    parser = HfArgumentParser(ft.FishConfig)
    (cfg,) = parser.parse_args_into_dataclasses(["--keep", "0.05", "--strategy", "fish_balanced", "--exclude",
                                                 r"layer\.0\.", "--fisher_kind", "expected"])
    assert cfg.keep == 0.05 and cfg.strategy == "fish_balanced" and cfg.exclude == [r"layer\.0\."]
    assert cfg.fisher_kind == "expected"
    assert "Fraction of the PEFT candidate entries" in parser.format_help()


def test_callback_takes_a_config_and_refuses_both_forms():
    cb = ft.FishCallback(config=ft.FishConfig(budget=10, strategy="rand", seed=4))
    assert (cb.budget, cb.strategy, cb.seed) == (10, "rand", 4)
    with pytest.raises(ValueError, match="not both"):
        ft.FishCallback(config=ft.FishConfig(budget=10), keep=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        ft.FishCallback(config=ft.FishConfig())


def test_config_is_saved_in_the_mask_file(tmp_path):
    from transformers import Trainer

    from conftest import lora, tiny_bert
    from test_trainer_callback import bert_rows, make_args

    cfg = ft.FishConfig(keep=0.1, num_samples=16, strategy="fish_balanced", alpha=0.25)
    cb = ft.FishCallback(config=cfg)
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    Trainer(model=model, args=make_args(tmp_path, steps=2), train_dataset=bert_rows(), callbacks=[cb]).train()
    saved = ft.FishMask.load(tmp_path / ft.FishMask.FILE_NAME, model=model)
    assert saved.meta["fish_config"] == cfg.to_dict() and saved.meta["alpha"] == 0.25
    assert saved.strategy == "fish_balanced" and saved.fingerprint() == cb.mask.fingerprint()
