"""Which columns and task `fish-tune train` / `mask` read from the data: the text column(s) as transformers'
run_glue.py finds them, the label column, the task, and the checks on the values, before any model loads."""

from __future__ import annotations

import math

from .common import LABEL_NAMES, TASKS, TEXT_NAMES, CommandError, DataArguments, ModelArguments


def _pick(columns: list[str], given: str | None, flag: str, names: tuple[str, ...]) -> str | None:
    if given is not None:
        if given not in columns:
            raise CommandError(f"column {given!r} ({flag}) is not in the train data; its columns are: "
                               f"{', '.join(columns)}")
        return given
    return next((n for n in names if n in columns), None)


PAIR_NAMES = (("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
              ("premise", "hypothesis"), ("question", "passage"))
ID_NAMES = ("idx", "id", "index", "guid")


def _is_text(train, column: str) -> bool:
    feature = train.features.get(column)
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _check_text_column(train, column: str, flag: str) -> None:
    """A text column must hold strings: a JSONL cell with a list (["a", "b"]) is not a sentence pair."""
    feature = train.features.get(column)
    if feature is not None and not _is_text(train, column) and getattr(feature, "dtype", None) != "null":
        kind = "lists" if type(feature).__name__ in ("List", "Sequence", "LargeList") else (
            f"{getattr(feature, 'dtype', type(feature).__name__)} values")
        fix = ("put a sentence pair in two columns and give --text_column A --text_pair_column B" if kind == "lists"
               else "give the text column with --text_column")
        raise CommandError(f"text column {column!r} ({flag}) holds {kind}, not text; {fix}")


def infer_columns(train, data: DataArguments, label: str | None) -> tuple[str | None, str | None]:
    """(text, pair) as transformers' run_glue.py finds them: the given flags; else a known pair (sentence1 /
    sentence2, question / sentence, ...); else the text columns other than the label: one -> single texts, two ->
    a pair in column order; more than two is ambiguous and refused, naming the flags that settle it."""
    cols = list(train.column_names)
    text = _pick(cols, data.text_column, "--text_column", ())
    pair = _pick(cols, data.text_pair_column, "--text_pair_column", ())
    for column, flag in ((text, "--text_column"), (pair, "--text_pair_column")):
        if column is not None:
            _check_text_column(train, column, flag)
    if text is not None:
        return text, pair
    if pair is None:
        known = next((p for p in PAIR_NAMES if p[0] in cols and p[1] in cols and p[0] != label and p[1] != label),
                     None)
        if known is not None:
            for column in known:
                _check_text_column(train, column, "a sentence-pair column")
            return known
    taken = {label, pair, data.prompt_column, data.messages_column}
    named = [c for c in cols if c not in taken and c.lower() in TEXT_NAMES]
    for column in named:
        _check_text_column(train, column, "the text column")
    texts = [c for c in cols if c not in taken and c.lower() not in ID_NAMES and _is_text(train, c)]
    if pair is not None:
        if len(texts) != 1 and not named:
            raise CommandError(f"--text_pair_column {pair} given but not which column is the first text "
                               f"(candidates: {', '.join(texts) or 'none'}): give --text_column")
        return (named or texts)[0], pair
    if len(texts) <= 2:
        return (texts[0] if texts else None), (texts[1] if len(texts) == 2 else None)
    raise CommandError(f"{len(texts)} text columns ({', '.join(texts)}) and no known pair: say which with "
                       f"--text_column {texts[0]} (and --text_pair_column {texts[1]} for sentence pairs)")


def infer_task(model: ModelArguments, data: DataArguments, train) -> dict:
    """Task and columns from the data (and --task): a dict with task, text, pair, label, label_list, glue."""
    cols = list(train.column_names)
    label = _pick(cols, data.label_column, "--label_column", LABEL_NAMES)
    chat = data.messages_column in cols
    prompt = data.prompt_column in cols and data.completion_column in cols
    task = model.task
    if task not in TASKS:
        raise CommandError(f"--task {task!r} is unknown; use one of {', '.join(TASKS)}")
    if task == "auto":
        if chat or prompt:
            task = "causal-lm"
        elif label is not None:
            task = "regression" if _is_float(train[label]) else "classification"
        else:
            raise CommandError(f"cannot tell the task from the columns ({', '.join(cols)}): give --label_column for "
                               "classification / regression, or prompt + completion or messages columns for SFT")
    if task == "causal-lm":
        text = _pick(cols, data.text_column, "--text_column", TEXT_NAMES)
        out = {"task": task, "text": text, "pair": None, "label": label, "label_list": None, "glue": None}
        if not (chat or prompt or text):
            raise CommandError(f"causal-lm needs prompt + completion, messages or a text column; columns: "
                               f"{', '.join(cols)}")
        out["sft_format"] = "messages" if chat else "prompt-completion" if prompt else "text"
        return out
    from .metrics import glue_task

    if label is None:
        raise CommandError(f"{task} needs a label column; none of {', '.join(LABEL_NAMES)} is in the data "
                           f"({', '.join(cols)}): give --label_column")
    text, pair = infer_columns(train, data, label)
    if text is None:
        raise CommandError(f"{task} needs a text column; no column other than the label holds text "
                           f"({', '.join(cols)}): give --text_column")
    glue = glue_task(data.dataset_name, data.dataset_config_name, data.train_file)
    out = {"task": task, "text": text, "pair": pair, "label": label, "label_list": None, "glue": glue}
    check_values(train, out, "train")
    values = train[label]
    if task != "regression":
        out["label_list"] = sorted(set(values), key=lambda v: (isinstance(v, str), v))
        feature = train.features.get(label)  # a hub ClassLabel column holds ids; its names are the labels
        names = list(getattr(feature, "names", None) or []) if type(feature).__name__ == "ClassLabel" else []
        out["label_names"] = [names[v] if isinstance(v, int) and 0 <= v < len(names) else str(v)
                              for v in out["label_list"]]
        if len(out["label_list"]) < 2:
            raise CommandError(f"label column {label!r} has a single value; classification needs two or more")
    return out


def describe_task(info: dict, data: DataArguments, prog: str = "fish-tune train") -> str:
    """The start-up line: what the data was read as (so a dropped column or a wrong task shows at once)."""
    from .metrics import TaskMetrics

    task = info["task"]
    if task == "causal-lm":
        fmt = info["sft_format"]
        cols = {"messages": data.messages_column, "prompt-completion": f"{data.prompt_column} + "
                f"{data.completion_column}", "text": info["text"]}[fmt]
        return f"{prog}: task causal-lm | {fmt}: {cols} | metric: eval_loss"
    texts = f"{info['text']} + {info['pair']} (pair)" if info["pair"] else info["text"]
    if task == "regression":
        labels = "numbers"
        metric = TaskMetrics(task, [0.0], 1, info.get("glue")).describe()
    else:
        names = info["label_names"]
        labels = ", ".join(repr(n) for n in names[:10]) + (f", ... ({len(names)} classes)" if len(names) > 10 else "")
        metric = TaskMetrics(task, [0], len(names), info.get("glue")).describe()
    return (f"{prog}: task {task} | text: {texts} | label: {info['label']} ({labels}) | "
            f"metric: {metric}")


def check_values(ds, info: dict, split: str) -> None:
    """Refuse rows the tokenizer or the loss cannot take (an empty text cell, an empty or non-finite label) before
    any model loads: they would end in a traceback, or in NaN gradients and a NaN adapter saved with exit code 0."""
    for column in (info["text"], info["pair"]):
        if column and column in ds.column_names:
            empty = sum(v is None for v in ds[column])
            if empty:
                raise CommandError(f"text column {column!r} has {empty} empty value(s) in the {split} data; fill "
                                   "or drop those rows")
    label = info["label"]
    if not label or label not in ds.column_names:
        return
    values = ds[label]
    if any(v is None for v in values):
        raise CommandError(f"label column {label!r} has empty values in the {split} data; fill or drop those rows")
    if info["task"] == "regression":
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            raise CommandError(f"regression needs numeric labels in {label!r}; use --task classification") from None
    else:
        numbers = [v for v in values if isinstance(v, float)]
    bad = sum(not math.isfinite(v) for v in numbers)
    if bad:
        raise CommandError(f"label column {label!r} has {bad} NaN / inf value(s) in the {split} data; fill or drop "
                           "those rows")
    huge = sum(abs(v) > _FLOAT32_MAX for v in numbers)  # finite in float64, inf once the model reads them (float32)
    if huge:
        raise CommandError(f"label column {label!r} has {huge} value(s) beyond float32's range (|x| > 3.4e38) in the "
                           f"{split} data; rescale the labels")


_FLOAT32_MAX = 3.4028234663852886e38


def _is_float(values) -> bool:
    return any(isinstance(v, float) and not float(v).is_integer() for v in values)
