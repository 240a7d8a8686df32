"""python -m experiments.compress / compress_benchmark and lit_modules.distillation on tiny models: int8 and ONNX
variants predict as fp32 does, a bad ONNX graph is refused, head pruning removes what it says and equals
masking those heads, every folder reloads, the benchmark prints every row; the distillation loss by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from experiments import compress, compress_benchmark
from experiments.explain import LoadedModel
from lit_modules.distillation import distillation_loss
from tests.conftest import build_tiny_bert

WORDS = ["the", "a", "film", "movie", "was", "good", "bad", "great", "awful", "plot", "actor", "very", "not", "fun",
         "john", "smith", "lives", "in", "paris", "berlin", "who", "where"]
TEXTS = [("the film was good", "positive"), ("a very bad movie", "negative"), ("great", "positive"),
         ("the plot was not fun and the actor was awful", "negative"), ("good actor , great plot", "positive"),
         ("awful", "negative"), ("the movie was very very good fun", "positive"), ("not good", "negative")]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT classifier export whose head is scaled up, so that classes are far apart."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tmp = tmp_path_factory.mktemp("compress_cls")
    base = build_tiny_bert(tmp / "base", WORDS)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, id2label={0: "negative", 1: "positive"})
    with torch.no_grad():
        model.classifier.weight.mul_(40)
    model.save_pretrained(tmp / "export")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp / "export")
    return tmp / "export"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _jsonl(tmp_path_factory.mktemp("data") / "dev.jsonl", [{"text": t, "label": y} for t, y in TEXTS * 2])


@pytest.fixture(scope="module")
def variants(classifier: Path, labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("variants")
    assert compress.main(["--model", str(classifier), "--output", str(out), "--int8", "--onnx", "--onnx_int8",
                          "--verify_data", str(labelled)]) == 0
    return {name: out / name for name in ("int8", "onnx", "onnx_int8")}


def _outputs(runner: Any, loaded: LoadedModel, texts: list[str]) -> list[np.ndarray]:
    examples = [{"text": t, "text_pair": None, "line": k, "gold": None} for k, t in enumerate(texts)]
    return [runner(b)[0] for b in compress.tokenized_batches(loaded, examples, 4)]


def test_int8_and_onnx_predict_as_fp32(classifier: Path, variants: dict[str, Path]) -> None:
    loaded = compress.load_fp32(classifier)
    texts = [t for t, _ in TEXTS] + ["paris", "who lives in berlin"]
    reference = _outputs(compress.TorchRunner(loaded.model, "classification"), loaded, texts)
    for name, folder in variants.items():
        runner, info = compress.load_variant(folder)
        assert info["variant"] == name and info["task"] == "classification"
        got = _outputs(runner, loaded, texts)
        for r, g in zip(reference, got):
            assert (r.argmax(-1) == g.argmax(-1)).all(), name
            if name == "onnx":
                assert np.allclose(g, r, atol=compress.ONNX_ATOL, rtol=compress.ONNX_RTOL)
            else:
                assert np.abs(g - r).max() < 0.2  # quantised, so close but not equal
                assert np.abs(g - r).max() > 0
        assert info["check_against_fp32"]["prediction_agreement"] == 1.0
    onnx_info = json.loads((variants["onnx"] / "compression.json").read_text())
    assert onnx_info["check_against_fp32"]["within_tolerance"] and onnx_info["check_against_fp32"]["batches"] >= 3
    # the int8 weights are int8 and reload with weights_only
    state = torch.load(variants["int8"] / "int8_state_dict.pt", weights_only=True)
    packed = [v for k, v in state.items() if k.endswith("_packed_params._packed_params")]
    assert packed and packed[0][0].dtype == torch.qint8
    assert compress.weights_size(variants["onnx_int8"]) < compress.weights_size(variants["onnx"])
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(variants["int8"]).id2label == {0: "negative", 1: "positive"}


class _CallCounting(torch.nn.Module):
    """A model whose output depends on Python state (how often it ran): an exporter can only freeze that."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config, self.calls = model, model.config, 0

    def forward(self, **inputs: torch.Tensor) -> Any:
        self.calls += 1
        out = self.model(**inputs)
        out.logits = out.logits + self.calls
        return out


def test_onnx_that_differs_from_pytorch_is_refused(classifier: Path, tmp_path: Path) -> None:
    loaded = compress.load_fp32(classifier)
    loaded.model = _CallCounting(loaded.model).eval()
    batches = compress.verification_batches(loaded, None)
    with pytest.raises(compress.VerificationError, match="differs from PyTorch"):
        compress.write_onnx(loaded, tmp_path / "onnx", batches)
    assert not (tmp_path / "onnx").exists() and not list(tmp_path.glob(".onnx-*"))  # nothing half-written


def _gated(model: torch.nn.Module, drop: dict[int, list[int]]) -> list[Any]:
    """Zero the given heads' outputs with hooks on the attention output projections (what a head mask does)."""
    handles = []
    for layer, block in enumerate(compress.attention_blocks(model)):
        size = block.self.attention_head_size
        gate = torch.ones(block.self.query.out_features)
        for h in drop.get(layer, []):
            gate[h * size:(h + 1) * size] = 0
        handles.append(block.output.dense.register_forward_pre_hook(lambda m, a, g=gate: (a[0] * g,)))
    return handles


def test_pruning_removes_the_least_important_heads(classifier: Path, labelled: Path, tmp_path: Path) -> None:
    loaded = compress.load_fp32(classifier)
    with torch.no_grad():  # layer 0, head 1 writes nothing: its importance is 0, so it goes first
        v = compress.attention_blocks(loaded.model)[0].self.value
        size = compress.attention_blocks(loaded.model)[0].self.attention_head_size
        v.weight[size: 2 * size] = 0
        v.bias[size: 2 * size] = 0
    folder = compress.write_pruned(loaded, tmp_path / "pruned", 1, str(labelled))
    info = json.loads((folder / "compression.json").read_text())
    assert info["pruned_heads"] == {"0": [1]} and info["heads_per_layer"] == [1, 2] and info["heads_removed"] == 1
    assert info["head_importance"][0][1] == 0.0
    runner, _ = compress.load_variant(folder)
    texts = [t for t, _ in TEXTS]
    np.testing.assert_allclose(_outputs(runner, loaded, texts)[0],
                               _outputs(compress.TorchRunner(loaded.model, "classification"), loaded, texts)[0],
                               atol=1e-5)  # that head contributed nothing, so nothing changes


def test_pruned_model_equals_the_masked_model_and_reloads(classifier: Path, labelled: Path, tmp_path: Path) -> None:
    loaded = compress.load_fp32(classifier)
    texts = [t for t, _ in TEXTS]
    for n in (1, 2):
        folder = compress.write_pruned(loaded, tmp_path / f"pruned{n}", n, str(labelled))
        info = json.loads((folder / "compression.json").read_text())
        drop = {int(k): v for k, v in info["pruned_heads"].items()}
        assert sum(len(v) for v in drop.values()) == n == info["heads_removed"]
        assert sum(info["heads_per_layer"]) == 4 - n and min(info["heads_per_layer"]) >= 1
        runner, _ = compress.load_variant(folder)
        model = runner.model
        assert compress.heads_per_layer(model) == info["heads_per_layer"]
        assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in loaded.model.parameters())
        handles = _gated(loaded.model, drop)
        try:
            masked = _outputs(compress.TorchRunner(loaded.model, "classification"), loaded, texts)
        finally:
            for h in handles:
                h.remove()
        for got, want in zip(_outputs(runner, loaded, texts), masked):
            np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(compress.ConfigError, match="--prune_heads: expected 1 to 2"):
        compress.write_pruned(loaded, tmp_path / "too_many", 3, str(labelled))


def test_pruning_with_recovery_trains_and_reloads(classifier: Path, labelled: Path, tmp_path: Path) -> None:
    loaded = compress.load_fp32(classifier)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    folder = compress.write_pruned(loaded, tmp_path / "pruned", 2, str(labelled), recover_steps=6,
                                   recover_lr=1e-3, batch_size=4)
    info = json.loads((folder / "compression.json").read_text())
    assert info["recovery"]["steps"] == 6
    runner, _ = compress.load_variant(folder)
    state = runner.model.state_dict()
    assert not torch.equal(state["classifier.weight"], before["classifier.weight"])  # the fine-tune changed it
    assert all(torch.equal(v, before[k]) for k, v in loaded.model.state_dict().items())  # the source is untouched
    assert np.isfinite(_outputs(runner, loaded, ["good film"])[0]).all()
    again = compress.write_pruned(loaded, tmp_path / "again", 2, str(labelled), recover_steps=6, recover_lr=1e-3,
                                  batch_size=4)
    same = compress.load_variant(again)[0].model.state_dict()
    assert all(torch.equal(v, same[k]) for k, v in state.items())  # seeded: the same fine-tune twice


def test_ner_and_peft_exports_compress(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    base = build_tiny_bert(tmp_path / "base", WORDS)
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    ner = AutoModelForTokenClassification.from_pretrained(base, id2label=dict(enumerate(tags)))
    with torch.no_grad():
        ner.classifier.weight.mul_(40)
    ner.save_pretrained(tmp_path / "ner")
    tokenizer.save_pretrained(tmp_path / "ner")
    data = _jsonl(tmp_path / "ner.jsonl", [{"tokens": ["john", "smith", "lives", "in", "paris"],
                                            "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]},
                                           {"tokens": ["berlin"], "tags": ["B-LOC"]}] * 3)
    assert compress.main(["--model", str(tmp_path / "ner"), "--output", str(tmp_path / "ner_out"), "--int8", "--onnx",
                          "--prune_heads", "1", "--prune_data", str(data)]) == 0
    for name in ("int8", "onnx", "pruned"):
        runner, info = compress.load_variant(tmp_path / "ner_out" / name)
        assert info["task"] == "ner"
        if name == "onnx":
            assert info["check_against_fp32"]["prediction_agreement"] == 1.0
        elif name == "int8":  # per-token argmax of a random 32-wide tagger: a few near-ties flip under int8
            assert info["check_against_fp32"]["prediction_agreement"] >= 0.9
        enc = tokenizer([["john", "lives", "in", "berlin"]], is_split_into_words=True, return_tensors="np")
        (logits,) = runner({k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
        assert logits.shape == (1, enc["input_ids"].shape[1], len(tags))

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    adapter = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=2,
                                               init_lora_weights=False)).eval()
    adapter.save_pretrained(tmp_path / "lora")
    tokenizer.save_pretrained(tmp_path / "lora")
    assert compress.main(["--model", str(tmp_path / "lora"), "--output", str(tmp_path / "lora_out"), "--onnx"]) == 0
    runner, _ = compress.load_variant(tmp_path / "lora_out" / "onnx")
    batch = tokenizer(["the film was good", "awful"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = adapter(**batch).logits.numpy()  # the adapter's own output, LoRA included
    np.testing.assert_allclose(runner({k: v.numpy() for k, v in batch.items()})[0], expected, atol=1e-4)


def test_benchmark_prints_every_row(classifier: Path, labelled: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "bench.json"
    code = compress_benchmark.main([
        "--model", str(classifier), "--data", str(labelled), "--prune_heads", "1", "--prune_data", str(labelled),
        "--recover_steps", "2", "--distilled", str(classifier), "--latency_samples", "3", "--repeats", "2",
        "--batch_size", "4", "--threads", "1", "--variants_dir", str(tmp_path / "v"), "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    names = [r["variant"] for r in result["rows"]]
    assert names == ["fp32", "int8", "onnx", "onnx_int8", "pruned", "distilled"]
    for r in result["rows"]:
        assert f"| {r['variant']} | {r['accuracy']:.4f} |" in printed
        assert 0 <= r["accuracy"] <= 1 and r["size_mib"] > 0 and r["throughput_per_s"] > 0
        assert r["latency_ms_median"] > 0 and len(r["throughput_rounds"]) == 2
    rows = {r["variant"]: r for r in result["rows"]}
    loaded = compress.load_fp32(classifier)  # accuracy is the fp32 model's own, against the file's gold labels
    logits = np.concatenate(_outputs(compress.TorchRunner(loaded.model, "classification"), loaded,
                                     [t for t, _ in TEXTS * 2]))
    gold = np.array([{"negative": 0, "positive": 1}[y] for _, y in TEXTS * 2])
    assert result["examples"] == len(gold) and rows["fp32"]["accuracy"] == pytest.approx((logits.argmax(-1) == gold).mean())
    assert rows["onnx"]["agreement_with_fp32"] == 1.0 and rows["distilled"]["accuracy"] == rows["fp32"]["accuracy"]
    assert rows["int8"]["size_mib"] < rows["fp32"]["size_mib"]
    assert "goal (>= 1.5x, >= -1 point)" in printed
    assert compress_benchmark.main(["--model", str(classifier), "--data", str(tmp_path / "none.tsv")]) == 2


def test_distillation_loss_by_hand() -> None:
    s, t, T, alpha = [1.0, 2.0, 0.0], [0.5, 1.5, -1.0], 2.0, 0.3

    def softmax(x: list[float], temp: float = 1.0) -> list[float]:
        e = [math.exp(v / temp) for v in x]
        return [v / sum(e) for v in e]

    p_t, p_s = softmax(t, T), softmax(s, T)  # float64 tensors below: the comparison is to ~1e-12
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s))
    ce = -math.log(softmax(s)[1])
    expected = alpha * T * T * kl + (1 - alpha) * ce
    got = distillation_loss(torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), torch.tensor([1]), temperature=T, alpha=alpha)
    assert float(got) == pytest.approx(expected, rel=1e-10)
    # the ends: pure cross-entropy, pure distillation without labels
    assert float(distillation_loss(torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), torch.tensor([1]), T, 0.0)) == \
        pytest.approx(ce, rel=1e-10)
    assert float(distillation_loss(torch.tensor([s], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), None, T, 1.0)) == \
        pytest.approx(T * T * kl, rel=1e-10)
    # identical logits: no soft loss at any temperature
    assert float(distillation_loss(torch.tensor([t], dtype=torch.float64), torch.tensor([t], dtype=torch.float64), None, 5.0, 1.0)) == pytest.approx(0, abs=1e-7)


def test_distillation_loss_tokens_ignore_index_and_gradients() -> None:
    torch.manual_seed(0)
    student = torch.randn(2, 4, 3, requires_grad=True)
    teacher = torch.randn(2, 4, 3, requires_grad=True)
    labels = torch.tensor([[0, 2, -100, 1], [-100, -100, 1, 0]])
    loss = distillation_loss(student, teacher, labels, temperature=3.0, alpha=0.6)
    keep = labels != -100
    one_by_one = [distillation_loss(student[keep][i:i + 1], teacher[keep][i:i + 1], labels[keep][i:i + 1], 3.0, 0.6)
                  for i in range(int(keep.sum()))]
    assert float(loss) == pytest.approx(float(torch.stack(one_by_one).mean()), rel=1e-6)  # a mean over real tokens
    loss.backward()
    assert teacher.grad is None  # the teacher is a constant
    assert student.grad[~keep].abs().sum() == 0 and student.grad[keep].abs().sum() > 0
    for bad in ({"temperature": 0.0}, {"alpha": 1.5}):
        with pytest.raises(ValueError):
            distillation_loss(student, teacher, labels, **{"temperature": 2.0, "alpha": 0.5, **bad})
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(student, teacher, None, 2.0, 0.5)


def test_compress_user_errors_are_one_line(classifier: Path, labelled: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    unlabelled = _jsonl(tmp_path / "unlabelled.jsonl", [{"text": "good"}, {"text": "bad film"}])
    cases = [
        (["--model", str(tmp_path / "nope"), "--int8"], "--model: folder"),
        (["--model", str(classifier), "--prune_heads", "1"], "--prune_heads: needs --prune_data"),
        (["--model", str(classifier), "--prune_heads", "1", "--prune_data", str(unlabelled)], "has no labels"),
        (["--model", str(classifier), "--prune_heads", "9", "--prune_data", str(labelled)], "--prune_heads: expected"),
        (["--model", str(classifier), "--task", "qa", "--int8"], "--task: qa, but"),
    ]
    for args, message in cases:
        assert compress.main([*args, "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "pruned").exists()
