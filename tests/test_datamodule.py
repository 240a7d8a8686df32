"""The shared data pipeline (caching, padding, sampling) and the text classification data module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from datamodules.base import Collator, LengthGroupedSampler, ShuffleSampler, TrainShardSampler
from datamodules.readers import DataError
from datamodules.text_classification import TextClassificationDataModule
from lit_modules.schema import ModelFacts
from tests.conftest import SENTIMENT


@pytest.fixture(scope="module")
def tokenizer(tiny_bert: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def make_dm(tokenizer: Any, tmp_path: Path, **kwargs: Any) -> TextClassificationDataModule:
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    dm = TextClassificationDataModule(**kwargs)
    dm.connect(tokenizer)
    return dm


def test_sentiment_pipeline_end_to_end(tokenizer: Any, tmp_path: Path) -> None:
    dm = make_dm(tokenizer, tmp_path, train_file=str(SENTIMENT / "train.jsonl"),
                 validation_file=str(SENTIMENT / "validation.jsonl"), batch_size=8, max_seq_length=16)
    dm.setup("fit")
    assert dm.labels == ["negative", "positive"] and dm.problem_type == "single_label_classification"
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", "idx"}
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 16
    # dynamic padding: the batch is as wide as its longest row, and the mask marks real tokens
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"] == tokenizer.pad_token_id, batch["attention_mask"] == 0)
    texts = [json.loads(line)["text"] for line in (SENTIMENT / "train.jsonl").read_text().splitlines()]
    labels = [json.loads(line)["label"] for line in (SENTIMENT / "train.jsonl").read_text().splitlines()]
    for row, idx in enumerate(batch["idx"].tolist()):  # each row is the example its index names
        expected = tokenizer(texts[idx], truncation=True, max_length=16)["input_ids"]
        assert batch["input_ids"][row, : len(expected)].tolist() == expected
        assert dm.labels[batch["labels"][row]] == labels[idx]


def test_tokenisation_is_cached_across_launches(tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = dict(train_file=str(SENTIMENT / "train.jsonl"), max_seq_length=16)
    first = make_dm(tokenizer, tmp_path, **args)
    first.prepare_data()
    first.setup("fit")
    files = list((tmp_path / "cache").rglob("*.arrow"))
    assert len(files) == 1

    def fail(self: Any, split: str) -> None:
        raise AssertionError("read and tokenised again although a cache exists")

    monkeypatch.setattr(TextClassificationDataModule, "_read_split", fail)
    second = make_dm(tokenizer, tmp_path, **args)
    second.setup("fit")  # a second launch loads the cache
    assert second.datasets["train"]["input_ids"] == first.datasets["train"]["input_ids"]
    monkeypatch.undo()
    # anything that changes the features changes the key
    make_dm(tokenizer, tmp_path, **{**args, "max_seq_length": 24}).setup("fit")
    make_dm(tokenizer, tmp_path, **{**args, "max_train_samples": 10}).setup("fit")
    assert len(list((tmp_path / "cache").rglob("*.arrow"))) == 3


def test_length_grouped_sampler() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=1000)
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(1000))  # a permutation: nothing dropped or repeated
    assert lengths[order[0]] == lengths.max()  # the longest batch first
    batches = [lengths[order[i : i + 16]] for i in range(0, 1000, 16)]
    grouped_waste = sum(b.max() * len(b) - b.sum() for b in batches)
    random_batches = [lengths[i : i + 16] for i in range(0, 1000, 16)]
    random_waste = sum(b.max() * len(b) - b.sum() for b in random_batches)
    assert grouped_waste < random_waste / 5  # far less padding than random batches
    assert list(sampler) == order  # same seed and epoch: same order
    sampler.set_epoch(1)
    assert list(sampler) != order  # a new epoch reshuffles
    assert list(LengthGroupedSampler(lengths, 16, seed=4)) != order


def _padding_share(lengths: np.ndarray, order: list[int], batch: int) -> float:
    batches = [lengths[order[i : i + batch]] for i in range(0, len(order), batch)]
    return sum(b.max() * len(b) - b.sum() for b in batches) / sum(b.max() * len(b) for b in batches)


def test_training_shards_keep_length_grouping_on_every_process() -> None:
    """Under DDP each process's batches are still grouped by length (Lightning's wrapper would shuffle
    them again), the processes share one order and together see every example each epoch."""
    lengths = np.random.default_rng(0).integers(1, 200, size=1001)
    world, batch = 2, 16
    shards = [TrainShardSampler(LengthGroupedSampler(lengths, batch * world, seed=3), world, rank) for rank in range(world)]
    orders = [list(s) for s in shards]
    assert [len(o) for o in orders] == [len(s) for s in shards] == [501, 501]  # padded to a multiple of world
    assert sorted(set(orders[0]) | set(orders[1])) == list(range(1001)) and not set(orders[0]) & set(orders[1][:-1])
    random_share = _padding_share(lengths, list(range(1001)), batch)
    for order in orders:
        assert _padding_share(lengths, order, batch) < random_share / 5
    for s in shards:
        s.set_epoch(1)
    assert [list(s) for s in shards] != orders  # the epoch reaches the grouped order
    fresh = TrainShardSampler(LengthGroupedSampler(lengths, batch * world, seed=3), world, 1)
    fresh.set_epoch(1)
    expected = list(fresh)
    shards[1].skip = 3 * batch  # a resume after 3 batches leaves out exactly those, once
    assert list(shards[1]) == expected[3 * batch :]
    assert list(shards[1]) == expected
    tiny = TrainShardSampler(ShuffleSampler(1, seed=0), 4, 3)  # fewer examples than processes: repeated
    assert list(tiny) == [0]


def test_distributed_training_loader_uses_the_shard_sampler(tokenizer: Any, tmp_path: Path) -> None:
    from types import SimpleNamespace

    dm = make_dm(tokenizer, tmp_path, train_file=str(SENTIMENT / "train.jsonl"))
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)  # the two fields the loader reads
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, TrainShardSampler) and isinstance(sampler.sampler, LengthGroupedSampler)
    assert sampler.rank == 1 and sampler.sampler.batch_size == 2 * dm.batch_size


def test_group_by_length_can_be_switched_off(tokenizer: Any, tmp_path: Path) -> None:
    dm = make_dm(tokenizer, tmp_path, train_file=str(SENTIMENT / "train.jsonl"), group_by_length=False)
    dm.setup("fit")
    assert isinstance(dm.train_dataloader().sampler, torch.utils.data.RandomSampler)
    dm.group_by_length = True
    assert isinstance(dm.train_dataloader().sampler, LengthGroupedSampler)


def test_eval_batches_sorted_by_length(tokenizer: Any, tmp_path: Path) -> None:
    dm = make_dm(tokenizer, tmp_path, train_file=str(SENTIMENT / "train.jsonl"),
                 validation_file=str(SENTIMENT / "validation.jsonl"), eval_batch_size=10)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    widths = [b["attention_mask"].sum(1) for b in batches]
    flat = torch.cat(widths).tolist()
    assert flat == sorted(flat, reverse=True)
    n = len((SENTIMENT / "validation.jsonl").read_text().splitlines())
    assert sorted(torch.cat([b["idx"] for b in batches]).tolist()) == list(range(n))


def test_collator_left_padding_and_multiple() -> None:
    collate = Collator({"input_ids": 0}, padding_side="left", pad_to_multiple_of=4)
    out = collate({"input_ids": [[5, 6, 7], [8]], "labels": np.array([1, 0])})
    assert out["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert out["labels"].tolist() == [1, 0]


def test_text_pairs(tokenizer: Any, tmp_path: Path) -> None:
    rows = [{"sentence1": "good film", "sentence2": "bad film", "label": "no"},
            {"sentence1": "fine food", "sentence2": "fine food", "label": "yes"}]
    dm = make_dm(tokenizer, tmp_path, train_file=jsonl(tmp_path / "p.jsonl", rows))
    dm.setup("fit")
    ds = dm.datasets["train"]
    assert ds["text_pair"] == ["bad film", "fine food"]
    assert ds[0]["input_ids"] == tokenizer("good film", "bad film")["input_ids"]
    assert 1 in ds[0]["token_type_ids"]  # the second segment is marked


def test_multi_label_and_regression(tokenizer: Any, tmp_path: Path) -> None:
    multi = [{"text": "good cheap food", "label": ["food", "price"]}, {"text": "slow service", "label": ["service"]}]
    dm = make_dm(tokenizer, tmp_path, train_file=jsonl(tmp_path / "m.jsonl", multi))
    dm.setup("fit")
    assert dm.problem_type == "multi_label_classification" and dm.labels == ["food", "price", "service"]
    assert dm.label_ids["train"].tolist() == [[1, 1, 0], [0, 0, 1]]
    csv = tmp_path / "m.csv"
    csv.write_text("text,label\ngood cheap food,food|price\nslow service,service\n")
    dm = make_dm(tokenizer, tmp_path, train_file=str(csv), label_separator="|")
    dm.setup("fit")
    assert dm.label_ids["train"].tolist() == [[1, 1, 0], [0, 0, 1]]

    reg = [{"text": "good", "label": 4.5}, {"text": "bad", "label": "0.25"}, {"text": "ok", "label": 3}]
    dm = make_dm(tokenizer, tmp_path, train_file=jsonl(tmp_path / "r.jsonl", reg))
    dm.setup("fit")
    assert dm.problem_type == "regression" and dm.labels is None
    assert dm.label_ids["train"].tolist() == [4.5, 0.25, 3.0]
    # integer labels are classes, not numbers
    ints = [{"text": "a", "label": 1}, {"text": "b", "label": 10}, {"text": "c", "label": 2}]
    dm = make_dm(tokenizer, tmp_path, train_file=jsonl(tmp_path / "i.jsonl", ints))
    dm.setup("fit")
    assert dm.problem_type == "single_label_classification" and dm.labels == ["1", "2", "10"]


def test_schema_comes_from_the_model_when_it_has_one(tokenizer: Any, tmp_path: Path) -> None:
    dm = make_dm(tokenizer, tmp_path, validation_file=str(SENTIMENT / "validation.jsonl"))
    # the model already knows its label schema (as after loading a checkpoint): its facts reach the data
    dm.connect(tokenizer, ModelFacts(labels=("positive", "negative"), problem_type="single_label_classification"))
    dm.setup("validate")
    assert dm.labels == ["positive", "negative"]  # model's order, not re-derived
    labels = [json.loads(x)["label"] for x in (SENTIMENT / "validation.jsonl").read_text().splitlines()]
    assert [dm.labels[i] for i in dm.label_ids["validation"]] == labels


@pytest.mark.parametrize(
    "rows, kwargs, expected",
    [
        ([{"review_text": "x", "label": "a"}], {}, r"t\.jsonl: no text column found \(looked for text, sentence, .*\); columns found: review_text, label"),
        ([{"body": "x", "label": "a"}], {"text_column": "content"}, r"no text column 'content'; columns found: body, label"),
        ([{"text": "x", "stars": "a"}], {}, r"t\.jsonl: no label column 'label'; columns found: text, stars"),
        ([{"text": "x", "label": "a"}, {"text": "", "label": "b"}], {}, r"t\.jsonl:2: 'text' must be a non-empty string"),
        ([{"text": "x", "label": "a"}, {"text": "y"}], {}, r"t\.jsonl:2: missing label in column 'label'"),
        ([{"text": "x", "label": ["a"]}, {"text": "y", "label": "b"}], {}, r"t\.jsonl:2: expected a list of labels"),
    ],
)
def test_bad_training_records(tokenizer: Any, tmp_path: Path, rows: list[dict[str, Any]], kwargs: dict[str, Any],
                              expected: str) -> None:
    dm = make_dm(tokenizer, tmp_path, train_file=jsonl(tmp_path / "t.jsonl", rows), **kwargs)
    with pytest.raises(DataError, match=expected):
        dm.setup("fit")


def test_validation_label_unseen_in_training(tokenizer: Any, tmp_path: Path) -> None:
    train = jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    val = jsonl(tmp_path / "val.jsonl", [{"text": "fine", "label": "pos"}, {"text": "meh", "label": "neutral"}])
    dm = make_dm(tokenizer, tmp_path, train_file=train, validation_file=val)
    with pytest.raises(DataError, match=r"val\.jsonl:2: label 'neutral' in validation data .* \(neg, pos\)"):
        dm.setup("fit")


def test_non_numeric_regression_label(tokenizer: Any, tmp_path: Path) -> None:
    train = jsonl(tmp_path / "train.jsonl", [{"text": "good", "label": 1.5}, {"text": "bad", "label": "high"}])
    dm = make_dm(tokenizer, tmp_path, train_file=train)
    dm.connect(tokenizer, ModelFacts(problem_type="regression"))
    with pytest.raises(DataError, match=r"train\.jsonl:2: regression label must be a number, got 'high'"):
        dm.setup("fit")


def test_option_errors_are_raised_while_reading_the_config(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.validation_file: data file '.*missing\.csv' does not exist"):
        TextClassificationDataModule(train_file=str(SENTIMENT / "train.jsonl"), validation_file=str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match=r"data\.max_train_samples: expected a positive integer"):
        TextClassificationDataModule(max_train_samples=0)


def test_max_samples(tokenizer: Any, tmp_path: Path) -> None:
    dm = make_dm(tokenizer, tmp_path, train_file=str(SENTIMENT / "train.jsonl"),
                 validation_file=str(SENTIMENT / "validation.jsonl"), max_train_samples=50, max_eval_samples=7)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 50 and len(dm.datasets["validation"]) == 7


def test_dataset_name_path_with_class_labels(tokenizer: Any, tmp_path: Path) -> None:
    """``dataset_name`` goes through ``datasets.load_dataset`` (a local dataset folder here, a hub id for users);
    class-id labels come out as their names."""
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    folder = tmp_path / "hub_like"
    folder.mkdir()
    for split, rows in {"train": (["good", "bad", "fine"], [1, 0, 1]), "validation": (["great", "awful"], [1, 0])}.items():
        datasets.Dataset.from_dict({"sentence": rows[0], "label": rows[1]}, features=features).to_parquet(folder / f"{split}.parquet")
    dm = make_dm(tokenizer, tmp_path, dataset_name=str(folder))
    assert dm.has_split("train") and dm.has_split("validation") and not dm.has_split("test")
    dm.setup("fit")
    assert dm.labels == ["neg", "pos"]
    assert dm.datasets["train"]["label"] == ["pos", "neg", "pos"]
    assert dm.label_ids["validation"].tolist() == [1, 0]


def test_tiny_tokenizer_knows_the_corpus(tokenizer: Any) -> None:
    """Guard for the test fixtures themselves: the tiny tokenizer must not map text to [UNK]."""
    ids = tokenizer("The planetarium show was mesmerizing.")["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) > 4


USER_MODULE = '''
from datamodules.text_classification import TextClassificationDataModule


def clean(text):
    return text{edit}


class UserDataModule(TextClassificationDataModule):
    def canonical_columns(self, records, lines, split, source):
        columns = super().canonical_columns(records, lines, split, source)
        columns["text"] = [clean(t) for t in columns["text"]]
        return columns
'''


def _load_user_module(path: Path, edit: str) -> Any:
    import importlib.util
    import sys

    path.write_text(USER_MODULE.format(edit=edit), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("user_dm", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["user_dm"] = module  # as an import would: the cache key reads modules through sys.modules
    spec.loader.exec_module(module)
    return module


def test_editing_a_helper_that_only_canonical_columns_calls_retokenises(tokenizer: Any, tmp_path: Path) -> None:
    """The cache key covers the source of every project module the features depend on: a helper edited
    outside canonical_columns / encode still changes the key, so no stale features are served."""
    import sys

    source = tmp_path / "user_dm.py"
    args = dict(train_file=str(SENTIMENT / "train.jsonl"), max_train_samples=4, max_seq_length=32)
    try:
        module = _load_user_module(source, "")
        first = module.UserDataModule(cache_dir=str(tmp_path / "cache"), **args)
        first.connect(tokenizer)
        first.setup("fit")
        module = _load_user_module(source, ' + " great"')  # the user edits the helper, nothing else
        second = module.UserDataModule(cache_dir=str(tmp_path / "cache"), **args)
        second.connect(tokenizer)
        second.setup("fit")
    finally:
        sys.modules.pop("user_dm", None)
    great = tokenizer.convert_tokens_to_ids("great")
    before, after = first.datasets["train"]["input_ids"], second.datasets["train"]["input_ids"]
    assert before != after
    assert all(ids[-2] == great for ids in after)  # tokenised again: the edited helper's output, before [SEP]
    assert len(list((tmp_path / "cache").rglob("*.arrow"))) == 2


@pytest.mark.parametrize("labels, message", [
    (["0", "1", "negative", "positive", "1"], r"t\.jsonl: labels mix two spellings: 3 class ids / numbers like '0' "
                                             r"\(first at line 1\) and 2 names like 'negative' \(first at line 3\)"),
    ([1, "pos", 0], r"t\.jsonl: labels mix two spellings: 2 class ids / numbers like '1' \(first at line 1\) and 1 "
                    r"names like 'pos' \(first at line 2\)"),
    ([["food", "1"], ["price"]], r"t\.jsonl: labels mix two spellings: 1 class ids / numbers like '1' \(first at "
                                 r"line 1\) and 2 names like 'food'"),
])
def test_mixed_label_spellings_stop_instead_of_making_extra_classes(tokenizer: Any, tmp_path: Path, labels: list[Any],
                                                                    message: str) -> None:
    rows = [{"text": f"text {i}", "label": label} for i, label in enumerate(labels)]
    dm = make_dm(tokenizer, tmp_path, train_file=jsonl(tmp_path / "t.jsonl", rows))
    with pytest.raises(DataError, match=message):
        dm.setup("fit")


def test_one_spelling_of_ids_or_numbers_still_works(tokenizer: Any, tmp_path: Path) -> None:
    rows = [{"text": f"text {i}", "label": label} for i, label in enumerate([0, "1", 1, "0"])]
    dm = make_dm(tokenizer, tmp_path, train_file=jsonl(tmp_path / "ids.jsonl", rows))
    dm.setup("fit")
    assert dm.labels == ["0", "1"]
    rows = [{"text": f"text {i}", "label": label} for i, label in enumerate([1, 2.5, "3.75"])]
    dm = make_dm(tokenizer, tmp_path, train_file=jsonl(tmp_path / "reg.jsonl", rows))
    dm.setup("fit")
    assert dm.problem_type == "regression"
