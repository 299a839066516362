"""The task metrics of `fish-tune train` (numpy only) against scikit-learn / scipy, the GLUE headline per task,
and the files a run leaves: eval_results.json with the trivial baseline, train_results.json without the Fisher
pass, trainer_state.json at the root."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fish_tuning.cli import main
from fish_tuning.commands import metrics as m
from fish_tuning.commands.outputs import train_metrics
from test_cli_train import FAST, tiny, write_sentiment_csv  # noqa: F401  (tiny: the shared fixture)


@pytest.mark.parametrize("seed", range(6))
def test_classification_metrics_match_sklearn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    k = 2 if seed < 3 else 4
    y, p = rng.integers(0, k, 50), rng.integers(0, k, 50)
    if seed == 1:
        p = np.where(rng.random(50) < 0.8, y, p)  # mostly right
    got = m.classification_metrics(p, y, k, "accuracy")
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(y, p))
    assert got["mcc"] == pytest.approx(sk.matthews_corrcoef(y, p))
    assert got["f1"] == pytest.approx(sk.f1_score(y, p, average="binary" if k == 2 else "macro"))


def test_regression_metrics_match_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 40).astype(float)  # many ties
    p = y + rng.normal(0, 1, 40).round(1)
    got = m.regression_metrics(p, y)
    assert got["pearson"] == pytest.approx(stats.pearsonr(p, y)[0])
    assert got["spearman"] == pytest.approx(stats.spearmanr(p, y)[0])
    assert got["score"] == pytest.approx((got["pearson"] + got["spearman"]) / 2)


def test_constant_predictions_score_zero_not_nan():
    y = np.array([0, 1, 1, 0, 1])
    const = np.ones(5, dtype=int)
    got = m.classification_metrics(const, y, 2, "mcc")
    assert got["mcc"] == 0.0 and got["score"] == 0.0 and got["accuracy"] == 0.6
    assert got["f1"] == pytest.approx(2 * 0.6 / 1.6)  # precision 0.6, recall 1
    reg = m.regression_metrics(np.full(5, 2.5), y.astype(float))
    assert reg["pearson"] == 0.0 and reg["spearman"] == 0.0


@pytest.mark.parametrize("name, config, file, task, expected", [
    ("glue", "cola", None, "classification", "mcc"),
    ("nyu-mll/glue", "mrpc", None, "classification", "f1_accuracy"),
    (None, None, "/data/glue/STS-B/train.tsv", "regression", "pearson_spearman"),
    (None, None, "/data/glue/RTE/train.tsv", "classification", "accuracy"),
    (None, None, "/data/mine/train.csv", "classification", "accuracy"),
    (None, None, "/data/mine/train.csv", "regression", "pearson_spearman"),
    (None, None, "/data/glue/STS-B/train.tsv", "classification", "accuracy"),  # --task overrides: no GLUE metric
    (None, None, "/data/mine/train.csv", "causal-lm", None),
])
def test_headline_metric_per_task(name, config, file, task, expected):
    glue = m.glue_task(name, config, file)
    assert m.headline(task, glue) == expected


def test_mrpc_score_is_the_mean_of_f1_and_accuracy():
    y, p = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    got = m.TaskMetrics("classification", [1, 1, 0], 2, "mrpc").metrics(p, y)
    assert got["score"] == pytest.approx((got["f1"] + got["accuracy"]) / 2)


def test_train_runtime_leaves_the_fisher_pass_out():
    got = train_metrics({"train_runtime": 10.0, "train_samples_per_second": 8.0, "train_loss": 0.5}, 4.0)
    assert got["train_runtime"] == 6.0 and got["fisher_runtime"] == 4.0
    assert got["train_samples_per_second"] == pytest.approx(80 / 6, abs=1e-3) and got["train_loss"] == 0.5


def test_a_run_with_validation_writes_results_with_the_trivial_baseline(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    val = write_sentiment_csv(tmp_path / "val.csv", n=20, seed=1)
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]),
                 "--validation_file", str(val), "--keep", "0.1", "--output_dir", str(out), *FAST,
                 "--logging_steps", "1"]) == 0
    printed = capsys.readouterr().out
    ev = json.loads((out / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_accuracy", "eval_f1", "eval_mcc", "eval_score", "eval_trivial_accuracy",
                "eval_trivial_f1", "eval_trivial_mcc", "eval_trivial_score"):
        assert isinstance(ev[key], float), key
    assert ev["eval_score"] == ev["eval_accuracy"] and ev["eval_trivial_mcc"] == 0.0
    labels = [line.split(",")[1].strip() for line in val.read_text().splitlines()[1:]]
    train_labels = [line.split(",")[1].strip() for line in tiny["csv"].read_text().splitlines()[1:]]
    majority = max(set(train_labels), key=train_labels.count)
    assert ev["eval_trivial_accuracy"] == pytest.approx(labels.count(majority) / len(labels))
    line = next(x for x in printed.splitlines() if x.startswith("eval: "))
    assert f"accuracy {ev['eval_score']:.4f} | trivial baseline (always '{majority}') " in line
    tr = json.loads((out / "train_results.json").read_text())
    assert tr["fisher_runtime"] > 0 and tr["train_runtime"] > 0 and "train_loss" in tr
    state = json.loads((out / "trainer_state.json").read_text())  # with --save_strategy no too
    assert [e["loss"] for e in state["log_history"] if "loss" in e] and state["global_step"] == 2
    assert sum("eval_loss" in e for e in state["log_history"]) == 1  # one final evaluation


def test_an_evaluation_at_the_last_step_is_not_run_again(tiny, tmp_path, monkeypatch):  # noqa: F811
    from transformers import Trainer

    calls = []
    original = Trainer.evaluate

    def counted(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(Trainer, "evaluate", counted)
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["reg"]),
                 "--validation_file", str(tiny["reg"]), "--budget", "40", "--output_dir", str(out), *FAST,
                 "--eval_strategy", "steps", "--eval_steps", "2"]) == 0
    assert len(calls) == 1
    ev = json.loads((out / "eval_results.json").read_text())
    assert {"eval_pearson", "eval_spearman", "eval_score", "eval_trivial_score"} <= set(ev)
    assert ev["eval_trivial_pearson"] == 0.0 and ev["eval_score"] == pytest.approx(
        (ev["eval_pearson"] + ev["eval_spearman"]) / 2)


def test_causal_lm_evaluation_has_loss_and_no_score(tiny, tmp_path):  # noqa: F811
    pytest.importorskip("trl")
    out = tmp_path / "sft"
    assert main(["train", "--model_name_or_path", str(tiny["llama"]), "--train_file", str(tiny["sft"]),
                 "--validation_file", str(tiny["sft"]), "--keep", "0.05", "--output_dir", str(out),
                 "--max_length", "32", *FAST]) == 0
    ev = json.loads((out / "eval_results.json").read_text())
    assert isinstance(ev["eval_loss"], float) and "eval_score" not in ev and "eval_trivial_score" not in ev
    assert not (out / "label_config.json").exists()


def test_regression_predictions_and_test_metrics(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "reg"
    test = write_sentiment_csv(tmp_path / "test.csv", n=12, seed=2, regression=True)
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["reg"]),
                 "--test_file", str(test), "--budget", "40", "--output_dir", str(out), *FAST]) == 0
    rows = (out / "predict_results.tsv").read_text().splitlines()[1:]
    assert len(rows) == 12 and all(float(r.split("\t")[1]) == float(r.split("\t")[1]) for r in rows)  # numbers
    metrics = json.loads((out / "test_results.json").read_text())  # the test file has labels
    assert {"test_loss", "test_pearson", "test_spearman", "test_score", "test_trivial_score"} <= set(metrics)
    assert json.loads((out / "label_config.json").read_text()) == {"num_labels": 1, "problem_type": "regression"}
