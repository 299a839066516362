"""Model + PEFT + tokenised data -> a ready ``Trainer`` (classification, regression) or TRL ``SFTTrainer``.

`fish-tune train` trains it; `fish-tune mask` only asks it for its train dataloader, so both score Fisher on the
same batches (same columns, collator, seed) and give the same mask for the same flags.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..methods import prefix_tuning_compat
from .columns import check_values
from .common import CommandError, DataArguments, ModelArguments, PeftArguments, peft_config
from .metrics import TaskMetrics


def check_task_requirements(task: str) -> None:
    """Packages a task needs, checked before any model loads."""
    if task == "causal-lm":
        try:
            import trl  # noqa: F401
        except ImportError:
            raise CommandError("causal-LM SFT needs TRL: pip install 'fish-tuning[cli]' (or trl)") from None


def fit_max_length(max_length: int, path: str, tokenizer) -> int:
    """``--max_length`` capped at the positions the model has (the tokenizer's model_max_length where it is set,
    else the config's max_position_embeddings): a longer text would index past the position embeddings."""
    from transformers import AutoConfig

    limit = getattr(tokenizer, "model_max_length", None)
    if not limit or limit > 1_000_000:  # unset: transformers' VERY_LARGE_INTEGER
        config = AutoConfig.from_pretrained(path)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and max_length > limit:
        print(f"fish-tune: --max_length {max_length} is above the model's {limit} positions: texts are cut at "
              f"{limit} tokens", flush=True)
        return int(limit)
    return max_length


def limit(ds, n: int | None):
    return ds if ds is None or n is None else ds.select(range(min(n, len(ds))))


def build_trainer(model_args: ModelArguments, data_args: DataArguments, peft_args: PeftArguments, info: dict,
                  path: str, data: dict, targs, callbacks: list, quant=None) -> Any:
    """The trainer for ``info["task"]``, with the PEFT model built from ``peft_args`` and ``callbacks`` added."""
    from transformers import AutoTokenizer, set_seed

    set_seed(targs.seed)  # the head's random init too: `fish-tune mask` and `train` then see the same model
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model_args = dataclasses.replace(model_args, max_length=fit_max_length(model_args.max_length, path, tokenizer))
    train = limit(data["train"], data_args.max_train_samples)
    val = limit(data["validation"], data_args.max_eval_samples)
    if info["task"] == "causal-lm":
        return _sft_trainer(model_args, data_args, peft_args, info, path, tokenizer, train, val, targs, callbacks,
                            quant)
    trainer = _cls_trainer(model_args, peft_args, info, path, tokenizer, train, val, targs, callbacks)
    trainer.fish_test_dataset = _test_set(data.get("test"), info, tokenizer, model_args.max_length)
    return trainer


def _cls_trainer(model_args, peft_args, info, path, tokenizer, train, val, targs, callbacks):
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer

    regression = info["task"] == "regression"
    labels = info["label_list"]
    text, pair, label = info["text"], info["pair"], info["label"]
    encode = _encoder(info, tokenizer, model_args.max_length, "validation", with_labels=True)

    def prepare(ds, split: str):
        if ds is None:
            return None
        missing = [c for c in (text, pair, label) if c and c not in ds.column_names]
        if missing:
            raise CommandError(f"column {missing[0]!r} is in the train data but not in the validation data")
        check_values(ds, info, split)
        return ds.map(encode, batched=True, remove_columns=ds.column_names)

    train_ds, val_ds = prepare(train, "train"), prepare(val, "validation")
    kwargs: dict[str, Any] = {"num_labels": 1 if regression else len(labels)}
    if regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["problem_type"] = "single_label_classification"
        kwargs["id2label"] = dict(enumerate(info["label_names"]))
        kwargs["label2id"] = {n: i for i, n in enumerate(info["label_names"])}
    # a checkpoint's head for another label set is replaced by a new one (transformers reports it), as a new task needs
    model = AutoModelForSequenceClassification.from_pretrained(path, ignore_mismatched_sizes=True, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(model, peft_config(peft_args, "SEQ_CLS"))
    if peft_args.peft == "prefix":
        prefix_tuning_compat(model)
    metrics = TaskMetrics(info["task"], train_ds["labels"], len(labels or [None]), info.get("glue"))
    return Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=val_ds,
                   data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                   compute_metrics=metrics, callbacks=callbacks)


def _test_set(ds, info: dict, tokenizer, max_length: int):
    """The --test_file rows tokenised; labels kept only where the file has them (GLUE test files: none, or -1)."""
    if ds is None:
        return None
    text, pair, label = info["text"], info["pair"], info["label"]
    missing = [c for c in (text, pair) if c and c not in ds.column_names]
    if missing:
        raise CommandError(f"column {missing[0]!r} is in the train data but not in --test_file")
    labelled = label in ds.column_names and not all(v is None or v == -1 for v in ds[label])
    check_values(ds, {**info, "label": label if labelled else None}, "test")
    encode = _encoder(info, tokenizer, max_length, "test", with_labels=labelled)
    return ds.map(encode, batched=True, remove_columns=ds.column_names)


def _encoder(info: dict, tokenizer, max_length: int, split: str, with_labels: bool):
    """Batch -> token ids (+ label ids, or numbers for regression); a label the train data lacks is refused."""
    text, pair, label = info["text"], info["pair"], info["label"]
    index = {v: i for i, v in enumerate(info["label_list"] or [])}

    def encode(batch: dict) -> dict:
        enc = tokenizer(batch[text], batch[pair] if pair else None, truncation=True, max_length=max_length)
        if not with_labels:
            return enc
        if info["task"] == "regression":
            enc["labels"] = [float(v) for v in batch[label]]
        else:
            unseen = [v for v in batch[label] if v not in index]
            if unseen:
                raise CommandError(f"{split} label {unseen[0]!r} does not occur in the train data (train labels: "
                                   f"{info['label_list']})")
            enc["labels"] = [index[v] for v in batch[label]]
        return enc

    return encode


def _sft_trainer(model_args, data_args, peft_args, info, path, tokenizer, train, val, targs, callbacks, quant=None):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from .quant_args import build_peft_model

    fmt = info["sft_format"]
    columns = {"messages": {data_args.messages_column: "messages"},
               "prompt-completion": {data_args.prompt_column: "prompt", data_args.completion_column: "completion"},
               "text": {info["text"]: "text"}}[fmt]

    def prepare(ds):
        if ds is None:
            return None
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise CommandError(f"column {missing[0]!r} is in the train data but not in the validation data")
        ds = ds.select_columns(list(columns))
        return ds.rename_columns({k: v for k, v in columns.items() if k != v})

    if fmt == "messages" and getattr(tokenizer, "chat_template", None) is None:
        raise CommandError("the messages column needs a tokenizer with a chat template; this model's tokenizer has "
                           "none: use prompt/completion columns or an instruct model")
    if tokenizer.eos_token is None:
        raise CommandError("causal-LM SFT needs a tokenizer with an eos token; this model's tokenizer has none")
    init = {f.name: getattr(targs, f.name) for f in dataclasses.fields(targs) if f.init}
    sft_args = SFTConfig(**init, max_length=model_args.max_length, dataset_text_field="text")
    model = build_peft_model(quant, AutoModelForCausalLM, path, peft_config(peft_args, "CAUSAL_LM"),  # 4-bit: QPiSSA
                             targs.output_dir, peft_args.init_lora_weights)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return SFTTrainer(model=model, args=sft_args, train_dataset=prepare(train), eval_dataset=prepare(val),
                      processing_class=tokenizer, callbacks=callbacks)


def trainable_line(mask, model) -> str:
    """peft's ``print_trainable_parameters`` line with the count that really trains under the mask.

    peft counts every entry of every tensor with requires_grad; under FISH only k candidate entries plus the
    always-trained tensors (e.g. a classifier head) change.
    """
    total = sum(p.numel() for p in model.parameters())
    dense = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable = mask.trainable_count(model)
    return (f"trainable params: {trainable:,} || all params: {total:,} || trainable%: "
            f"{100 * trainable / max(total, 1):.4f} (FISH {mask.strategy}: {mask.num_selected:,} of "
            f"{mask.num_candidates:,} PEFT entries + {trainable - mask.num_selected:,} always trained; "
            f"peft would report {dense:,})")
