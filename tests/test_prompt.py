"""Prompt-based classification (masked and causal LMs), zero-shot evaluation, few-shot sampling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from datamodules.prompt_classification import PromptClassificationDataModule
from datamodules.readers import DataError
from lit_modules.base import ConfigError
from lit_modules.prompt_classification import PromptClassificationModule
from tests.conftest import SENTIMENT, results, run_train

VERBALIZER = {"negative": " terrible", "positive": " great"}


def prompt_experiment(path: Path, model_dir: Path, template: str, verbalizer: dict[str, str] = VERBALIZER, **data: Any) -> Path:
    cfg = {
        "model": {"class_path": "lit_modules.prompt_classification.PromptClassificationModule",
                  "init_args": {"model_name_or_path": str(model_dir), "verbalizer": verbalizer, "learning_rate": 1e-3}},
        "data": {"class_path": "datamodules.prompt_classification.PromptClassificationDataModule",
                 "init_args": {"template": template, "max_seq_length": 48, "batch_size": 8, **data}},
        "trainer": {"max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}},
        "checkpoint": {"monitor": "val/accuracy", "mode": "max"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_zero_shot_test_needs_no_training_data(tiny_llama: Path, tmp_path: Path) -> None:
    exp = prompt_experiment(tmp_path / "zs.yaml", tiny_llama, "Review: {text}\nSentiment:",
                            test_file=str(SENTIMENT / "test.jsonl"), predict_file=str(SENTIMENT / "test.jsonl"))
    code, run_dir = run_train(["test", "--config", str(exp), "--output_dir", str(tmp_path / "runs")])
    assert code == 0
    metrics = results(run_dir)["test"]
    assert {"test/accuracy", "test/f1", "test/loss"} <= set(metrics)
    code, pred_dir = run_train(["predict", "--config", str(exp), "--output_dir", str(tmp_path / "runs")])
    rows = [json.loads(x) for x in (pred_dir / "predictions.jsonl").read_text().splitlines()]
    gold = [json.loads(x)["label"] for x in (SENTIMENT / "test.jsonl").read_text().splitlines()]
    assert len(rows) == len(gold) and all(set(r["scores"]) == {"negative", "positive"} for r in rows)
    accuracy = sum(r["label"] == g for r, g in zip(rows, gold)) / len(gold)
    assert accuracy == pytest.approx(metrics["test/accuracy"])


@pytest.mark.parametrize("kind", ["masked", "causal"])
def test_few_shot_fine_tuning_and_export(tiny_bert: Path, tiny_llama: Path, tmp_path: Path, kind: str) -> None:
    model_dir, template = (tiny_bert, "{text} It was {mask}.") if kind == "masked" else (tiny_llama, "{text} It was")
    verbalizer = {"negative": "bad", "positive": "good"} if kind == "masked" else VERBALIZER  # in the tiny vocabulary
    exp = prompt_experiment(tmp_path / f"{kind}.yaml", model_dir, template, verbalizer, train_file=str(SENTIMENT / "train.jsonl"),
                            test_file=str(SENTIMENT / "test.jsonl"), few_shot_k=8, few_shot_seed=3)
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs")])
    assert code == 0
    res = results(run_dir)
    assert 0.0 <= res["test"]["test/accuracy"] <= 1.0
    export = Path(res["export"])
    assert json.loads((export / "verbalizer.json").read_text()) == {k: [v] for k, v in verbalizer.items()}
    from transformers import pipeline

    task = "fill-mask" if kind == "masked" else "text-generation"
    assert pipeline(task, model=str(export))


def _dm(tokenizer: Any, tmp_path: Path, **kwargs: Any) -> PromptClassificationDataModule:
    dm = PromptClassificationDataModule(cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.connect(tokenizer)
    return dm


def test_few_shot_sampling(tiny_bert: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    seen = []
    for seed in (1, 1, 2):
        dm = _dm(tok, tmp_path, train_file=str(SENTIMENT / "train.jsonl"), validation_file=str(SENTIMENT / "validation.jsonl"),
                 few_shot_k=16, few_shot_seed=seed)
        dm.setup("fit")
        train, dev = dm.datasets["train"], dm.datasets["validation"]
        assert sorted(train["label"]).count("positive") == 16 and sorted(train["label"]).count("negative") == 16
        assert len(dev) == 32 and not set(train["line"]) & set(dev["line"])  # dev drawn apart from train, as LM-BFF
        seen.append(tuple(train["line"]))
    assert seen[0] == seen[1] and seen[0] != seen[2]
    dm = _dm(tok, tmp_path, train_file=str(SENTIMENT / "train.jsonl"), validation_file=str(SENTIMENT / "validation.jsonl"),
             few_shot_k=4, few_shot_dev="validation")
    dm.setup("fit")
    assert len(dm.datasets["validation"]) == 8
    dm = _dm(tok, tmp_path, train_file=str(SENTIMENT / "train.jsonl"), few_shot_k=400)
    with pytest.raises(DataError, match=r"train\.jsonl: data\.few_shot_k=400 needs 800 'negative' examples, found 250"):
        dm.setup("fit")


def test_prompt_rendering_keeps_the_template(tiny_bert: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    long_text = " ".join(["good"] * 100)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": long_text, "label": "positive"}) + "\n" + json.dumps({"text": "bad", "label": "negative"}) + "\n")
    dm = _dm(tok, tmp_path, train_file=str(path), template="{text} It was {mask}.", max_seq_length=20)
    dm.setup("fit")
    ids = dm.datasets["train"][0]["input_ids"]
    assert len(ids) <= 20 and ids.count(tok.mask_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=False).endswith("it was [MASK]. [SEP]")
    with pytest.raises(DataError, match=r"data\.template: must contain \{text\}"):
        PromptClassificationDataModule(template="It was {mask}.")


def test_causal_scores_equal_summed_token_logprobs(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    model = PromptClassificationModule(model_name_or_path=str(tiny_llama), verbalizer=VERBALIZER)
    model.configure_model()
    model.eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = ["A fine film. It was", "Cold food. It was much"]
    batch = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row, prompt in enumerate(prompts):
            for col, word in enumerate(VERBALIZER.values()):
                p = tok(prompt)["input_ids"]
                w = tok(word, add_special_tokens=False)["input_ids"]
                full = torch.tensor([p + w])
                logprobs = model.model(input_ids=full).logits.log_softmax(-1)[0]
                expected = sum(logprobs[len(p) - 1 + i, t] for i, t in enumerate(w))
                assert scores[row, col].item() == pytest.approx(expected.item(), abs=1e-4)


def test_verbalizer_errors(tiny_bert: Path, tiny_llama: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.verbalizer\.positive: ' wonderfulness' is \d+ tokens .* single-token"):
        PromptClassificationModule(model_name_or_path=str(tiny_bert), verbalizer={"negative": "bad", "positive": " wonderfulness"})
    with pytest.raises(ConfigError, match="at least two classes"):
        PromptClassificationModule(model_name_or_path=str(tiny_bert), verbalizer={"positive": "good"})
    assert PromptClassificationModule(model_name_or_path=str(tiny_llama), verbalizer=VERBALIZER).lm_type == "causal"


def test_mask_template_needs_a_mask_token(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = prompt_experiment(tmp_path / "bad.yaml", tiny_llama, "{text} It was {mask}.", train_file=str(SENTIMENT / "train.jsonl"))
    code, _ = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs")])
    assert code == 2
    assert "data.template: has {mask} but the tokenizer" in capsys.readouterr().err


def test_contextual_calibration_divides_by_the_content_free_prior(tiny_llama: Path, tmp_path: Path) -> None:
    """Calibrated class probabilities are the raw ones divided by the content-free prior (renormalised), so
    the ratio calibrated/raw between two classes is one constant for every row, and the content-free
    input itself scores uniform after calibration."""
    exp = prompt_experiment(tmp_path / "zs.yaml", tiny_llama, "Review: {text}\nSentiment:",
                            predict_file=str(SENTIMENT / "test.jsonl"))
    rows = {}
    for calibrate in ("false", "true"):
        code, pred_dir = run_train(["predict", "--config", str(exp), "--model.calibrate", calibrate,
                                    "--model.content_free_inputs", '["N/A"]', "--output_dir", str(tmp_path / calibrate)])
        assert code == 0
        rows[calibrate] = [json.loads(x)["scores"] for x in (pred_dir / "predictions.jsonl").read_text().splitlines()]
    ratios = [(c["negative"] / r["negative"]) / (c["positive"] / r["positive"]) for r, c in zip(rows["false"], rows["true"])]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-4)
    assert ratios[0] != pytest.approx(1.0, abs=1e-3)  # the tiny model's prior is not uniform: calibration changed something

    model = PromptClassificationModule(model_name_or_path=str(tiny_llama), verbalizer=VERBALIZER, calibrate=True,
                                       content_free_inputs=["N/A"])
    model.configure_model()
    model.eval()
    dm = PromptClassificationDataModule(template="Review: {text}\nSentiment:", max_seq_length=48)
    dm.connect(model.tokenizer)
    ids = torch.tensor(dm.encode({"text": ["N/A"], "text_pair": [None]})["input_ids"])
    raw = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.softmax(-1)[0]
    model.log_prior = raw.log()
    calibrated = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.softmax(-1)[0]
    assert calibrated.tolist() == pytest.approx([0.5, 0.5], abs=1e-5)
