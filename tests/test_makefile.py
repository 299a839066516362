"""`make test` runs both suites (main + tests/with_adapters in .venv-adapters) and fails if either fails; pytest's
exit 5 (no test collected) counts as a failure. Checked with stand-in pythons that record their calls."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def _fake_python(folder: Path, code: int, log: Path) -> Path:
    (folder / "bin").mkdir(parents=True)
    script = folder / "bin" / "python"
    script.write_text(f"#!/bin/sh\necho \"{folder.name} $*\" >> {log}\nexit {code}\n")
    script.chmod(0o755)
    return folder


@pytest.mark.parametrize("main_code, adapters_code, ok", [(0, 0, True), (1, 0, False), (0, 1, False), (0, 5, False),
                                                          (5, 0, False)])
def test_make_test_runs_both_suites_and_fails_if_either_fails(tmp_path, main_code, adapters_code, ok):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    log = tmp_path / "calls.log"
    main = _fake_python(tmp_path / "main", main_code, log)
    adapters = _fake_python(tmp_path / "adapters", adapters_code, log)
    stamp = tmp_path / "stamp"
    stamp.write_text("")
    run = subprocess.run(["make", "-s", "-C", str(ROOT), "test", f"VENV={main}", f"AVENV={adapters}",
                          f"STAMP={stamp}", f"ASTAMP={stamp}"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    calls = log.read_text().splitlines()
    assert calls == ["main -m pytest -q -ra", "adapters -m pytest -q -ra tests/with_adapters"], calls
    assert (run.returncode == 0) == ok, run.stdout + run.stderr
    assert f"main suite exit {main_code}, adapters suite exit {adapters_code}" in run.stdout


def test_make_demo_runs_the_users_path_with_flags_compare_accepts(tmp_path):
    """`make demo` writes SST-2 as CSV through the lab's data preset and runs `fish-tune compare` on it (the user's
    path, not the lab's loop); its compare flags parse and pass compare's checks (arms, per-arm rates, budgets)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    from fish_tuning.commands import compare

    stamp = tmp_path / "stamp"
    stamp.write_text("")
    (tmp_path / "d" / "sst2").mkdir(parents=True)
    for name in ("train.csv", "dev.csv"):  # what the data step writes
        (tmp_path / "d" / "sst2" / name).write_text("sentence,label\na fine film,1\n")
    run = subprocess.run(["make", "-s", "-n", "-C", str(ROOT), "demo", f"STAMP={stamp}", f"DEMO={tmp_path / 'd'}"],
                         capture_output=True, text=True, timeout=HANG_GUARD_S)
    lines = [line for line in run.stdout.replace("\\\n", " ").splitlines() if line.strip()]
    assert run.returncode == 0 and len(lines) == 2, run.stdout + run.stderr
    assert "-m fish_lab data sst2" in lines[0] and "fish-tune compare" in lines[1]
    argv = lines[1].split("fish-tune compare", 1)[1].split()
    arms, seeds, budgets, forwarded, rates = compare.check_flags(argv)[5:10]
    assert "original" in arms and "fish" in arms and "rand" in arms and "shuffled" in arms
    assert set(rates) == set(arms) and len(seeds) >= 1
    assert ["--validation_file", f"{tmp_path / 'd'}/sst2/dev.csv"] == forwarded[forwarded.index("--validation_file"):][:2]
