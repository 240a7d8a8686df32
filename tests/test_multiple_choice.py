"""Multiple choice: the layouts it reads, the padded choices, and fit / validate / test / predict / export."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from datamodules.multiple_choice import ChoiceCollator, MultipleChoiceDataModule
from lit_modules.errors import DataError
from tests.conftest import ROOT, corpus_words, results, run_train, run_train_subprocess


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_questions(n: int, seed: int, words: list[str], variable: bool = False) -> list[dict[str, Any]]:
    """A learnable synthetic task: the correct ending says "yes", the others "no"; with ``variable`` the
    questions have 2 to 5 endings (SWAG layout: sent1, sent2, ending0.., label)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(2, 5) if variable else 4
        label = rng.randrange(k)
        endings = {f"ending{i}": f"{rng.choice(words)} {'yes' if i == label else 'no'}" for i in range(k)}
        rows.append({"sent1": " ".join(rng.choices(words, k=6)), "sent2": rng.choice(words), **endings, "label": label})
    return rows


@pytest.fixture(scope="module")
def words() -> list[str]:
    return [w for w in corpus_words() if w.isalpha() and w not in ("yes", "no")][:200]


@pytest.fixture(scope="module")
def tokenizer(tiny_bert: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def setup_dm(tokenizer: Any, tmp_path: Path, **kwargs: Any) -> MultipleChoiceDataModule:
    dm = MultipleChoiceDataModule(cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.connect(tokenizer)
    dm.setup("fit" if "train_file" in kwargs else "predict" if "predict_file" in kwargs else "validate")
    return dm


def test_layouts_swag_copa_arc_and_lists(tokenizer: Any, tmp_path: Path) -> None:
    swag = write_jsonl(tmp_path / "swag.jsonl", [
        {"sent1": "She opens the door", "sent2": "She", "ending0": "walks in", "ending1": "flies", "ending2": "sings",
         "ending3": "eats it", "label": 0}])
    copa = write_jsonl(tmp_path / "copa.jsonl", [{"premise": "The man broke his toe", "question": "cause",
                                                  "choice1": "He dropped a hammer", "choice2": "He got a hole", "label": 0}])
    arc = write_jsonl(tmp_path / "arc.jsonl", [{"id": "q1", "question": {"stem": "Which is a gas?", "choices": [
        {"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}, {"text": "rock", "label": "C"}]},
        "answerKey": "B"}])
    listed = write_jsonl(tmp_path / "list.jsonl", [{"context": "2 + 2", "choices": ["three", "four", "five"],
                                                    "answer": "four"}])
    for path, context, choices, label in [
        (swag, "She opens the door", ["walks in", "flies", "sings", "eats it"], 0),
        (copa, "The man broke his toe", ["He dropped a hammer", "He got a hole"], 0),
        (arc, "Which is a gas?", ["ice", "steam", "rock"], 1),
        (listed, "2 + 2", ["three", "four", "five"], 1),
    ]:
        dm = setup_dm(tokenizer, tmp_path, validation_file=str(path))
        row = dm.datasets["validation"][0]
        assert (row["context"], row["choices"], row["label"]) == (context, choices, label), path.name
        assert len(row["input_ids"]) == len(choices)  # one sequence per choice
    assert setup_dm(tokenizer, tmp_path, validation_file=str(swag)).datasets["validation"][0]["prefix"] == "She"
    # COPA's question names the relation: appended to the premise when asked for
    dm = setup_dm(tokenizer, tmp_path, validation_file=str(copa), question_column="question")
    assert dm.datasets["validation"][0]["context"] == "The man broke his toe cause"


@pytest.mark.parametrize("rows, message", [
    ([{"context": "c", "choices": ["a", "b"], "label": 2}], r"x\.jsonl:1: 'label' 2 is not a choice index from 0 to 1"),
    ([{"context": "c", "choices": ["a", "b"], "label": "Z"}], r"x\.jsonl:1: 'label' 'Z' is not a choice index \(0-1\)"),
    ([{"context": "2 + 2", "choices": ["3", "4", "5"], "answer": "4"}],
     r"x\.jsonl:1: 'answer' '4' reads two ways \(index -> choice 4, text -> choice 1\); set data.label_format"),
    ([{"context": "c", "choices": ["a"], "label": 0}], r"x\.jsonl:1: 'choices' must hold at least two choices"),
    ([{"context": "c", "options_list": ["a", "b"], "label": 0}], r"x\.jsonl: no choices found"),
    ([{"context": "c", "choices": ["a", "b"]}], r"x\.jsonl: no label column found"),
    ([{"context": "c", "choices": ["a", ""], "label": 0}], r"x\.jsonl:1: 'choices\[1\]' must be a non-empty string"),
])
def test_bad_records_name_the_file_and_line(tokenizer: Any, tmp_path: Path, rows: list[dict[str, Any]],
                                             message: str) -> None:
    with pytest.raises(DataError, match=message):
        setup_dm(tokenizer, tmp_path, validation_file=str(write_jsonl(tmp_path / "x.jsonl", rows)))


def test_label_format_settles_a_label_that_reads_two_ways(tokenizer: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"context": "2 + 2", "choices": ["3", "4", "5"], "answer": "4"}])
    assert setup_dm(tokenizer, tmp_path, validation_file=str(path), label_format="text").datasets["validation"][0][
        "label"] == 1
    with pytest.raises(DataError, match=r"'answer' '4' is not a choice index from 0 to 2"):
        setup_dm(tokenizer, tmp_path, validation_file=str(path), label_format="index")


def test_examples_with_different_numbers_of_choices_share_a_batch(tokenizer: Any, tmp_path: Path,
                                                                   words: list[str]) -> None:
    rows = make_questions(12, seed=3, words=words, variable=True)
    dm = setup_dm(tokenizer, tmp_path, validation_file=str(write_jsonl(tmp_path / "v.jsonl", rows)), eval_batch_size=12)
    batch = next(iter(dm.val_dataloader()))
    sizes = [sum(1 for k in rows[i] if k.startswith("ending")) for i in batch["idx"].tolist()]
    assert batch["input_ids"].shape[:2] == (12, max(sizes))
    assert batch["choice_mask"].sum(1).tolist() == sizes
    assert batch["labels"].tolist() == [rows[i]["label"] for i in batch["idx"].tolist()]
    for row, n in enumerate(sizes):  # each real choice is its own (context, prefix + ending) pair
        i = batch["idx"][row].item()
        for c in range(n):
            expected = tokenizer(rows[i]["sent1"], f"{rows[i]['sent2']} {rows[i][f'ending{c}']}")["input_ids"]
            assert batch["input_ids"][row, c, : len(expected)].tolist() == expected
            assert batch["attention_mask"][row, c].sum() == len(expected)


def test_collator_pads_missing_choices_with_one_attended_placeholder() -> None:
    out = ChoiceCollator({"input_ids": 0})({"input_ids": [[[5, 6, 7], [5, 8]], [[5, 9]]], "idx": [0, 1]})
    assert out["input_ids"].tolist() == [[[5, 6, 7], [5, 8, 0]], [[5, 9, 0], [0, 0, 0]]]
    assert out["choice_mask"].tolist() == [[True, True], [True, False]]
    assert out["attention_mask"][1, 1].tolist() == [1, 0, 0]  # never a row with nothing to attend to (NaN)


def test_padded_choices_are_never_predicted(tiny_bert: Path) -> None:
    from lit_modules.multiple_choice import MultipleChoiceModule

    model = MultipleChoiceModule(model_name_or_path=str(tiny_bert))
    model.configure_model()
    ids = torch.randint(5, 50, (3, 4, 6))
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [True, False, False, False]])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), choice_mask=mask, labels=torch.tensor([1, 3, 0]))
    assert torch.isfinite(out.loss)
    assert (out.logits.argmax(-1) < mask.sum(1)).all()
    assert torch.softmax(out.logits, -1)[~mask].max() == 0


def write_mc_experiment(path: Path, tiny_bert: Path, data_dir: Path, **data: Any) -> Path:
    cfg = {
        "model": {"class_path": "lit_modules.multiple_choice.MultipleChoiceModule",
                  "init_args": {"model_name_or_path": str(tiny_bert), "learning_rate": 3e-3}},
        "data": {"class_path": "datamodules.multiple_choice.MultipleChoiceDataModule",
                 "init_args": {**{f"{s}_file": str(data_dir / f"{s}.jsonl") for s in ("train", "validation", "test")},
                               "max_seq_length": 32, "batch_size": 16, **data}},
        "trainer": {"max_epochs": 4, "logger": "lightning.pytorch.loggers.CSVLogger"},
        "checkpoint": {"monitor": "val/accuracy", "mode": "max"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def mc_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, words: list[str]) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("mc")
    for split, n, seed in (("train", 160, 1), ("validation", 40, 2), ("test", 41, 3)):
        write_jsonl(tmp / f"{split}.jsonl", make_questions(n, seed, words, variable=split != "train"))
    exp = write_mc_experiment(tmp / "mc.yaml", tiny_bert, tmp)
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp / "runs")])
    assert code == 0
    return {"tmp": tmp, "exp": exp, "run_dir": run_dir, "results": results(run_dir)}


def test_fit_learns_and_exports_a_transformers_model(mc_run: dict[str, Any]) -> None:
    from transformers import AutoModelForMultipleChoice, AutoTokenizer

    res = mc_run["results"]
    assert res["test"]["test/accuracy"] > 0.9  # chance is 1/2 to 1/5: the tiny model learned the marker
    assert res["val/accuracy"] > 0.9
    export = Path(res["export"])
    model = AutoModelForMultipleChoice.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    row = json.loads((mc_run["tmp"] / "test.jsonl").read_text().splitlines()[0])
    endings = [row[f"ending{i}"] for i in range(5) if f"ending{i}" in row]
    enc = tok([row["sent1"]] * len(endings), [f"{row['sent2']} {e}" for e in endings], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        logits = model(**{k: v[None] for k, v in enc.items()}).logits
    assert logits.argmax(-1).item() == row["label"]


def test_validate_test_predict_from_the_checkpoint(mc_run: dict[str, Any], tmp_path: Path) -> None:
    ckpt, out = mc_run["results"]["best_checkpoint"], str(tmp_path / "runs")
    code, test_dir = run_train(["test", "--config", str(mc_run["exp"]), "--ckpt_path", ckpt, "--output_dir", out])
    assert code == 0
    assert results(test_dir)["test"]["test/accuracy"] == pytest.approx(mc_run["results"]["test"]["test/accuracy"])
    code, val_dir = run_train(["validate", "--config", str(mc_run["exp"]), "--ckpt_path", ckpt, "--output_dir", out])
    assert code == 0 and results(val_dir)["validate"]["val/accuracy"] > 0.9
    code, pred_dir = run_train(["predict", "--config", str(mc_run["exp"]), "--ckpt_path", ckpt, "--output_dir", out,
                                "--data.predict_file", str(mc_run["tmp"] / "test.jsonl")])
    assert code == 0
    gold = [json.loads(x) for x in (mc_run["tmp"] / "test.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (pred_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in rows] == list(range(len(gold)))  # input order
    for row, g in zip(rows, gold):
        n = sum(1 for k in g if k.startswith("ending"))
        assert len(row["scores"]) == len(row["choices"]) == n and sum(row["scores"]) == pytest.approx(1.0, abs=1e-5)
        assert row["prediction"] == max(range(n), key=row["scores"].__getitem__)
        assert row["prediction_text"] == row["choices"][row["prediction"]]
    accuracy = sum(r["prediction"] == g["label"] for r, g in zip(rows, gold)) / len(gold)
    assert accuracy == pytest.approx(mc_run["results"]["test"]["test/accuracy"])


def test_lora_preset_trains_adapters_and_the_head(mc_run: dict[str, Any], tmp_path: Path) -> None:
    from tests.conftest import fit_with_lora_and_test_again

    res = fit_with_lora_and_test_again(mc_run["exp"], tmp_path, "classifier", "test/accuracy",
                                       ["--model.learning_rate", "1e-2"])
    assert res["test"]["test/accuracy"] > 0.5


def test_experiment_file_parses() -> None:
    proc = run_train_subprocess(["fit", "--config", "experiments/minilm/swag.yaml", "--print_config"])
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["data"]["init_args"]["dataset_name"] == "allenai/swag"
    assert cfg["model"]["class_path"] == "lit_modules.multiple_choice.MultipleChoiceModule"
    assert (ROOT / "experiments" / "minilm" / "swag.yaml").is_file()
