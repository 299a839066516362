"""The package as users install it: a light import, lazy integrations, --version, the wheel (the library alone);
the lab's presets by name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import fish_tuning as ft
from fish_lab.cli import main as lab_main
from fish_lab.presets import list_presets, resolve_config
from fish_tuning.cli import main
from helpers import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["transformers", "peft", "matplotlib", "sklearn", "scipy", "yaml", "datasets", "trl"]


def _run(code: str, python: str = sys.executable, **kw) -> str:
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S, **kw)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_import_is_light_and_integrations_load_on_first_use():
    code = ("import sys, fish_tuning as ft\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
            "ft.FishCallback\n"
            "print('transformers.trainer_callback' in sys.modules)\n")
    heavy, callback_loaded = _run(code).split("\n")[:2]
    assert heavy == "[]"
    assert callback_loaded == "True"  # the lazy name really resolves (and brings the Trainer stack with it)


def test_core_modules_never_import_the_experiment_extras():
    mods = ["mask", "fisher", "guard", "optim", "adafish", "allocation", "config", "models", "methods",
            "per_sample", "loglik", "dist", "cli", "commands.compare", "commands.compare_report"]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module('fish_tuning.{m}')\n" for m in mods) + \
        "print(sorted(m for m in ['matplotlib', 'sklearn', 'scipy', 'yaml', 'datasets'] if m in sys.modules))"
    assert _run(code).strip() == "[]"


def test_every_public_name_resolves_and_is_listed():
    for name in ft.__all__:
        assert getattr(ft, name) is not None, name
    assert set(ft.__all__) <= set(dir(ft))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ft.nope  # noqa: B018
    assert (ROOT / "src" / "fish_tuning" / "py.typed").is_file()


def test_version_matches_pyproject_from_python_m_and_cli(capsys):
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert ft.__version__ == version
    out = subprocess.run([sys.executable, "-m", "fish_tuning", "--version"], capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert out.returncode == 0 and out.stdout.strip() == f"fish-tune {version}"
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and version in capsys.readouterr().out


def test_presets_by_name(tmp_path, monkeypatch):
    assert {"demo", "glue6", "gsm8k"} <= set(list_presets())
    assert resolve_config("demo") == ROOT / "configs" / "demo.yaml"
    assert resolve_config("glue6.yaml").name == "glue6.yaml"
    monkeypatch.chdir(tmp_path)  # outside the checkout: the README's "configs/demo.yaml" still finds the preset
    assert resolve_config("configs/demo.yaml") == ROOT / "configs" / "demo.yaml"
    own = tmp_path / "demo"
    own.write_text("tasks: [sst2]\n")
    assert resolve_config("demo").resolve() == own  # a real file wins over a preset of the same name


def test_unknown_preset_is_one_line_listing_the_presets(capsys):
    assert lab_main(["compare", "no_such_preset"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fish_lab: error: config 'no_such_preset' is neither a file nor a preset")
    assert "demo" in err and "glue6" in err and "\n" not in err


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    """Build the wheel, install it (not editable) into a fresh venv, and run it from a folder outside the repo.

    The fresh venv reaches the heavy dependencies (torch, transformers, ...) of this test environment through a
    .pth line appended after its own site-packages, so the installed wheel, not src/, is what gets imported.
    """
    pytest.importorskip("hatchling")
    from hatchling.build import build_wheel

    wheel = tmp_path / "dist" / build_wheel(str(tmp_path / "dist"))
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(_run("import sysconfig; print(sysconfig.get_paths()['purelib'])", str(py)).strip())
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "zz_test_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=HANG_GUARD_S)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run("import fish_tuning, sys, importlib.util as u\n"
                 "print(fish_tuning.__file__); print(u.find_spec('fish_lab')); print('transformers' in sys.modules)",
                 str(py), cwd=run_dir, env=env).split("\n")
    assert where[0].startswith(str(site))  # the wheel's code
    assert where[1] == "None" and where[2] == "False"  # the lab is not installed with it
    script = env_dir / "bin" / "fish-tune"
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=run_dir, env=env,
                             timeout=HANG_GUARD_S)
    assert version.returncode == 0 and version.stdout.strip() == f"fish-tune {ft.__version__}"
    helptext = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True, cwd=run_dir,
                              env=env, timeout=HANG_GUARD_S)
    assert helptext.returncode == 0, helptext.stderr[-2000:]
    for flag in ("--model_name_or_path", "--train_file", "--keep", "--budget", "--learning_rate", "--peft"):
        assert flag in helptext.stdout
    # the README's quick-start data comes with the wheel (fish-tune quickstart writes examples/data)
    quick = subprocess.run([str(script), "quickstart"], capture_output=True, text=True, cwd=run_dir, env=env,
                           timeout=HANG_GUARD_S)
    assert quick.returncode == 0, quick.stderr[-2000:]
    for name in ("reviews.csv", "reviews_dev.csv", "sft.jsonl"):
        assert (run_dir / "examples" / "data" / name).read_bytes() == (ROOT / "examples" / "data" / name).read_bytes()


def test_study_commands_without_the_experiments_extra_say_which_extra(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    for argv in (["compare", "demo"], ["report", "x.jsonl"], ["demo"]):
        assert lab_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"fish_lab: error: fish_lab {argv[0]} needs the experiments extra (missing: sklearn): "
                       "pip install 'fish-tuning[experiments]'")


def test_quickstart_writes_the_readme_data_and_never_overwrites(tmp_path, capsys):
    from fish_tuning.cli import main

    target = tmp_path / "examples" / "data"
    assert main(["quickstart", "--dir", str(target)]) == 0
    assert (target / "reviews.csv").read_bytes() == (ROOT / "examples" / "data" / "reviews.csv").read_bytes()
    assert main(["quickstart", "--dir", str(target)]) == 0  # identical files: nothing to do
    (target / "sft.jsonl").write_text("mine\n")
    assert main(["quickstart", "--dir", str(target)]) == 2
    assert "exists with other content" in capsys.readouterr().err
    assert (target / "sft.jsonl").read_text() == "mine\n"


def test_train_help_is_cached_and_then_needs_no_transformers(tmp_path):
    """`fish-tune train --help` built the full HfArgumentParser (transformers + peft imports, 6-15 s); the text is
    now cached per versions and flag sources, so a second call imports neither."""
    env = {**os.environ, "FISH_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT / "src")}
    code = ("import sys; from fish_tuning.cli import main; main(['train', '--help']); "
            "print('transformers' in sys.modules, file=sys.stderr)")
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    assert first.returncode == second.returncode == 0, second.stderr[-2000:]
    assert first.stdout == second.stdout and "--learning_rate" in second.stdout and "--dense" in second.stdout
    assert first.stderr.strip().splitlines()[-1] == "True" and second.stderr.strip().splitlines()[-1] == "False"


def test_the_wheel_holds_the_library_alone(tmp_path):
    """Every file of the wheel is fish_tuning's own (no lab, no study presets, no experiments package), and the
    package never imports the lab."""
    pytest.importorskip("hatchling")
    import zipfile

    from hatchling.build import build_wheel

    wheel = tmp_path / build_wheel(str(tmp_path))
    names = zipfile.ZipFile(wheel).namelist()
    outside = [n for n in names if not n.startswith(("fish_tuning/", "fish_tuning-"))]
    assert outside == [] and "fish_tuning/cli.py" in names and "fish_tuning/commands/compare.py" in names
    assert not [n for n in names if "experiments" in n or "presets" in n or n.endswith(".yaml")]
    source = [p.read_text() for p in (ROOT / "src" / "fish_tuning").rglob("*.py")]
    assert not [t for t in source if re.search(r"^\s*(from|import) fish_lab", t, re.M)]


def _import_graph() -> dict[str, set[str]]:
    """module -> the package/lab modules it imports (anywhere in the file, lazy imports included)."""
    import ast

    files = {}
    for root, pkg in ((ROOT / "src", "fish_tuning"), (ROOT / "lab", "fish_lab")):
        for p in (root / pkg).rglob("*.py"):
            parts = list(p.relative_to(root).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for name, path in files.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                mod = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                subs = {f"{mod}.{a.name}" for a in node.names} & set(files)
                deps |= subs | ({mod} if len(subs) < len(node.names) else set())  # names of the module itself
        graph[name] = (deps & set(files)) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module."""
    reach = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        reach[start] = seen
    comps = {frozenset({a} | {b for b in reach[a] if a in reach[b]}) for a in graph if a in reach[a]}
    return [set(c) for c in comps if len(c) > 1]


def test_the_import_graph_has_no_circle():
    graph = _import_graph()
    assert "fish_lab.tasks" in graph and "fish_tuning.commands.compare" in graph
    assert not any(d.startswith("fish_lab") for m, deps in graph.items() if m.startswith("fish_tuning") for d in deps)
    assert _cycles(graph) == []  # no circle anywhere: the package, its lazy imports and the lab
    assert "fish_tuning.commands.maskview" not in graph["fish_lab.report"]  # the lab reads records, not CLI views
    fake = {**graph, "fish_lab.hub": {"fish_lab.tasks"}, "fish_lab.tasks": graph["fish_lab.tasks"] | {"fish_lab.hub"}}
    assert {"fish_lab.hub", "fish_lab.tasks"} in _cycles(fake)  # the check sees the circle that was there


def test_the_cli_drops_bitsandbytes_kernel_hub_line_only():
    """`fish-tune` runs without bitsandbytes' import-time line about a hub kernel it could not fetch (printed on every
    command on AVX512-bf16 CPUs, 4-bit or not); other bitsandbytes warnings still show."""
    pytest.importorskip("bitsandbytes")
    code = ("import logging, sys\nfrom fish_tuning.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "import bitsandbytes\n"  # logs the line at import on an AVX512-bf16 CPU
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another bitsandbytes warning')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert run.returncode == 0, run.stderr
    assert "gemm_4bit_forward" not in run.stderr and "another bitsandbytes warning" in run.stderr
