"""Sequence-to-sequence generation on tiny random T5, BART, Llama and BERT2BERT models built offline.

Covers the metrics against their reference packages (``rouge-score``, ``sacrebleu``), every data
layout and bad input, the feature layouts of encoder-decoder and decoder-only models, generation
settings and schedules, and ``train.py`` fit / test / predict / export end to end.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from datamodules.readers import DataError
from datamodules.seq2seq import IGNORE_INDEX, Seq2SeqDataModule
from lit_modules.base import ConfigError
from lit_modules.seq2seq import Seq2SeqModule, detect_architecture, left_padded_prompts
from lit_modules.seq2seq_metrics import MeanGeneratedLength, RougeScore, SacreBleuScore, split_sentences
from lit_modules.schema import ModelFacts, connect
from tests.conftest import build_tiny_bert, fit_with_lora_and_test_again, results, run_train

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega summarize email subject").split()


# ---- tiny models and data ----------------------------------------------------------------------

def word_tokenizer(folder: Path, specials: list[str], template: str | None, **tokens: str) -> int:
    """A word-level fast tokenizer over WORDS (saved to ``folder``); returns the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(dict.fromkeys([*specials, *WORDS, ".", ",", ":", "!", "?"]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=tokens["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        backend.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template])
    PreTrainedTokenizerFast(tokenizer_object=backend, **tokens).save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny_t5")
    v = word_tokenizer(folder, ["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=v, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BartConfig, BartForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny_bart")
    v = word_tokenizer(folder, ["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", bos_token="<s>", pad_token="<pad>",
                       eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    BartForConditionalGeneration(BartConfig(
        vocab_size=v, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, bos_token_id=0, pad_token_id=1,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-style: a BOS token added in front, no padding token (as Llama and GPT-2 ship)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    v = word_tokenizer(folder, ["<unk>", "<s>", "</s>"], "<s> $A", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_words(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert_s2s"), WORDS + [".", ":"])


@pytest.fixture(scope="session")
def copy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """XSum layout (document / summary): the summary is the document's first three words."""
    folder = tmp_path_factory.mktemp("copy_data")
    rng = random.Random(0)
    greek = WORDS[:24]
    for split, n in (("train", 200), ("validation", 40), ("test", 24), ("predict", 10)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                words = rng.choices(greek, k=rng.randint(5, 10))
                f.write(json.dumps({"document": " ".join(words) + " .", "summary": " ".join(words[:3])}) + "\n")
    return folder


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_dm(path: Path, tokenizer_dir: Path | None = None, decoder_only: bool = False, split: str = "train",
            **kwargs: Any) -> Seq2SeqDataModule:
    from transformers import AutoTokenizer

    dm = Seq2SeqDataModule(**{f"{split}_file": str(path)}, cache_dir=str(path.parent / "cache"), **kwargs)
    tok = None
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        if decoder_only and tok.pad_token is None:
            tok.pad_token = tok.eos_token
    dm.connect(tok, ModelFacts(task="seq2seq", decoder_only=decoder_only))
    return dm


def columns(path: Path, split: str = "train", **kwargs: Any) -> dict[str, list]:
    from datamodules.readers import read_records

    records, lines = read_records(path)
    return Seq2SeqDataModule(**kwargs).canonical_columns(records, lines, split, str(path))


# ---- metrics -----------------------------------------------------------------------------------

PREDS = ["The cat sat on the mat. It was happy!", "Results show gains of 3.5 points on GLUE. Code is public",
         "", "meeting on Monday at 10 a.m.", "Running runners ran quickly\nto the finish line."]
REFS = [["A cat was sitting on the mat. The cat was very happy."],
        ["We show 3.5 point gains on GLUE.", "Gains on GLUE; the code is released.", "Big gains."],
        ["nothing here"], ["Meeting Monday 10am", "monday meeting"],
        ["The runners were running. They finished quickly."]]


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_equals_the_rouge_score_package(use_stemmer: bool) -> None:
    """Same texts, same sentence splits: equal to rouge-score (best over references, Lsum on newline-split sentences)."""
    from rouge_score import rouge_scorer

    metric = RougeScore(use_stemmer=use_stemmer)
    metric.update(PREDS, REFS, torch.arange(len(PREDS)))
    ours = metric.compute()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=use_stemmer)
    expected: dict[str, list[float]] = {k: [] for k in ours}
    for pred, refs in zip(PREDS, REFS):
        scores = scorer.score_multi(["\n".join(split_sentences(r)) for r in refs], "\n".join(split_sentences(pred)))
        for key in expected:
            expected[key].append(scores[key].fmeasure)
    for key, values in expected.items():
        assert float(ours[key]) == pytest.approx(sum(values) / len(values), abs=1e-6), key
    assert float(ours["rougeLsum"]) != pytest.approx(float(ours["rougeL"]))  # the sentence split matters here


def test_sacrebleu_equals_the_sacrebleu_package() -> None:
    import sacrebleu

    preds = ["the cat is on the mat", "a quick brown fox jumps over the dog", "hello there general kenobi"]
    refs = [["there is a cat on the mat", "a cat is on the mat"], ["the quick brown fox jumps over the lazy dog"] * 2,
            ["hello there general kenobi", "hi there"]]
    metric = SacreBleuScore()
    metric.update(preds, refs, [0, 1, 2])
    expected = sacrebleu.corpus_bleu(preds, [[r[0] for r in refs], [r[1] for r in refs]]).score
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-4)


def test_examples_repeated_by_a_distributed_sampler_count_once() -> None:
    """Samplers pad the last batch with repeated examples; keyed rows make the result the single-process one."""
    once, twice = RougeScore(), RougeScore()
    once.update(PREDS, REFS, torch.arange(5))
    twice.update(PREDS[:3], REFS[:3], torch.arange(3))
    twice.update(PREDS[3:], REFS[3:], torch.arange(3, 5))
    twice.update(PREDS[:2], REFS[:2], torch.arange(2))  # padding: examples 0 and 1 again
    assert {k: float(v) for k, v in twice.compute().items()} == {k: float(v) for k, v in once.compute().items()}
    length = MeanGeneratedLength()
    length.update(torch.tensor([4, 6]), torch.tensor([0, 1]))
    length.update(torch.tensor([4]), torch.tensor([0]))
    assert float(length.compute()) == 5.0


def test_sentence_splitting_for_rouge_lsum() -> None:
    text = "Dr. Smith met the U.S. team at 3 p.m. Monday. It rained! Did J. R. Smith come? Yes.\nA new line"
    assert split_sentences(text) == ["Dr. Smith met the U.S. team at 3 p.m. Monday.", "It rained!",
                                     "Did J. R. Smith come?", "Yes.", "A new line"]
    assert split_sentences("no punctuation at all") == ["no punctuation at all"]
    assert split_sentences("  \n ") == []


def test_punkt_splitter_needs_its_nltk_data() -> None:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        pytest.skip("punkt_tab is installed here")
    except LookupError:
        pass
    with pytest.raises(ConfigError, match=r"model.sentence_splitter: 'punkt' needs NLTK's punkt_tab data"):
        from lit_modules.seq2seq_metrics import check_sentence_splitter

        check_sentence_splitter("punkt", "model.sentence_splitter")


# ---- data layouts ------------------------------------------------------------------------------

def test_hub_style_layouts(tmp_path: Path) -> None:
    """cnn_dailymail, xsum, samsum and aeslc column names are found without options."""
    cnn = columns(write_jsonl(tmp_path / "cnn.jsonl", [{"article": "A long story.", "highlights": "One.\nTwo.", "id": "x"}]))
    assert cnn == {"source": ["A long story."], "target": ["One.\nTwo."], "references": [["One.\nTwo."]]}
    xsum = columns(write_jsonl(tmp_path / "xsum.jsonl", [{"document": "Doc text", "summary": "Sum", "id": "1"}]))
    assert xsum["source"] == ["Doc text"] and xsum["target"] == ["Sum"]
    samsum = columns(write_jsonl(tmp_path / "samsum.jsonl", [{"id": "1", "dialogue": "A: hi\nB: yo", "summary": "Greeting"}]))
    assert samsum["source"] == ["A: hi\nB: yo"]
    aeslc = columns(write_jsonl(tmp_path / "aeslc.jsonl", [
        {"email_body": "Please send the file.", "subject": "File", "ann0": "file request", "ann1": "", "ann2": "send file"}]),
        reference_columns=["ann0", "ann1", "ann2"])
    assert aeslc["target"] == ["File"] and aeslc["references"] == [["File", "file request", "send file"]]


def test_lists_of_sentences_and_lists_of_references(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "scitldr.jsonl", [{"source": ["First sentence.", "Second one."],
                                                     "target": ["TLDR one.", "TLDR two."]}])
    joined = columns(path)
    assert joined["source"] == ["First sentence. Second one."]
    assert joined["target"] == ["TLDR one. TLDR two."] and joined["references"] == [["TLDR one. TLDR two."]]
    refs = columns(path, target_list="references")
    assert refs["target"] == ["TLDR one."] and refs["references"] == [["TLDR one.", "TLDR two."]]


def test_translation_layouts_and_csv(tmp_path: Path) -> None:
    nested = write_jsonl(tmp_path / "wmt.jsonl", [{"translation": {"de": "Hallo Welt", "en": "Hello world"}}])
    assert columns(nested, source_lang="en", target_lang="de")["target"] == ["Hallo Welt"]
    flat = tmp_path / "pairs.csv"
    flat.write_text('en,de\n"Good morning, all",Guten Morgen\n', encoding="utf-8")
    out = columns(flat, source_lang="en", target_lang="de")
    assert out["source"] == ["Good morning, all"] and out["references"] == [["Guten Morgen"]]
    csv = tmp_path / "news.csv"
    csv.write_text('article,highlights\n"Text, with comma",Short\n', encoding="utf-8")
    assert columns(csv)["source"] == ["Text, with comma"]
    assert columns(write_jsonl(tmp_path / "p.jsonl", [{"document": "only a source"}]), split="predict") == {
        "source": ["only a source"]}


def test_hub_dataset_through_load_dataset(tmp_path: Path, tiny_t5: Path) -> None:
    """``dataset_name`` goes through ``datasets.load_dataset`` (a local folder here, a hub id for users)."""
    import datasets

    folder = tmp_path / "hub_like"
    folder.mkdir()
    for split in ("train", "validation"):
        datasets.Dataset.from_dict({"dialogue": ["alpha beta", "gamma delta"], "summary": ["alpha", "gamma"]}).to_parquet(
            folder / f"{split}.parquet")
    dm = Seq2SeqDataModule(dataset_name=str(folder), cache_dir=str(tmp_path / "cache"))
    from transformers import AutoTokenizer

    dm.connect(AutoTokenizer.from_pretrained(tiny_t5))
    dm.setup("fit")
    assert dm.references["validation"] == [["alpha"], ["gamma"]]


# ---- features ----------------------------------------------------------------------------------

def test_encoder_decoder_features_and_truncation_report(tmp_path: Path, tiny_t5: Path, caplog: Any) -> None:
    rows = [{"document": "alpha beta gamma", "summary": "delta epsilon"},
            {"document": "alpha " * 20, "summary": "zeta eta theta iota kappa lambda"}]
    dm = make_dm(write_jsonl(tmp_path / "t.jsonl", rows), tiny_t5, source_prefix="summarize: ", max_source_length=8,
                 max_target_length=4)
    with pytest.warns(UserWarning, match=r"t.jsonl: 1 of 2 targets are longer than data.max_target_length=4 tokens "
                                         r"and were truncated for training \(first at line 2\)"):
        dm.setup("fit")
    tok = dm.tokenizer
    ds = dm.datasets["train"]
    assert tok.convert_ids_to_tokens(ds[0]["input_ids"]) == ["summarize", ":", "alpha", "beta", "gamma", "</s>"]
    assert tok.convert_ids_to_tokens(ds[0]["labels"]) == ["delta", "epsilon", "</s>"]
    assert len(ds[1]["input_ids"]) == 8 and tok.convert_ids_to_tokens(ds[1]["labels"]) == ["zeta", "eta", "theta", "</s>"]
    assert dm.truncation_counts("train") == {"source": 1, "target": 1}
    assert dm.references["train"][1] == ["zeta eta theta iota kappa lambda"]  # evaluation keeps the whole reference
    batch = next(iter(dm._loader("train", 2, [0, 1])))
    assert batch["labels"][0].tolist()[3:] == [IGNORE_INDEX]  # label padding is ignored by the loss


def test_targets_longer_than_sources_are_batched(tmp_path: Path, tiny_t5: Path) -> None:
    rows = [{"document": "alpha", "summary": "beta gamma delta epsilon zeta"}, {"document": "eta theta", "summary": "iota"}]
    dm = make_dm(write_jsonl(tmp_path / "t.jsonl", rows), tiny_t5)
    dm.setup("fit")
    batch = next(iter(dm._loader("train", 2, [0, 1])))
    assert batch["input_ids"].shape == (2, 3) and batch["labels"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["labels"][1].tolist() == [dm.tokenizer.convert_tokens_to_ids("iota"), 1] + [IGNORE_INDEX] * 4


def test_decoder_only_features(tmp_path: Path, tiny_llama: Path) -> None:
    rows = [{"document": "alpha beta gamma delta epsilon", "summary": "alpha beta"}]
    dm = make_dm(write_jsonl(tmp_path / "t.jsonl", rows), tiny_llama, decoder_only=True,
                 prompt_template="email : {source} subject :", max_source_length=3)
    dm.setup("fit")
    tok, ex = dm.tokenizer, dm.datasets["train"][0]
    tokens = tok.convert_ids_to_tokens(ex["input_ids"])
    # BOS, template text kept whole, the source truncated to 3 tokens, then the target and EOS
    assert tokens == ["<s>", "email", ":", "alpha", "beta", "gamma", "subject", ":", "alpha", "beta", "</s>"]
    assert ex["labels"] == [IGNORE_INDEX] * 8 + tok.convert_tokens_to_ids(["alpha", "beta", "</s>"])
    pred = make_dm(write_jsonl(tmp_path / "p.jsonl", [{"document": "alpha beta"}]), tiny_llama, decoder_only=True,
                   split="predict")
    pred.setup("predict")
    assert pred.tokenizer.convert_ids_to_tokens(pred.datasets["predict"][0]["input_ids"]) == ["<s>", "alpha", "beta"]
    assert "labels" not in pred.datasets["predict"].column_names


def test_left_padded_prompts() -> None:
    """Prompts cut out of right- or left-padded prompt+target rows, left-padded for generation."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [0, 0, 5, 6, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, -100], [-100, -100, -100, -100, 8, 9]])
    prompts, prompt_mask = left_padded_prompts(ids, mask, labels, pad_id=0)
    assert prompts.tolist() == [[5, 6, 7], [0, 5, 6]] and prompt_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    prompts, _ = left_padded_prompts(ids, mask, None, pad_id=0)  # predict: the whole row is the prompt
    assert prompts.tolist() == [[5, 6, 7, 8, 9], [0, 5, 6, 8, 9]]


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, kwargs, message", [
    ([{"document": "a", "summary": "b"}, {"document": "  ", "summary": "b"}], {},
     r"bad.jsonl:2: 'document' must be a non-empty string \(or list of strings\), got '  '"),
    ([{"document": "a", "summary": ""}], {}, r"bad.jsonl:1: 'summary' must be a non-empty string"),
    ([{"document": "a", "summary": None}], {}, r"bad.jsonl:1: record has no 'summary' field"),
    ([{"document": "a", "summary": "b"}, {"document": "a"}], {}, r"bad.jsonl:2: record has no 'summary' field"),
    ([{"body": "a", "summary": "b"}], {}, r"bad.jsonl: no source column found \(looked for source, article, .*\); "
                                          r"columns found: body, summary \(set data.source_column\)"),
    ([{"document": "a", "title": "b"}], {}, r"bad.jsonl: no target column found .*columns found: document, title"),
    ([{"document": "a", "summary": "b"}], {"target_column": "headline"}, r"no target column 'headline'"),
    ([{"document": "a", "summary": "b"}], {"reference_columns": ["ann0"]},
     r"bad.jsonl: no reference column 'ann0'; columns found: document, summary"),
    ([{"document": "a", "summary": []}], {"target_list": "references"}, r"bad.jsonl:1: 'summary' holds no references"),
    ([{"document": "a", "summary": ["x", ""]}], {"target_list": "references"}, r"bad.jsonl:1: 'summary\[1\]' must be"),
    ([{"document": "a", "summary": "b", "ann0": 3}], {"reference_columns": ["ann0"]},
     r"bad.jsonl:1: reference column 'ann0' must hold a string, got 3"),
    ([{"translation": {"en": "a"}}], {"source_lang": "en", "target_lang": "de"},
     r"bad.jsonl:1: record has no 'translation.de' field"),
])
def test_bad_records_name_file_and_line(tmp_path: Path, rows: list[dict[str, Any]], kwargs: dict[str, Any],
                                        message: str) -> None:
    with pytest.raises(DataError, match=message):
        columns(write_jsonl(tmp_path / "bad.jsonl", rows), split="validation", **kwargs)


def test_bad_data_options(tmp_path: Path, tiny_t5: Path) -> None:
    with pytest.raises(DataError, match=r"data.prompt_template: must contain '\{source\}' exactly once"):
        Seq2SeqDataModule(prompt_template="Summarize:")
    with pytest.raises(DataError, match="data.source_lang / data.target_lang: set both"):
        Seq2SeqDataModule(source_lang="en")
    with pytest.raises(DataError, match="data.target_list: expected 'sentences' or 'references'"):
        Seq2SeqDataModule(target_list="both")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="data.max_source_length / data.max_target_length: expected at least"):
        Seq2SeqDataModule(max_target_length=1)
    dm = make_dm(write_jsonl(tmp_path / "t.jsonl", [{"document": "a", "summary": "b"}]), tiny_t5,
                 prompt_template="{source} =>")
    with pytest.raises(DataError, match="data.prompt_template: only decoder-only models take a prompt template"):
        dm.setup("fit")


# ---- model -------------------------------------------------------------------------------------

def test_architecture_detection(tiny_t5: Path, tiny_bart: Path, tiny_llama: Path, tiny_bert_words: Path) -> None:
    from transformers import AutoConfig

    found = [detect_architecture(AutoConfig.from_pretrained(p)) for p in (tiny_t5, tiny_bart, tiny_llama, tiny_bert_words)]
    assert found == ["seq2seq", "seq2seq", "causal_lm", "encoder_decoder"]


def test_bert2bert_special_tokens_and_generation_settings(tiny_bert_words: Path) -> None:
    module = Seq2SeqModule(model_name_or_path=str(tiny_bert_words), num_beams=3, max_new_tokens=7, min_new_tokens=2,
                           length_penalty=0.6, no_repeat_ngram_size=3, generation_kwargs={"repetition_penalty": 1.2})
    assert module.architecture == "encoder_decoder"
    model = module.build_model()
    tok = module.tokenizer
    assert type(model).__name__ == "EncoderDecoderModel" and model.config.decoder.is_decoder
    assert model.config.decoder.add_cross_attention
    gen = model.generation_config
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id) == (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
    assert model.config.decoder_start_token_id == tok.cls_token_id
    assert (gen.num_beams, gen.max_new_tokens, gen.min_new_tokens, gen.length_penalty, gen.no_repeat_ngram_size,
            gen.repetition_penalty) == (3, 7, 2, 0.6, 3, 1.2)


def test_decoder_only_tokenizer_gets_padding_and_left_side(tiny_llama: Path) -> None:
    module = Seq2SeqModule(model_name_or_path=str(tiny_llama))
    assert module.decoder_only and module.tokenizer.pad_token == "</s>" and module.tokenizer.padding_side == "left"


@pytest.mark.parametrize("kwargs, message", [
    ({"num_beams": 0}, "model.num_beams: expected an integer >= 1, got 0"),
    ({"max_new_tokens": 4, "min_new_tokens": 5}, "model.min_new_tokens: 5 is more than model.max_new_tokens=4"),
    ({"generate_every_n_epochs": 0}, "model.generate_every_n_epochs: expected an integer >= 1"),
    ({"decoder_name_or_path": "x"}, "model.decoder_name_or_path: only used with architecture encoder_decoder, not seq2seq"),
    ({"sentence_splitter": "spacy"}, "model.sentence_splitter: expected 'rules' or 'punkt'"),
    ({"generation_kwargs": {"beam_size": 4}}, "model.generation_kwargs: beam_size is not a GenerationConfig field"),
])
def test_bad_model_options(tiny_t5: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Seq2SeqModule(model_name_or_path=str(tiny_t5), **kwargs)


def fit_tiny(model_dir: Path, data: Path, tmp_path: Path, epochs: int, **model_kwargs: Any) -> tuple[Any, Any]:
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import CSVLogger

    seed_everything(0)
    model = Seq2SeqModule(model_name_or_path=str(model_dir), **{"learning_rate": 1e-2, "max_new_tokens": 6, **model_kwargs})
    dm = Seq2SeqDataModule(train_file=str(data / "train.jsonl"), validation_file=str(data / "validation.jsonl"),
                           batch_size=16, cache_dir=str(tmp_path / "cache"))
    connect(model, dm)
    trainer = Trainer(max_epochs=epochs, logger=CSVLogger(tmp_path, name="", version="csv"), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      num_sanity_val_steps=0)
    trainer.fit(model, dm)
    return model, trainer


def test_decoder_only_learns_from_the_target_tokens(tiny_llama: Path, copy_data: Path, tmp_path: Path) -> None:
    """The copy task is learned through the prompt/target layout, and generation reads the prompt back correctly."""
    model, trainer = fit_tiny(tiny_llama, copy_data, tmp_path, epochs=20)
    metrics = trainer.callback_metrics
    assert float(metrics["val/rouge1"]) > 0.4, metrics  # an untrained model (or one that ignores the prompt) scores about 0.1
    assert 3.0 <= float(metrics["val/gen_len"]) <= 6.0  # three words and the end token when it has learned to stop


def test_generation_every_n_epochs_and_on_a_subset(tiny_t5: Path, copy_data: Path, tmp_path: Path) -> None:
    import csv

    seen: list[int] = []

    class Counting(Seq2SeqModule):
        def generate_texts(self, batch: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
            seen.extend(batch["idx"].tolist())
            return super().generate_texts(batch)

    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger

    model = Counting(model_name_or_path=str(tiny_t5), max_new_tokens=3, generate_every_n_epochs=2, generate_val_samples=7)
    dm = Seq2SeqDataModule(train_file=str(copy_data / "train.jsonl"), validation_file=str(copy_data / "validation.jsonl"),
                           batch_size=32, max_train_samples=32, cache_dir=str(tmp_path / "cache"))
    connect(model, dm)
    Trainer(max_epochs=4, logger=CSVLogger(tmp_path, name="", version="csv"), enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0).fit(model, dm)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    rouge_epochs = [int(r["epoch"]) for r in rows if r.get("val/rouge1")]
    loss_epochs = [int(r["epoch"]) for r in rows if r.get("val/loss")]
    assert loss_epochs == [0, 1, 2, 3] and rouge_epochs == [0, 2, 3]  # every 2nd epoch and the last
    assert sorted(seen) == sorted(list(range(7)) * 3)  # the first 7 validation examples, 3 times


# ---- train.py end to end -----------------------------------------------------------------------

def write_experiment(path: Path, model_dir: Path, data: Path, model: dict[str, Any] | None = None,
                     data_args: dict[str, Any] | None = None, max_epochs: int = 2) -> Path:
    cfg = {
        "model": {"class_path": "lit_modules.seq2seq.Seq2SeqModule",
                  "init_args": {"model_name_or_path": str(model_dir), "learning_rate": 1e-2, "max_new_tokens": 6,
                                **(model or {})}},
        "data": {"class_path": "datamodules.seq2seq.Seq2SeqDataModule",
                 "init_args": {"train_file": str(data / "train.jsonl"), "validation_file": str(data / "validation.jsonl"),
                               "test_file": str(data / "test.jsonl"), "batch_size": 16, "max_train_samples": 64,
                               **(data_args or {})}},
        "trainer": {"max_epochs": max_epochs, "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}},
        "checkpoint": {"monitor": "val/rouge1", "mode": "max"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def t5_run(tiny_t5: Path, copy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One train.py fit of the tiny T5 (beam search, a source prefix); later tests reuse its checkpoint."""
    tmp = tmp_path_factory.mktemp("t5_run")
    exp = write_experiment(tmp / "t5.yaml", tiny_t5, copy_data, model={"num_beams": 2, "no_repeat_ngram_size": 2},
                           data_args={"source_prefix": "summarize: "})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp / "runs")])
    assert code == 0
    return {"exp": exp, "run_dir": run_dir, "tmp": tmp, "res": results(run_dir)}


def test_train_fit_test_predict_and_export_t5(t5_run: dict[str, Any], copy_data: Path, tmp_path: Path) -> None:
    res, run_dir, exp = t5_run["res"], t5_run["run_dir"], t5_run["exp"]
    assert set(res["test"]) == {"test/loss", "test/rouge1", "test/rouge2", "test/rougeL", "test/rougeLsum", "test/bleu",
                                "test/gen_len"}
    assert 0.0 <= res["val/rouge1"] <= 1.0 and 1.0 <= res["test"]["test/gen_len"] <= 6.0
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/loss", "val/rouge1", "val/rouge2", "val/rougeL", "val/rougeLsum", "val/bleu", "val/gen_len"} <= set(header)

    ckpt = res["best_checkpoint"]
    code, pred_dir = run_train(["predict", "--config", str(exp), "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "runs"),
                                "--data.predict_file", str(copy_data / "predict.jsonl")])
    assert code == 0
    rows = [json.loads(x) for x in (pred_dir / "predictions.jsonl").read_text().splitlines()]
    inputs = [json.loads(x) for x in (copy_data / "predict.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == [r["document"] for r in inputs]  # input order
    assert [r["target"] for r in rows] == [r["summary"] for r in inputs]
    assert all(isinstance(r["prediction"], str) for r in rows)

    code, test_dir = run_train(["test", "--config", str(exp), "--ckpt_path", ckpt, "--output_dir", str(tmp_path / "runs")])
    assert code == 0
    assert results(test_dir)["test"]["test/rouge1"] == pytest.approx(res["test"]["test/rouge1"])

    # transformers 5 has no summarization pipeline: the export is an AutoModelForSeq2SeqLM folder whose
    # generation_config.json holds the settings, so generate() reproduces the predictions
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    export = Path(res["export"])
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(export), AutoTokenizer.from_pretrained(export)
    assert (model.generation_config.num_beams, model.generation_config.no_repeat_ngram_size) == (2, 2)
    prefix = model.config.task_specific_params["summarization"]["prefix"]
    assert prefix == "summarize: "
    enc = tok([prefix + r["document"] for r in inputs], return_tensors="pt", padding=True)
    out = tok.batch_decode(model.generate(**enc), skip_special_tokens=True)
    assert [t.strip() for t in out] == [r["prediction"] for r in rows]


def test_metrics_under_two_processes_equal_one_process(t5_run: dict[str, Any], tmp_path: Path) -> None:
    """DDP on CPU (gloo): 23 test examples over 2 processes, the sampler repeats one; the metrics are unchanged."""
    from tests.conftest import run_train_subprocess

    args = ["test", "--config", str(t5_run["exp"]), "--ckpt_path", t5_run["res"]["best_checkpoint"],
            "--data.max_eval_samples", "23", "--data.eval_batch_size", "5", "--trainer.accelerator", "cpu"]
    code, single_dir = run_train([*args, "--output_dir", str(tmp_path / "one")])
    assert code == 0
    proc = run_train_subprocess([*args, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                                 "--output_dir", str(tmp_path / "two")], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, ddp = results(single_dir)["test"], results(next((tmp_path / "two" / "t5").iterdir()))["test"]
    for key in ("test/rouge1", "test/rouge2", "test/rougeL", "test/rougeLsum", "test/bleu", "test/gen_len"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key


def test_train_decoder_only_export_loads_in_a_text_generation_pipeline(tiny_llama: Path, copy_data: Path,
                                                                       tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "llama.yaml", tiny_llama, copy_data, data_args={"prompt_template": "{source} :"})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                               "--data.predict_file", str(copy_data / "predict.jsonl")])
    assert code == 0
    res = results(run_dir)
    assert res["test"]["test/gen_len"] > 0
    code, pred_dir = run_train(["predict", "--config", str(exp), "--ckpt_path", res["best_checkpoint"],
                                "--output_dir", str(tmp_path / "runs"), "--data.predict_file", str(copy_data / "predict.jsonl")])
    assert code == 0
    rows = [json.loads(x) for x in (pred_dir / "predictions.jsonl").read_text().splitlines()]
    from transformers import pipeline

    export = Path(res["export"])
    template = json.loads((export / "config.json").read_text())["task_specific_params"]["summarization"]["prompt_template"]
    assert template == "{source} :"
    generate = pipeline("text-generation", model=str(export))
    assert generate.tokenizer.padding_side == "left"
    # the pipeline leaves out the tokenizer's BOS unless asked; training put it in front of the prompt
    outputs = generate([template.format(source=row["source"]) for row in rows], return_full_text=False,
                       add_special_tokens=True, batch_size=4)
    assert [o[0]["generated_text"].strip() for o in outputs] == [row["prediction"] for row in rows]
    assert any(row["prediction"] for row in rows)


def test_train_bert2bert_and_reload_the_export(tiny_bert_words: Path, copy_data: Path, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "b2b.yaml", tiny_bert_words, copy_data, max_epochs=6,
                           model={"architecture": "encoder_decoder", "learning_rate": 1e-3,
                                  "group_learning_rates": {"crossattention": 1e-2}, "generate_every_n_epochs": 6},
                           data_args={"max_train_samples": None})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                               "--checkpoint.monitor", "val/loss", "--checkpoint.mode", "min"])
    assert code == 0
    from experiments.source_reliance import source_reliance

    # the summaries copy the documents' first words: with the right documents the loss must be lower
    reliance = source_reliance(results(run_dir)["best_checkpoint"], str(copy_data / "validation.jsonl"), 40,
                               work_dir=str(tmp_path))
    assert reliance["examples"] == 40
    assert reliance["gap (nats per target token)"] > 0.05, reliance  # 0.14 measured; 0.000 if it ignores them
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(results(run_dir)["export"])
    assert type(model).__name__ == "EncoderDecoderModel"
    assert model.generation_config.decoder_start_token_id == model.config.decoder_start_token_id is not None


def test_train_bad_data_exits_with_one_line(tiny_t5: Path, copy_data: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text((copy_data / f"{split}.jsonl").read_text())
    with open(data / "train.jsonl", "a") as f:
        f.write(json.dumps({"document": "alpha", "summary": " "}) + "\n")
    exp = write_experiment(tmp_path / "bad.yaml", tiny_t5, data, data_args={"max_train_samples": None})
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == f"error: {data / 'train.jsonl'}:201: 'summary' must be a non-empty string (or list of strings), got ' '"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


def test_lora_on_an_encoder_decoder_and_a_decoder_only_model(tiny_t5: Path, tiny_llama: Path, copy_data: Path,
                                                             tmp_path: Path) -> None:
    for name, model in (("t5", tiny_t5), ("llama", tiny_llama)):
        exp = write_experiment(tmp_path / f"{name}.yaml", model, copy_data, max_epochs=1)
        fit_with_lora_and_test_again(exp, tmp_path / name, head=None, metric="test/rouge1")
