import pytest

from fish_tuning.cli import main


def test_demo_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--data-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "data dir" in err and "--data-dir" in err


def test_unknown_command_exits():
    with pytest.raises(SystemExit):
        main(["frobnicate"])
