import pytest

from fish_lab.cli import main as lab_main
from fish_tuning.cli import main


def test_demo_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    assert lab_main(["demo", "--data-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "data dir" in err and "--data-dir" in err


def test_unknown_command_exits():
    for entry in (main, lab_main):
        with pytest.raises(SystemExit):
            entry(["frobnicate"])


@pytest.mark.parametrize("argv", [["compare", "demo"], ["compare", "configs/glue6.yaml", "seeds=[0]"],
                                  ["compare", "--out-dir", "x", "demo"], ["compare"], ["report", "r.jsonl"],
                                  ["demo"]])
def test_the_paper_studies_point_to_the_lab_in_one_line(argv, capsys):
    """The wheel holds the library alone: the lab's commands are named, with the command that runs them."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fish-tune: error: the paper's studies") and "\n" not in err
    assert f"python -m fish_lab {' '.join(argv)}" in err and "fish-tune compare --model_name_or_path" in err
