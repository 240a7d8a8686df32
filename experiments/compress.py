"""Make a trained model smaller and faster for CPU inference: int8, ONNX, ONNX + int8, pruned attention heads.

    python -m experiments.compress --model runs/sst2/<time>/export --output runs/sst2/<time>-compressed \
        [--int8] [--onnx] [--onnx_int8] [--prune_heads N --prune_data dev.tsv [--recover_steps S]] \
        [--verify_data FILE]

Each variant is a folder under ``--output`` holding the weights, the export's ``config.json`` (label names) and
tokenizer, and ``compression.json`` (what was done, how it was checked, how to load it). Any folder loads with
``experiments.compress.load_variant(folder)``, which returns a runner: ``runner(inputs) -> outputs`` on numpy
arrays, the same call for every variant.

- ``int8``: dynamic int8 quantisation of every ``nn.Linear`` with ``torch.ao.quantization.quantize_dynamic``
  (weights int8 per tensor, activations quantised per batch at run time; embeddings and LayerNorms stay fp32).
  It still works in torch 2.13 but is deprecated (torchao's ``quantize_`` is the successor, not a dependency
  here). The quantised modules have no ``save_pretrained``: the folder holds ``int8_state_dict.pt``, which
  ``load_variant`` loads (``weights_only=True``) into the fp32 architecture quantised the same way.
- ``onnx``: ``torch.onnx.export`` (the torch.export-based exporter, opset 18, dynamic batch and sequence axes).
  The graph is run with ONNX Runtime on real inputs (``--verify_data``, else built-in sentences; padded batches
  and single examples) and must match PyTorch within |onnx - torch| <= 1e-4 + 1e-3 * |torch| on every output,
  or the command fails and writes nothing.
- ``onnx_int8``: ONNX Runtime's ``quantize_dynamic`` (int8 weights) on the verified ONNX graph.
- ``pruned``: ``--prune_heads N`` attention heads removed (query / key / value rows and output-projection
  columns sliced away: a smaller model, not a masked one). Heads are ranked by the gradient-based importance of
  Michel et al. (2019) on the labelled ``--prune_data``: |d loss / d gate| of a gate on each head's output,
  summed over batches and normalised per layer; transformers 5 has neither ``head_mask`` nor ``prune_heads``
  any more, so the gate is a pre-hook on the attention output projection (a head's gate scales its context
  vector, exactly what a head mask on its attention probabilities does) and the slicing is done here. At least
  one head stays in every layer. ``--recover_steps S`` fine-tunes the pruned model for S batches on
  ``--recover_data`` (default: ``--prune_data``; use training data to keep the evaluation file held out).
  BERT-layout encoders only (BERT, MiniLM, RoBERTa, ELECTRA, ...).

PEFT adapter exports are merged into a plain model first (prompt-learning adapters cannot be).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.explain import LoadedModel, encode, load_export, quiet_transformers, read_examples
from lit_modules.errors import ConfigError, DataError, first_line

VARIANTS = ("int8", "onnx", "onnx_int8", "pruned")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx", ".data")
ONNX_ATOL, ONNX_RTOL = 1e-4, 1e-3
OUTPUTS = {"classification": ["logits"], "ner": ["logits"], "qa": ["start_logits", "end_logits"]}
SAMPLE = {  # verification inputs when no --verify_data is given: different lengths, so batches carry padding
    "classification": ["a wonderful, moving film", "the plot never comes together and the jokes fall flat", "ok", "I expected more from this director",
                       "an utterly charming story told with great care and a fine cast"],
    "ner": [["John", "Smith", "lives", "in", "Paris"], ["Apple", "opened", "a", "store", "in", "Berlin", "today"],
            ["Hi"], ["The", "United", "Nations", "met", "in", "New", "York", "on", "Monday"]],
    "qa": [("Where does John live?", "John Smith lives in Paris, where he works as an engineer."),
           ("When did the meeting happen?", "The United Nations met in New York on Monday to discuss the budget."),
           ("Who?", "Nobody knows.")],
}


class VerificationError(RuntimeError):
    """An exported graph does not reproduce the PyTorch outputs within the stated tolerance."""


# ---- inputs --------------------------------------------------------------------------------------

def input_names(loaded: LoadedModel) -> list[str]:
    """The model inputs the tokenizer produces, in the order the ONNX graph takes them."""
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in getattr(loaded.tokenizer, "model_input_names", []):
        names.append("token_type_ids")
    return names


def sample_examples(task: str) -> list[dict[str, Any]]:
    """Built-in examples in the canonical record layout of ``task``."""
    if task == "classification":
        return [{"text": t, "text_pair": None, "line": k + 1, "gold": None} for k, t in enumerate(SAMPLE[task])]
    if task == "ner":
        return [{"words": w, "line": k + 1, "gold": None} for k, w in enumerate(SAMPLE[task])]
    return [{"id": str(k), "question": q, "context": c, "line": k + 1, "gold": None}
            for k, (q, c) in enumerate(SAMPLE[task])]


def tokenized_batches(loaded: LoadedModel, examples: list[dict[str, Any]], batch_size: int,
                      max_seq_length: int = 128) -> list[dict[str, np.ndarray]]:
    """Model inputs as int64 numpy arrays, ``batch_size`` examples per batch padded to its longest."""
    names = input_names(loaded)
    out = []
    for lo in range(0, len(examples), batch_size):
        enc = encode(loaded.task, examples[lo: lo + batch_size], loaded.tokenizer, max_seq_length)
        out.append({n: enc[n].numpy().astype(np.int64) for n in names})
    return out


def verification_batches(loaded: LoadedModel, path: str | None, n: int = 32) -> list[dict[str, np.ndarray]]:
    """Padded batches of 8 and single examples from ``path`` (first ``n`` examples) or the built-in sentences."""
    examples = read_examples(path, loaded.task, loaded.tokenizer)[:n] if path else sample_examples(loaded.task)
    return tokenized_batches(loaded, examples, 8) + tokenized_batches(loaded, examples[:3], 1)


# ---- runners: one call for every variant ---------------------------------------------------------

class TorchRunner:
    """A PyTorch model behind ``runner(inputs) -> [outputs]`` (numpy in, numpy out)."""

    def __init__(self, model: torch.nn.Module, task: str) -> None:
        self.model = model.eval()
        self.task = task

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = self.model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        return [getattr(out, name).float().numpy() for name in OUTPUTS[self.task]]


class OrtRunner:
    """An ONNX Runtime session behind the same call as :class:`TorchRunner`."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle ONNX Runtime threads otherwise spin for a while after each run and starve PyTorch (or another
        # session) running next on the same cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {k: inputs[k] for k in self.inputs})


def compare(reference: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
            candidate: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
            batches: list[dict[str, np.ndarray]], task: str) -> dict[str, Any]:
    """Largest absolute output difference, largest excess over the ONNX tolerance, and how often the two agree on
    the prediction (argmax of the last axis at real tokens)."""
    max_diff, worst, agree, total = 0.0, -np.inf, 0, 0
    for batch in batches:
        ref, got = reference(batch), candidate(batch)
        real = batch["attention_mask"].astype(bool)
        for r, g in zip(ref, got):
            diff = np.abs(r - g)
            max_diff = max(max_diff, float(diff.max()))
            worst = max(worst, float((diff - (ONNX_ATOL + ONNX_RTOL * np.abs(r))).max()))
            if task == "classification":
                agree += int((r.argmax(-1) == g.argmax(-1)).sum())
                total += r.shape[0]
            elif task == "ner":
                agree += int(((r.argmax(-1) == g.argmax(-1)) & real).sum())
                total += int(real.sum())
            else:
                masked_r, masked_g = np.where(real, r, -np.inf), np.where(real, g, -np.inf)
                agree += int((masked_r.argmax(-1) == masked_g.argmax(-1)).sum())
                total += r.shape[0]
    return {"max_abs_diff": max_diff, "within_tolerance": bool(worst <= 0), "prediction_agreement": agree / total,
            "compared": total, "batches": len(batches)}


# ---- loading -------------------------------------------------------------------------------------

def load_fp32(folder: str | Path, task: str | None = None) -> LoadedModel:
    """The export as a plain fp32 model (PEFT adapters merged), with SDPA attention as for serving."""
    loaded = load_export(folder, task, attn_implementation="sdpa")
    if loaded.peft:
        if loaded.prompt_learning:
            raise ConfigError(f"--model: '{folder}' is a prompt-learning adapter (virtual tokens); it cannot be "
                              "merged into a plain model to compress")
        loaded.model = loaded.model.merge_and_unload().eval()
        loaded.peft = False
    loaded.model.requires_grad_(False)
    return loaded


def _auto_class(task: str) -> Any:
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    return {"classification": AutoModelForSequenceClassification, "ner": AutoModelForTokenClassification,
            "qa": AutoModelForQuestionAnswering}[task]


def _skeleton(folder: Path, task: str) -> torch.nn.Module:
    """The fp32 architecture of a variant folder from its config.json, randomly initialised (weights follow)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, attn_implementation="sdpa")
    return _auto_class(task).from_config(config).eval()


def load_variant(folder: str | Path, threads: int | None = None) -> tuple[Any, dict[str, Any]]:
    """A runner for any folder ``compress`` wrote (or a plain export), and its ``compression.json``."""
    from transformers import AutoTokenizer

    path = Path(folder)
    info_path = path / "compression.json"
    if not info_path.is_file():  # a plain export: fp32
        loaded = load_fp32(path)
        return TorchRunner(loaded.model, loaded.task), {"variant": "fp32", "task": loaded.task}
    info = json.loads(info_path.read_text(encoding="utf-8"))
    kind, task = info["variant"], info["task"]
    if kind in ("onnx", "onnx_int8"):
        return OrtRunner(path / "model.onnx", threads), info
    model = _skeleton(path, task)
    if kind == "fp32":
        from safetensors.torch import load_model

        load_model(model, str(path / "model.safetensors"))
    elif kind == "int8":
        model = quantize_int8(model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")  # torch's own packed params
            model.load_state_dict(torch.load(path / "int8_state_dict.pt", map_location="cpu", weights_only=True))
    elif kind == "pruned":
        from safetensors.torch import load_model

        prune_heads(model, {int(k): v for k, v in info["pruned_heads"].items()})
        load_model(model, str(path / "pruned_model.safetensors"))
    else:
        raise ConfigError(f"{info_path}: unknown variant {kind!r}")
    AutoTokenizer.from_pretrained(path)  # the folder is complete: fail here, not at serving time
    return TorchRunner(model, task), info


def weights_size(folder: str | Path) -> int:
    """Bytes of the weight files in a variant folder (tokenizer and json files left out)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


# ---- writing variants ----------------------------------------------------------------------------

def _write_folder(out: Path, loaded: LoadedModel, info: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """Write a variant into a temporary folder and rename it into place: a failed step leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        write(tmp)
        loaded.model.config.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "compression.json").write_text(json.dumps({**info, "task": loaded.task}, indent=2) + "\n",
                                              encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_fp32(loaded: LoadedModel, out: Path) -> Path:
    """The uncompressed reference, saved the same way (merged when the export was an adapter)."""
    from safetensors.torch import save_model

    return _write_folder(out, loaded, {"variant": "fp32", "reload": "experiments.compress.load_variant(folder)"},
                         lambda tmp: save_model(loaded.model, str(tmp / "model.safetensors")))


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every nn.Linear dynamically quantised to int8 (torch.ao, still working in 2.13)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def write_int8(loaded: LoadedModel, out: Path, batches: list[dict[str, np.ndarray]]) -> Path:
    """Dynamic int8 variant; its agreement with fp32 on ``batches`` goes into compression.json."""
    quantized = quantize_int8(loaded.model)
    check = compare(TorchRunner(loaded.model, loaded.task), TorchRunner(quantized, loaded.task), batches, loaded.task)
    info = {"variant": "int8", "method": "torch.ao.quantization.quantize_dynamic(nn.Linear, qint8)",
            "engine": torch.backends.quantized.engine, "check_against_fp32": check,
            "reload": "experiments.compress.load_variant(folder): fp32 architecture from config.json, quantize_dynamic, "
                      "load_state_dict(torch.load('int8_state_dict.pt', weights_only=True))"}
    return _write_folder(out, loaded, info, lambda tmp: torch.save(quantized.state_dict(), tmp / "int8_state_dict.pt"))


class _Outputs(torch.nn.Module):
    """The model with positional inputs and a tuple of plain tensors out, as ONNX export wants it."""

    def __init__(self, model: torch.nn.Module, names: list[str], outputs: list[str]) -> None:
        super().__init__()
        self.model, self.names, self.outputs = model, names, outputs

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.names, inputs)))
        return tuple(getattr(out, name) for name in self.outputs)


def export_onnx(loaded: LoadedModel, path: Path, example: dict[str, np.ndarray]) -> str:
    """``torch.onnx.export`` with dynamic batch and sequence axes; returns which exporter produced the graph."""
    import contextlib
    import io

    names = input_names(loaded)
    wrapper = _Outputs(loaded.model, names, OUTPUTS[loaded.task]).eval()
    args = tuple(torch.from_numpy(example[n]) for n in names)
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
    # the exporter prints its progress on stdout; keep it for the error message only
    log = io.StringIO()
    # it also warns, per export, that torchvision's operators are not registered; they are not used here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=OUTPUTS[loaded.task],
                              dynamic_shapes={"inputs": tuple({0: batch, 1: seq} for _ in names)}, dynamo=True,
                              external_data=False, opset_version=18)
    except Exception as e:  # noqa: BLE001 (any exporter failure is reported as one line)
        text = str(e)
        # the exporter's message starts with generic advice; the cause follows its "Exception summary" heading
        cause = text.split("## Exception summary", 1)[-1]
        raise VerificationError(f"torch.onnx.export failed for {type(loaded.model).__name__}: "
                                f"{first_line(cause)}") from None
    return f"torch.onnx.export(dynamo=True) torch {torch.__version__}"


def write_onnx(loaded: LoadedModel, out: Path, batches: list[dict[str, np.ndarray]]) -> Path:
    """ONNX variant, verified against PyTorch on ``batches``; raises VerificationError when it differs."""
    if not any((b["attention_mask"] == 0).any() for b in batches):
        raise ConfigError("--verify_data: the verification batches need examples of different lengths (padding)")
    example = next(b for b in batches if (b["attention_mask"] == 0).any())  # trace with padding present

    def write(tmp: Path) -> None:
        exporter = export_onnx(loaded, tmp / "model.onnx", example)
        check = compare(TorchRunner(loaded.model, loaded.task), OrtRunner(tmp / "model.onnx"), batches, loaded.task)
        if not check["within_tolerance"]:
            raise VerificationError(
                f"the ONNX graph differs from PyTorch: max |diff| {check['max_abs_diff']:.3g} exceeds "
                f"{ONNX_ATOL:g} + {ONNX_RTOL:g} * |torch| (prediction agreement {check['prediction_agreement']:.3f})")
        info.update(exporter=exporter, check_against_fp32=check)

    info: dict[str, Any] = {"variant": "onnx", "tolerance": f"|onnx - torch| <= {ONNX_ATOL:g} + {ONNX_RTOL:g} * |torch|",
                            "inputs": input_names(loaded), "outputs": OUTPUTS[loaded.task],
                            "reload": "onnxruntime.InferenceSession('model.onnx') or experiments.compress.load_variant"}
    return _write_folder(out, loaded, info, write)


def write_onnx_int8(loaded: LoadedModel, onnx_folder: Path, out: Path, batches: list[dict[str, np.ndarray]]) -> Path:
    """ONNX Runtime dynamic int8 quantisation of the verified ONNX graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def write(tmp: Path) -> None:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint on the root logger
        try:
            quantize_dynamic(str(onnx_folder / "model.onnx"), str(tmp / "model.onnx"), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        check = compare(TorchRunner(loaded.model, loaded.task), OrtRunner(tmp / "model.onnx"), batches, loaded.task)
        info["check_against_fp32"] = check

    info: dict[str, Any] = {"variant": "onnx_int8", "method": "onnxruntime.quantization.quantize_dynamic(QInt8 weights)",
                            "inputs": input_names(loaded), "outputs": OUTPUTS[loaded.task],
                            "reload": "onnxruntime.InferenceSession('model.onnx') or experiments.compress.load_variant"}
    return _write_folder(out, loaded, info, write)


# ---- head pruning --------------------------------------------------------------------------------

def attention_blocks(model: torch.nn.Module) -> list[Any]:
    """The ``attention`` module of every encoder layer (BERT layout: ``.self.query/key/value``, ``.output.dense``)."""
    encoder = getattr(model.base_model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    blocks = [getattr(layer, "attention", None) for layer in layers] if layers is not None else []
    if not blocks or not all(hasattr(b, "self") and hasattr(b.self, "query") and hasattr(b, "output") for b in blocks):
        raise ConfigError(f"--prune_heads: supports BERT-layout encoders (encoder.layer[i].attention.self.query ...); "
                          f"{type(model).__name__} is laid out differently")
    return blocks


def heads_per_layer(model: torch.nn.Module) -> list[int]:
    """Attention heads now in each layer."""
    return [b.self.query.out_features // b.self.attention_head_size for b in attention_blocks(model)]


def prune_heads(model: torch.nn.Module, heads: dict[int, list[int]]) -> torch.nn.Module:
    """Remove ``heads`` ({layer: [head, ...]}, numbered as in the unpruned model) in place."""
    from transformers.pytorch_utils import prune_linear_layer

    blocks = attention_blocks(model)
    for layer, drop in heads.items():
        if not drop:
            continue
        block = blocks[layer]
        size = block.self.attention_head_size
        n = block.self.query.out_features // size
        keep = [h for h in range(n) if h not in set(drop)]
        if not keep or any(not 0 <= h < n for h in drop):
            raise ConfigError(f"prune_heads: layer {layer} has heads 0..{n - 1}; cannot remove {sorted(drop)}")
        index = torch.cat([torch.arange(h * size, (h + 1) * size) for h in keep])
        for name in ("query", "key", "value"):
            setattr(block.self, name, prune_linear_layer(getattr(block.self, name), index, dim=0))
        block.output.dense = prune_linear_layer(block.output.dense, index, dim=1)
        block.self.num_attention_heads = len(keep)
        block.self.all_head_size = len(keep) * size
    return model


def labelled_batches(loaded: LoadedModel, path: str, batch_size: int = 16,
                     max_seq_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Model inputs with ``labels`` from a labelled classification or NER file (label names as in the export)."""
    if loaded.task == "qa":
        raise ConfigError("--prune_heads: needs labelled classification or NER data; QA exports are not supported")
    examples = read_examples(path, loaded.task, loaded.tokenizer, max_seq_length)
    label2id = {name: k for k, name in loaded.id2label.items()}
    for ex in examples:
        gold = ex["gold"]
        if gold is None:
            raise DataError(f"{path}: has no labels; head importance needs the gold labels")
        for name in gold if loaded.task == "ner" else [gold]:
            if name not in label2id:
                raise DataError(f"{path}:{ex['line']}: label {name!r} is not one of the model's labels "
                                f"({', '.join(label2id)})")
    if loaded.problem_type in ("regression", "multi_label_classification"):
        raise ConfigError(f"--prune_heads: single-label classification or NER only, not {loaded.problem_type}")
    names = input_names(loaded)
    out = []
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo: lo + batch_size]
        enc = encode(loaded.task, chunk, loaded.tokenizer, max_seq_length)
        batch = {n: enc[n] for n in names}
        if loaded.task == "classification":
            batch["labels"] = torch.tensor([label2id[ex["gold"]] for ex in chunk])
        else:  # a word's tag at its first sub-token, as tuneforge trains and scores
            labels = torch.full_like(enc["input_ids"], -100)
            for i, ex in enumerate(chunk):
                seen = set()
                for t, w in enumerate(enc.word_ids(i)):
                    if w is not None and w not in seen:
                        seen.add(w)
                        labels[i, t] = label2id[ex["gold"][w]]
            batch["labels"] = labels
        out.append(batch)
    return out


def head_importance(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Michel et al. (2019): sum over batches of |d loss / d gate_h| for a gate on each head's output, normalised
    per layer (L2), as their reference code does. Returns [layers, heads] (heads as now in the model)."""
    blocks = attention_blocks(model)
    counts = heads_per_layer(model)
    if len(set(counts)) != 1:
        raise ConfigError("head importance needs the same number of heads in every layer (an unpruned model)")
    gates = torch.ones(len(blocks), counts[0], requires_grad=True)

    def gate(layer: int, size: int) -> Callable[..., tuple[torch.Tensor, ...]]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return (args[0] * gates[layer].repeat_interleave(size), *args[1:])
        return hook

    handles = [b.output.dense.register_forward_pre_hook(gate(i, b.self.attention_head_size))
               for i, b in enumerate(blocks)]
    was_training = model.training
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    model.requires_grad_(False)
    importance = torch.zeros_like(gates)
    try:
        for batch in batches:
            loss = model(**batch).loss
            (grad,) = torch.autograd.grad(loss, gates)
            importance += grad.abs()
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])
        model.train(was_training)
    norm = importance.norm(dim=1, keepdim=True).clamp_min(1e-20)
    return importance / norm


def heads_to_prune(importance: torch.Tensor, n: int) -> dict[int, list[int]]:
    """The ``n`` least important heads overall, never the last head of a layer."""
    layers, heads = importance.shape
    if not 0 < n <= layers * (heads - 1):
        raise ConfigError(f"--prune_heads: expected 1 to {layers * (heads - 1)} (at least one head stays in each of "
                          f"{layers} layers of {heads} heads), got {n}")
    left = [heads] * layers
    chosen: dict[int, list[int]] = {}
    for flat in torch.argsort(importance.flatten()).tolist():
        layer, head = divmod(flat, heads)
        if left[layer] > 1:
            chosen.setdefault(layer, []).append(head)
            left[layer] -= 1
            if sum(len(v) for v in chosen.values()) == n:
                break
    return {k: sorted(v) for k, v in sorted(chosen.items())}


def recover(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], steps: int, lr: float,
            seed: int = 42) -> list[float]:
    """A short fine-tune of the pruned model (AdamW, constant rate, batches in a seeded shuffled cycle)."""
    rng = np.random.default_rng(seed)
    model.train()
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses, order = [], []
    with torch.random.fork_rng():  # seeded dropout, without touching the caller's random state
        torch.manual_seed(seed)
        for _ in range(steps):
            if not order:
                order = list(rng.permutation(len(batches)))
            loss = model(**batches[order.pop()]).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
    model.eval()
    model.requires_grad_(False)
    return losses


def write_pruned(loaded: LoadedModel, out: Path, n: int, prune_data: str, recover_steps: int = 0,
                 recover_data: str | None = None, recover_lr: float = 3e-5, batch_size: int = 16,
                 verify: list[dict[str, np.ndarray]] | None = None) -> Path:
    """Rank heads on ``prune_data``, remove the ``n`` least important, optionally fine-tune, and save."""
    from safetensors.torch import save_model

    batches = labelled_batches(loaded, prune_data, batch_size)
    importance = head_importance(loaded.model, batches)
    heads = heads_to_prune(importance, n)
    pruned = prune_heads(copy.deepcopy(loaded.model), heads)
    info: dict[str, Any] = {
        "variant": "pruned", "pruned_heads": {str(k): v for k, v in heads.items()},
        "heads_removed": sum(len(v) for v in heads.values()), "heads_per_layer": heads_per_layer(pruned),
        "importance": "Michel et al. 2019: sum over batches of |dL/d gate| per head, L2-normalised per layer",
        "importance_data": str(prune_data), "head_importance": [[round(float(v), 5) for v in row] for row in importance],
        "reload": "experiments.compress.load_variant(folder): fp32 architecture from config.json, the same heads "
                  "pruned, then pruned_model.safetensors",
    }
    if recover_steps:
        data = recover_data or prune_data
        losses = recover(pruned, labelled_batches(loaded, data, batch_size) if recover_data else batches,
                         recover_steps, recover_lr)
        info["recovery"] = {"steps": recover_steps, "data": str(data), "lr": recover_lr, "batch_size": batch_size,
                            "loss_first_10": float(np.mean(losses[:10])), "loss_last_10": float(np.mean(losses[-10:]))}
    if verify:
        info["check_against_fp32"] = compare(TorchRunner(loaded.model, loaded.task), TorchRunner(pruned, loaded.task),
                                             verify, loaded.task)
    return _write_folder(out, loaded, info, lambda tmp: save_model(pruned, str(tmp / "pruned_model.safetensors")))


# ---- command line --------------------------------------------------------------------------------

def build_variants(args: argparse.Namespace, loaded: LoadedModel | None = None) -> dict[str, Path]:
    """Write the variants ``args`` asks for under ``args.output``; returns {variant: folder}."""
    out = Path(args.output)
    loaded = loaded or load_fp32(args.model, getattr(args, "task", None))
    verify = verification_batches(loaded, args.verify_data or args.prune_data)
    written: dict[str, Path] = {}
    if args.int8:
        written["int8"] = write_int8(loaded, out / "int8", verify)
    if args.onnx or args.onnx_int8:
        written["onnx"] = write_onnx(loaded, out / "onnx", verify)
    if args.onnx_int8:
        written["onnx_int8"] = write_onnx_int8(loaded, written["onnx"], out / "onnx_int8", verify)
    if args.prune_heads:
        if not args.prune_data:
            raise ConfigError("--prune_heads: needs --prune_data (a labelled file to rank the heads on)")
        written["pruned"] = write_pruned(loaded, out / "pruned", args.prune_heads, args.prune_data,
                                         args.recover_steps, args.recover_data, args.recover_lr, verify=verify)
    return written


def add_variant_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared by ``compress`` and ``compress_benchmark``."""
    p.add_argument("--prune_heads", type=int, default=0, help="attention heads to remove (0: no pruned variant)")
    p.add_argument("--prune_data", default=None, help="labelled file the heads are ranked on")
    p.add_argument("--recover_steps", type=int, default=0, help="fine-tuning batches after pruning")
    p.add_argument("--recover_data", default=None, help="labelled file for the recovery fine-tune (default: prune_data)")
    p.add_argument("--recover_lr", type=float, default=3e-5)
    p.add_argument("--verify_data", default=None, help="inputs to check variants on (default: prune_data, else built-in)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export folder (plain transformers or PEFT adapter)")
    p.add_argument("--output", required=True, help="folder for the variant folders")
    p.add_argument("--task", choices=("classification", "ner", "qa"), default=None)
    p.add_argument("--int8", action="store_true", help="dynamic int8 (torch)")
    p.add_argument("--onnx", action="store_true", help="ONNX export, verified against PyTorch")
    p.add_argument("--onnx_int8", action="store_true", help="ONNX + ONNX Runtime dynamic int8")
    add_variant_arguments(p)
    args = p.parse_args(argv)
    if not (args.int8 or args.onnx or args.onnx_int8 or args.prune_heads):
        p.error("nothing to do: give at least one of --int8, --onnx, --onnx_int8, --prune_heads N")
    return args


@quiet_transformers()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        written = build_variants(args)
    except (ConfigError, DataError) as e:
        print(f"error: {first_line(e, 400)}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"error: {first_line(e, 400)}", file=sys.stderr)
        return 1
    for name, folder in written.items():
        info = json.loads((folder / "compression.json").read_text(encoding="utf-8"))
        check = info.get("check_against_fp32", {})
        detail = (f"max |diff| vs fp32 {check['max_abs_diff']:.2e}, prediction agreement "
                  f"{check['prediction_agreement']:.3f}" if check else "")
        print(f"{name:10s} {folder}  {weights_size(folder) / 2**20:.1f} MiB  {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
