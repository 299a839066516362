"""The results file of `fish-tune compare`: one JSON record per finished run, one per line.

Light on purpose (json / os only): `python -m fish_lab report` reads results through this module without importing torch,
peft or the runner.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path

# what every record must hold for resume and report; a line without these is skipped (and its run redone)
_REQUIRED = {"id": str, "task": str, "method": str, "mode": str, "strategy": str, "seed": int,
             "budget": (int, float), "score": (int, float), "epochs": list, "trainable": dict}
_TRAINABLE = ("peft", "proportion", "always_train")
_EPOCH = ("dev_loss", "dev_score")


def record_problem(obj: object) -> str | None:
    """Why ``obj`` is not a usable run record (None when it is)."""
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not a run record"
    for key, kind in _REQUIRED.items():
        if key not in obj:
            return f"no {key!r} field"
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"field {key!r} is {value!r}"
    if not math.isfinite(obj["score"]):
        return f"score is {obj['score']!r}"
    if not obj["epochs"] or not all(isinstance(e, dict) and all(isinstance(e.get(k), (int, float)) for k in _EPOCH)
                                    for e in obj["epochs"]):
        return "no per-epoch dev_loss / dev_score"
    if not all(isinstance(obj["trainable"].get(k), (int, float)) for k in _TRAINABLE):
        return f"'trainable' lacks one of {list(_TRAINABLE)}"
    return None


def read_results(path: str | os.PathLike) -> list[dict]:
    """Records of a results file. A line that is not JSON (a run killed mid-write) or not a run record is skipped
    with a warning naming ``file:line``; its run counts as not done, so a resumed study redoes it."""
    out: list[dict] = []
    path = Path(path)
    if not path.is_file():
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{n} is not valid JSON (interrupted write?); skipped, that run will be redone",
                              stacklevel=2)
                continue
            problem = record_problem(obj)
            if problem:
                warnings.warn(f"{path}:{n} is not a run record ({problem}); skipped", stacklevel=2)
                continue
            out.append(obj)
    return out


def check_writable(folder: str | os.PathLike, results: str | os.PathLike | None = None) -> None:
    """Probe that ``folder`` can hold the results (a temp folder is made and removed in ``folder``, or in its nearest
    existing parent when ``folder`` does not exist yet: nothing is left behind); raise ValueError naming the folder
    otherwise, so a study stops before any model loads rather than after its first run has trained."""
    folder = Path(folder).absolute()
    base = folder
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        if not base.is_dir():
            raise NotADirectoryError(20, f"{base} is not a folder")
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe.", dir=base))
        if results is not None and Path(results).exists():
            with open(results, "ab"):
                pass
    except OSError as err:
        raise ValueError(f"config field 'out_dir': cannot write results to {folder} ({err.strerror or err}); "
                         "choose a writable folder with --out-dir DIR") from None
