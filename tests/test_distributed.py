"""Distributed runs (DDP over gloo on 2 CPU processes) give exactly the single-process results.

Every task is validated, tested and used to predict from one checkpoint on 1 process and on 2, with
evaluation sets of odd size: metrics must agree to float rounding and the predictions file must be the
same, complete and in input order. DDP runs in fresh interpreters (in-process DDP leaks environment
variables): one launch of tests/distributed_driver.py covers every task.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from datamodules.base import EvalShardSampler
from tests.conftest import ROOT, SENTIMENT, build_tiny_bert, corpus_words, results, write_experiment
from tests.distributed_driver import evaluate, fit_checkpoint
from tests.qa_helpers import QA_VOCAB, make_squad
from tests.test_dialogue import TEMPLATE, make_conversations
from tests.test_multiple_choice import make_questions, write_jsonl
from tests.test_relation_extraction import make_relations, write_semeval
from tests.test_seq2seq import copy_data, tiny_t5  # noqa: F401 - fixtures
from tests.test_token_classification import make_sentences, vocabulary, write_conll

TASKS = ("text_classification", "prompt_classification", "token_classification", "question_answering", "seq2seq",
         "multiple_choice", "language_modeling", "dialogue", "relation_extraction")
EVAL = {"eval_batch_size": 4, "max_eval_samples": 15, "max_predict_samples": 11}  # odd sizes: 2 processes differ by one


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "LOCAL_RANK", "TUNEFORGE_RUN_DIR", "RANK",
                                                                     "WORLD_SIZE", "MASTER_", "NODE_RANK", "PL_"))}
    return {**env, **extra}


def specs(tmp: Path, tiny_bert: Path, tiny_llama: Path, tiny_t5: Path, copy_data: Path) -> list[dict[str, Any]]:  # noqa: F811
    cache = str(tmp / "cache")
    ner_bert = build_tiny_bert(tmp / "ner_bert", vocabulary())
    qa_bert = build_tiny_bert(tmp / "qa_bert", QA_VOCAB)
    # long sentences are windowed: 33 and 49 windows
    ner_dev = write_conll(tmp / "ner.dev", make_sentences(15, seed=11, long_every=5), sep="\t")
    ner_test = write_conll(tmp / "ner.test", make_sentences(15, seed=11, long_every=3))
    (tmp / "qa_train.json").write_text(json.dumps(make_squad(v2=True, n_paragraphs=3, seed=1)))
    (tmp / "qa_dev.json").write_text(json.dumps(make_squad(v2=True, n_paragraphs=3, seed=2, questions_per_paragraph=3,
                                                           min_words=60)))  # 9 questions in windows
    mc_words = [w for w in corpus_words() if w.isalpha() and w not in ("yes", "no")][:200]
    for split, n, seed in (("train", 64, 1), ("dev", 15, 2)):  # the dev questions have 2 to 5 choices
        write_jsonl(tmp / f"mc_{split}.jsonl", make_questions(n, seed, mc_words, variable=split == "dev"))
    mc_dev = str(tmp / "mc_dev.jsonl")
    re_train = write_semeval(tmp / "re_train.txt", make_relations(64, 1, mc_words))
    re_dev = str(write_semeval(tmp / "re_dev.txt", make_relations(15, 2, mc_words, long_every=4)))  # windowed ones too
    for split, n, seed in (("train", 48, 1), ("dev", 15, 2)):  # dev: some conversations end with a user turn
        conversations = make_conversations(n, seed, mc_words[:40], open_ended=split == "dev")
        write_jsonl(tmp / f"dialogue_{split}.jsonl", conversations)
    dialogue_dev = str(tmp / "dialogue_dev.jsonl")
    sentiment = {"train_file": str(SENTIMENT / "train.jsonl"), "validation_file": str(SENTIMENT / "validation.jsonl"),
                 "test_file": str(SENTIMENT / "test.jsonl"), "predict_file": str(SENTIMENT / "test.jsonl")}

    def section(kind: str, cls: str, **init_args: Any) -> dict[str, Any]:
        return {"class_path": f"{kind}.{cls}", "init_args": init_args}

    return [
        {"name": "text_classification",
         "model": section("lit_modules.text_classification", "TextClassificationModule",
                          model_name_or_path=str(tiny_bert), learning_rate=1e-3),
         "data": section("datamodules.text_classification", "TextClassificationDataModule", **sentiment,
                         max_seq_length=32, batch_size=32, cache_dir=cache, **EVAL)},
        {"name": "prompt_classification", "fit": False,  # zero-shot: the weights are the language model's own
         "model": section("lit_modules.prompt_classification", "PromptClassificationModule",
                          model_name_or_path=str(tiny_llama), verbalizer={"negative": " terrible", "positive": " great"}),
         "data": section("datamodules.prompt_classification", "PromptClassificationDataModule",
                         template="Review: {text}\nSentiment:", max_seq_length=48,
                         **{k: v for k, v in sentiment.items() if k != "train_file"}, cache_dir=cache, **EVAL)},
        {"name": "token_classification",
         "model": section("lit_modules.token_classification", "TokenClassificationModule",
                          model_name_or_path=str(ner_bert), learning_rate=3e-3),
         "data": section("datamodules.token_classification", "TokenClassificationDataModule",
                         train_file=str(write_conll(tmp / "ner.train", make_sentences(64, seed=10))),
                         validation_file=str(ner_dev), test_file=str(ner_test), predict_file=str(ner_test),
                         max_seq_length=24, doc_stride=6, batch_size=16, cache_dir=cache, **EVAL)},
        {"name": "question_answering",
         "model": section("lit_modules.question_answering", "QuestionAnsweringModule",
                          model_name_or_path=str(qa_bert), learning_rate=1e-3),
         "data": section("datamodules.question_answering", "QuestionAnsweringDataModule",
                         train_file=str(tmp / "qa_train.json"), validation_file=str(tmp / "qa_dev.json"),
                         test_file=str(tmp / "qa_dev.json"), predict_file=str(tmp / "qa_dev.json"),
                         max_seq_length=64, doc_stride=16, batch_size=16, cache_dir=cache, eval_batch_size=3)},
        {"name": "seq2seq",
         "model": section("lit_modules.seq2seq", "Seq2SeqModule", model_name_or_path=str(tiny_t5), learning_rate=1e-2,
                          max_new_tokens=6),
         "data": section("datamodules.seq2seq", "Seq2SeqDataModule",
                         **{f"{s}_file": str(copy_data / f"{s}.jsonl") for s in ("train", "validation", "test", "predict")},
                         batch_size=16, max_train_samples=64, cache_dir=cache, **EVAL)},
        {"name": "multiple_choice",
         "model": section("lit_modules.multiple_choice", "MultipleChoiceModule", model_name_or_path=str(tiny_bert),
                          learning_rate=3e-3),
         "data": section("datamodules.multiple_choice", "MultipleChoiceDataModule", train_file=str(tmp / "mc_train.jsonl"),
                         validation_file=mc_dev, test_file=mc_dev, predict_file=mc_dev, max_seq_length=32,
                         batch_size=16, cache_dir=cache, **EVAL)},
        {"name": "language_modeling",  # masked LM: evaluation masks fixed per block; 17 texts make 13 blocks
         "model": section("lit_modules.language_modeling", "LanguageModelingModule", model_name_or_path=str(tiny_bert),
                          learning_rate=1e-3),
         "data": section("datamodules.language_modeling", "LanguageModelingDataModule", **sentiment, max_seq_length=24,
                         batch_size=16, cache_dir=cache, **{**EVAL, "max_eval_samples": 17})},
        {"name": "dialogue",  # validation generates for its first 7 conversations, test for all
         "model": section("lit_modules.dialogue", "DialogueModule", model_name_or_path=str(tiny_llama),
                          chat_template=TEMPLATE, learning_rate=1e-2, max_new_tokens=6, generate_val_samples=7),
         "data": section("datamodules.dialogue", "DialogueDataModule", train_file=str(tmp / "dialogue_train.jsonl"),
                         validation_file=dialogue_dev, test_file=dialogue_dev, predict_file=dialogue_dev,
                         system_prompt="Repeat the cue word.", max_seq_length=160, batch_size=16, cache_dir=cache,
                         **EVAL)},
        {"name": "relation_extraction",
         "model": section("lit_modules.relation_extraction", "RelationExtractionModule",
                          model_name_or_path=str(tiny_bert), learning_rate=3e-3, answer_file=True),
         "data": section("datamodules.relation_extraction", "RelationExtractionDataModule", train_file=str(re_train),
                         validation_file=re_dev, test_file=re_dev, predict_file=re_dev, max_seq_length=32,
                         batch_size=16, cache_dir=cache, **EVAL)},
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, tiny_llama: Path, tiny_t5: Path,  # noqa: F811
         copy_data: Path) -> dict[str, Path]:  # noqa: F811
    """Checkpoints from a few training steps, then every task evaluated on 1 process and on 2."""
    tmp = tmp_path_factory.mktemp("distributed")
    all_specs = specs(tmp, tiny_bert, tiny_llama, tiny_t5, copy_data)
    for spec in all_specs:
        if spec.pop("fit", True):
            spec["ckpt"] = str(fit_checkpoint(spec, tmp / f"{spec['name']}.ckpt"))
    (tmp / "specs.json").write_text(json.dumps(all_specs))
    (tmp / "copy_data_predict.txt").write_text((copy_data / "predict.jsonl").read_text())
    evaluate(all_specs, tmp / "one", devices=1)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "distributed_driver.py"), str(tmp / "specs.json"),
                           str(tmp / "two"), "2"], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"one": tmp / "one", "two": tmp / "two", "tmp": tmp}


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal JSON values, floats to 1e-5 (scores from batches padded to other widths differ in the last bits)."""
    if isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, abs=1e-5), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("task", TASKS)
def test_two_processes_validate_test_and_predict_like_one(runs: dict[str, Path], task: str) -> None:
    one = json.loads((runs["one"] / f"{task}.json").read_text())
    two = json.loads((runs["two"] / f"{task}.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for stage in ("validate", "test"):
        assert two["sizes"][stage] % 2 == 1  # so Lightning's DistributedSampler would have repeated one
        assert one[stage].keys() == two[stage].keys() and len(one[stage]) >= 2, (stage, one[stage])
        for key, value in one[stage].items():  # the loss too: a repeated example would shift the mean
            got = two[stage][key]
            if key.endswith("perplexity"):  # exp of a loss: compared as exactly as the loss, on its log
                value, got = math.log(value), math.log(got)
            assert got == pytest.approx(value, abs=1e-6), (stage, key)
    rows_one = (runs["one"] / f"{task}-predictions.jsonl").read_text().splitlines()
    rows_two = (runs["two"] / f"{task}-predictions.jsonl").read_text().splitlines()
    assert rows_one, task
    assert_same([json.loads(r) for r in rows_one], [json.loads(r) for r in rows_two], task)


def test_predictions_cover_every_input_once_in_order(runs: dict[str, Path]) -> None:
    """The 2-process files hold each input once, in file order."""
    rows = [json.loads(r) for r in (runs["two"] / "text_classification-predictions.jsonl").read_text().splitlines()]
    inputs = [json.loads(r) for r in (SENTIMENT / "test.jsonl").read_text().splitlines()][:11]
    assert [r["text"] for r in rows] == [r["text"] for r in inputs]
    qa = [json.loads(r) for r in (runs["two"] / "question_answering-predictions.jsonl").read_text().splitlines()]
    dev = json.loads((runs["tmp"] / "qa_dev.json").read_text())
    assert [r["id"] for r in qa] == [q["id"] for a in dev["data"] for p in a["paragraphs"] for q in p["qas"]]
    s2s = [json.loads(r) for r in (runs["two"] / "seq2seq-predictions.jsonl").read_text().splitlines()]
    documents = [json.loads(r)["document"] for r in (runs["tmp"] / "copy_data_predict.txt").read_text().splitlines()]
    assert [r["source"] for r in s2s] == documents


def test_eval_shards_partition_the_order_without_repeats() -> None:
    order = [7, 3, 9, 0, 4, 1, 8, 2, 6, 5, 10]
    shards = [list(EvalShardSampler(order, 3, rank)) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 4, 3]
    assert sorted(i for s in shards for i in s) == sorted(order)
    assert shards[0] == [7, 0, 8, 5]  # strided: every process gets long and short examples, longest first
    assert [len(EvalShardSampler(order, 3, rank)) for rank in range(3)] == [4, 4, 3]


# ---- train.py on two simulated nodes: one W&B run, data tokenised once per job ------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(args: list[str], tmp: Path, caches: tuple[Path, Path]) -> list[subprocess.CompletedProcess]:
    """train.py as two one-process nodes of one job (NODE_RANK 0 and 1), as SLURM or torchrun start them,
    sharing the run directory as a SLURM job's tasks do; each node gets its own cache directory setting."""
    procs, port = [], free_port()
    for node, cache in enumerate(caches):
        env = clean_env(WANDB_MODE="offline", HOME=str(tmp / "home"), TUNEFORGE_CACHE=str(cache), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), NODE_RANK=str(node), LOCAL_RANK="0", TUNEFORGE_RUN_DIR=str(tmp / "job"))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--trainer.accelerator", "cpu",
                                       "--trainer.strategy", "ddp", "--trainer.devices", "1", "--trainer.num_nodes", "2"],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for p in done:
        assert p.returncode == 0, p.stderr[-3000:]
    return done


def tokenised(proc: subprocess.CompletedProcess, split: str) -> int:
    """How often this process tokenised ``split`` (the "Tokenised N <split> examples" line, said by every process
    that tokenises)."""
    return len(re.findall(rf"Tokenised \d+ {split} examples", proc.stderr))


def test_two_nodes_tokenise_once_and_log_one_wandb_run(tiny_bert: Path, tmp_path: Path) -> None:
    from experiments.wandb_offline import read_run

    exp = write_experiment(tmp_path / "wb.yaml", tiny_bert, logger="wandb", data={"max_train_samples": 64, **EVAL},
                           extra={"checkpoint": {"monitor": "val/accuracy", "mode": "max"}})
    cache = tmp_path / "cache"
    node0, node1 = launch_two_nodes(["fit", "--config", str(exp), "--output_dir", str(tmp_path / "runs"),
                                     "--export", "false"], tmp_path, (cache, cache))
    # global rank 0 tokenised every split into the shared cache; the other node only loaded it
    assert [tokenised(node0, s) for s in ("train", "validation", "test")] == [1, 1, 1]
    assert [tokenised(node1, s) for s in ("train", "validation", "test")] == [0, 0, 0]
    assert len(list((cache / "text_classification").glob("*.arrow"))) == 3
    runs = list((tmp_path / "job" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and not (tmp_path / "runs").exists()  # one W&B run for the job, one run directory
    history = read_run(runs[0])["history"]
    assert any("val/accuracy" in row for row in history) and any("test/accuracy" in row for row in history)
    assert results(tmp_path / "job")["wandb_run"] == str(runs[0])


def test_a_node_without_the_shared_cache_tokenises_its_own(tiny_bert: Path, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "local.yaml", tiny_bert, data=EVAL)
    node0, node1 = launch_two_nodes(["validate", "--config", str(exp), "--output_dir", str(tmp_path / "runs")], tmp_path,
                                    (tmp_path / "cache0", tmp_path / "cache1"))
    assert tokenised(node0, "validation") == 1 and tokenised(node1, "validation") == 1
    assert "node 1 does not see the tokenised cache" in node1.stderr
    assert len(list((tmp_path / "cache1" / "text_classification").glob("validation-*.arrow"))) == 1
    assert "val/accuracy" in results(tmp_path / "job")["validate"]


def test_fewer_examples_than_processes_is_a_data_error(tiny_bert: Path, tmp_path: Path) -> None:
    """A process without an evaluation batch would skip the epoch end where the others wait for its metrics."""
    from lightning.pytorch import Trainer

    from datamodules.readers import DataError
    from datamodules.text_classification import TextClassificationDataModule
    from transformers import AutoTokenizer

    dm = TextClassificationDataModule(train_file=str(SENTIMENT / "train.jsonl"), max_train_samples=8,  # the labels
                                      validation_file=str(SENTIMENT / "validation.jsonl"), max_eval_samples=1,
                                      cache_dir=str(tmp_path / "cache"))
    dm.connect(AutoTokenizer.from_pretrained(tiny_bert))
    dm.setup("validate")
    dm.trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # built, never launched
    with pytest.raises(DataError, match=r"validation.jsonl: 1 example\(s\) cannot be shared by 2 processes"):
        dm.val_dataloader()


# ---- launch material ---------------------------------------------------------------------------------

def test_slurm_script_command_parses(tmp_path: Path) -> None:
    """Run configs/launch/slurm.sbatch as SLURM would (its variables set) with an `srun` that adds
    --print_config: the training command and the presets it composes parse, with the allocation's counts."""
    sbatch = (ROOT / "configs" / "launch" / "slurm.sbatch").read_text()
    for option in ("--signal=SIGUSR1@90", "--requeue", "--ntasks-per-node=8", "--gpus-per-node=8"):
        assert f"#SBATCH {option}\n" in sbatch
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@" --print_config\n')
    (bin_dir / "srun").chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", SLURM_JOB_NUM_NODES="4",
                    SLURM_NTASKS_PER_NODE="8", SLURM_JOB_ID="123", TUNEFORGE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(["bash", str(ROOT / "configs" / "launch" / "slurm.sbatch"), "--run_name", "slurm-check"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load(proc.stdout)
    assert config["trainer"]["num_nodes"] == 4 and str(config["trainer"]["devices"]) == "8"  # Lightning parses "8"
    assert (config["trainer"]["strategy"], config["trainer"]["accelerator"]) == ("ddp", "gpu")
    assert config["run_name"] == "slurm-check"
    assert config["data"]["init_args"]["train_file"] == "experiments/data/sentiment/train.jsonl"


# ---- export after sharded training -------------------------------------------------------------------

@pytest.mark.parametrize("peft", [None, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": None}])
def test_export_writes_the_gathered_weights_not_the_shards(tiny_bert: Path, tmp_path: Path, peft: Any) -> None:
    """After FSDP / DeepSpeed ZeRO-3 rank 0's ``self.model`` holds only pieces; train.py passes the gathered
    weights (lit_modules.distributed.full_state_dict) and the export must be built from those alone."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification

    from lit_modules.text_classification import TextClassificationModule

    module = TextClassificationModule(model_name_or_path=str(tiny_bert), labels=["negative", "positive"], peft=peft,
                                      export_merged=peft is not None)
    module.configure_model()
    torch.manual_seed(1)
    with torch.no_grad():  # "trained": every weight moved away from the pretrained one
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    reference = copy.deepcopy(module.model).merge_and_unload() if peft else copy.deepcopy(module.model)
    with torch.no_grad():  # what a rank holds of a sharded model is not the model
        for p in module.model.parameters():
            p.zero_()
    out = module.export(tmp_path / "export", state_dict=state)
    assert all(not p.any() for p in module.model.parameters())  # the sharded module itself is left alone
    plain = AutoModelForSequenceClassification.from_pretrained(f"{out}-merged" if peft else out)
    expected = reference.state_dict()
    got = plain.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert plain.config.id2label == {0: "negative", 1: "positive"}
