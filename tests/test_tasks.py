import pytest

from conftest import shared_data_dir
from fish_lab import tasks
from fish_lab.metrics import glue_score

ROWS = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "rte": (2490, 277), "stsb": (5749, 1500),
        "wnli": (635, 71)}  # the counts in ../shared/data/README.md


@pytest.mark.real
@pytest.mark.parametrize("task", sorted(ROWS))
def test_local_glue_row_counts_and_fields(task):
    if shared_data_dir() is None:
        pytest.skip("../shared/data not found")
    train, dev = tasks.load_glue(task, "train", shared_data_dir()), tasks.load_glue(task, "dev", shared_data_dir())
    assert (len(train), len(dev)) == ROWS[task]
    spec = tasks.task_spec(task)
    labels = {e["label"] for e in train}
    if spec.num_labels == 1:
        assert all(0.0 <= x <= 5.0 for x in labels)
    else:
        assert labels == {0, 1}
    assert all(e["text_a"] for e in dev) and ((spec.text_b is None) == (dev[0]["text_b"] is None))


@pytest.mark.real
def test_local_gsm8k():
    if shared_data_dir() is None:
        pytest.skip("../shared/data not found")
    train = tasks.load_gsm8k("train", shared_data_dir())
    assert len(train) == 7473 and len(tasks.load_gsm8k("test", shared_data_dir(), limit=5)) == 5
    assert all(e["final"].lstrip("-").replace(".", "").isdigit() for e in train[:200])


@pytest.fixture
def no_local_data(monkeypatch, tmp_path):
    monkeypatch.delenv(tasks.DATA_ENV, raising=False)

    def missing(data_dir=None):
        if data_dir is not None:
            raise FileNotFoundError(f"data dir {data_dir} does not exist")
        raise FileNotFoundError("no data dir found")

    monkeypatch.setattr(tasks, "resolve_data_dir", missing)
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "openai/gsm8k":
            return [{"question": "2+2?", "answer": "4 #### 4"}, {"question": "1,000+1?", "answer": "x #### 1,001"}]
        if config == "rte":
            return [{"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0}]
        if config == "stsb":
            return [{"sentence1": "a", "sentence2": "b", "label": 3.2, "idx": 0}]
        return [{"sentence": "s", "label": 1, "idx": 0}]

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_hub_fallback_when_no_local_folder(no_local_data):
    assert tasks.load_glue("rte", "dev") == [{"text_a": "a", "text_b": "b", "label": 1}]
    assert tasks.load_glue("stsb", "train")[0]["label"] == 3.2
    assert tasks.load_glue("cola", "train")[0] == {"text_a": "s", "text_b": None, "label": 1}
    assert [e["final"] for e in tasks.load_gsm8k("test")] == ["4", "1001"]
    assert ("nyu-mll/glue", "rte", "validation") in no_local_data and ("openai/gsm8k", "main", "test") in no_local_data


def test_explicit_missing_folder_never_downloads(no_local_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tasks.load_glue("sst2", "train", tmp_path / "nope")
    assert no_local_data == []


@pytest.mark.parametrize(
    "metric, preds, labels, expected",
    [("accuracy", [1, 0, 1, 1], [1, 0, 0, 1], 0.75), ("mcc", [1, 0, 1, 0], [1, 0, 1, 0], 1.0),
     ("f1_acc", [1, 1, 0, 0], [1, 0, 0, 0], (2 / 3 + 0.75) / 2), ("pearson_spearman", [1, 2, 3], [2, 4, 6], 1.0),
     ("pearson_spearman", [1, 1, 1], [2, 4, 6], 0.0)],
)
def test_glue_metrics(metric, preds, labels, expected):
    assert glue_score(metric, preds, labels) == pytest.approx(expected)


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="unknown GLUE task"):
        tasks.task_spec("mnli")
    with pytest.raises(ValueError, match="split"):
        tasks.load_glue("sst2", "test")
