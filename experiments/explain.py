"""Why did the model decide this? Per-token attributions and attention views for a tuneforge export.

    python -m experiments.explain --model runs/sst2/<time>/export --input ../shared/data/sst2/dev.tsv \
        [--task classification|ner|qa] [--n_steps 50] [--batch_size 8] [--output DIR] [--attention_example K]

For every example of ``--input`` (read as tuneforge reads data files: csv / tsv / json / jsonl / parquet, NER
also CoNLL columns, QA also SQuAD's nested json), the model's prediction is explained by Captum's
``LayerIntegratedGradients`` on the word-embedding layer:

- classification: the logit of the predicted class (each predicted label for multi-label, the output for
  regression);
- NER: for each predicted entity, the sum of the predicted tags' logits at the entity's words (first sub-token
  of each word, where tuneforge scores a word);
- QA: the start logit at the predicted answer start and the end logit at its end (in the context window that
  holds the best span).

The baseline keeps [CLS] / [SEP] (every special token) and replaces every other token by [PAD], with the same
attention mask. Integrated Gradients' completeness says the attributions sum to F(input) - F(baseline); the
gap is Captum's convergence delta, reported per explanation next to both scores. Attention maps (per layer and
head) and attention rollout (Abnar & Zuidema 2020) are the second, cheaper view.

Writes into ``--output`` (default: ``<run>/<timestamp>-explain`` beside the run an export belongs to, else
``runs/explain/<timestamp>``): ``explanations.jsonl`` (one row per example: tokens, per-token attributions and
rollout relevance per explained output, delta, prediction, gold when the file has it), ``explanations.html``
(one self-contained page, tokens shaded by attribution) and, for example ``--attention_example``,
``attention_<K>.png`` (every layer and head) and ``rollout_<K>.png`` (rollout matrix and both per-token views).
Works on plain exports and on PEFT adapter exports (``adapter_config.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_modules.errors import ConfigError, DataError, first_line

TASKS = ("classification", "ner", "qa")
ARCHITECTURE_TASKS = {"ForSequenceClassification": "classification", "ForTokenClassification": "ner",
                      "ForQuestionAnswering": "qa"}
PEFT_TASKS = {"SEQ_CLS": "classification", "TOKEN_CLS": "ner", "QUESTION_ANS": "qa"}
MAX_ANSWER_TOKENS = 30  # the SQuAD recipes' max_answer_length


# ---- loading an export ---------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model from an export folder, what it is for, and how to read its outputs."""

    model: torch.nn.Module
    tokenizer: Any
    task: str
    id2label: dict[int, str]
    problem_type: str | None
    peft: bool = False
    prompt_learning: bool = False  # PEFT prompt / prefix tuning: virtual tokens the attention views cannot show


def _read_json(path: Path, key: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read {path}: {first_line(e)}") from None


def export_task(folder: str | Path) -> str:
    """The task of an export folder: from ``adapter_config.json``'s task_type or ``config.json``'s architectures."""
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"--model: folder '{folder}' does not exist")
    if (path / "adapter_config.json").is_file():
        task_type = _read_json(path / "adapter_config.json", "--model").get("task_type")
        if task_type not in PEFT_TASKS:
            raise ConfigError(f"--model: {path / 'adapter_config.json'} has task_type {task_type!r}; expected one of "
                              f"{', '.join(PEFT_TASKS)}")
        return PEFT_TASKS[task_type]
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model: '{folder}' holds neither config.json nor adapter_config.json "
                          "(expected a tuneforge export folder)")
    architectures = _read_json(path / "config.json", "--model").get("architectures") or []
    for arch in architectures:
        for suffix, task in ARCHITECTURE_TASKS.items():
            if arch.endswith(suffix):
                return task
    raise ConfigError(f"--model: {path / 'config.json'} architectures {architectures} are not a sequence "
                      "classification, token classification or question answering model")


def _adapter_num_labels(folder: Path, heads: list[str]) -> int | None:
    """Rows of the adapter's saved task head (one of ``modules_to_save``), for a folder without config.json."""
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            module = key.rsplit(".", 2)[-2] if key.count(".") >= 2 else ""
            if key.endswith(".weight") and module in heads and len(f.get_slice(key).get_shape()) == 2:
                return int(f.get_slice(key).get_shape()[0])
    return None


def load_export(folder: str | Path, task: str | None = None, attn_implementation: str = "eager") -> LoadedModel:
    """Load an export (plain transformers folder or PEFT adapter folder) in eval mode, with its tokenizer.

    ``task`` (optional) must match what the export is; eager attention lets the model return attention maps.
    """
    from transformers import (
        AutoConfig,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    path = Path(folder)
    found = export_task(path)
    if task is not None and task != found:
        raise ConfigError(f"--task: {task}, but '{folder}' is a {found} model; leave --task out or pass --task {found}")
    loaders = {"classification": AutoModelForSequenceClassification, "ner": AutoModelForTokenClassification,
               "qa": AutoModelForQuestionAnswering}
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    peft = (path / "adapter_config.json").is_file()
    prompt_learning = False
    try:
        if peft:
            import peft as peft_lib

            adapter = _read_json(path / "adapter_config.json", "--model")
            prompt_learning = adapter.get("peft_type") in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
            base = str(adapter.get("base_model_name_or_path") or "")
            if not base:
                raise ConfigError(f"--model: {path / 'adapter_config.json'} names no base_model_name_or_path")
            if (path / "config.json").is_file():
                # tuneforge's adapter folders hold the base model's config: its label names go to the base model
                # (AutoPeftModel's own `config` argument is the adapter's PeftConfig)
                saved = AutoConfig.from_pretrained(path)
                if found != "qa":
                    kwargs.update(id2label=saved.id2label, label2id=saved.label2id)
                    if getattr(saved, "problem_type", None):
                        kwargs["problem_type"] = saved.problem_type
            elif found != "qa":
                n = _adapter_num_labels(path, list(adapter.get("modules_to_save") or []))
                if n is not None:
                    kwargs["num_labels"] = n
            auto = {"classification": peft_lib.AutoPeftModelForSequenceClassification,
                    "ner": peft_lib.AutoPeftModelForTokenClassification,
                    "qa": peft_lib.AutoPeftModelForQuestionAnswering}[found]
            model = auto.from_pretrained(str(path), **kwargs)
        else:
            model = loaders[found].from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--model: cannot load '{folder}': {first_line(e)}") from None
    model.eval()
    config = model.config
    id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    return LoadedModel(model=model, tokenizer=tokenizer, task=found, id2label=id2label,
                       problem_type=getattr(config, "problem_type", None), peft=peft, prompt_learning=prompt_learning)


# ---- reading examples ----------------------------------------------------------------------------

def read_examples(path: str | Path, task: str, tokenizer: Any, max_seq_length: int = 384) -> list[dict[str, Any]]:
    """The canonical records of ``path`` for ``task``, read by tuneforge's own readers and data-module hooks,
    each with its ``line`` and its ``gold`` answer when the file has one (else None)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--input: file '{path}' {'is a directory' if p.is_dir() else 'does not exist'}")
    source = str(path)
    if task == "classification":
        from datamodules.text_classification import TextClassificationDataModule

        dm = TextClassificationDataModule()
        records, lines = dm.read_file(source)
        split = "test" if dm.label_column in records[0] else "predict"
        cols = dm.canonical_columns(records, lines, split, source)
        gold = cols.get("label_list") or cols.get("label") or [None] * len(lines)
        return [{"text": t, "text_pair": p_, "line": ln, "gold": g}
                for t, p_, ln, g in zip(cols["text"], cols["text_pair"], lines, gold)]
    if task == "ner":
        from datamodules.token_classification import TAGS_COLUMNS, TokenClassificationDataModule

        dm = TokenClassificationDataModule()
        records, lines = dm.read_file(source)
        tagged = any(records[0].get(c) is not None for c in TAGS_COLUMNS)
        cols = dm.canonical_columns(records, lines, "test" if tagged else "predict", source)
        return [{"words": w, "line": ln, "gold": t if tagged else None}
                for w, t, ln in zip(cols["tokens"], cols["tags"], lines)]
    from datamodules.question_answering import QuestionAnsweringDataModule, flatten_squad

    dm = QuestionAnsweringDataModule(max_seq_length=max_seq_length, doc_stride=min(128, max_seq_length // 2))
    dm.connect(tokenizer)
    records, lines = dm.read_file(source)
    if isinstance(records[0], dict) and "paragraphs" in records[0]:
        records, lines = flatten_squad(records, source)
    answered = records[0].get(dm.columns["answers"]) is not None
    cols = dm.canonical_columns(records, lines, "test" if answered else "predict", source)
    return [{"id": i, "question": q, "context": c, "line": ln, "gold": a["text"] if answered else None}
            for i, q, c, a, ln in zip(cols["id"], cols["question"], cols["context"], cols["answers"], cols["line"])]


# ---- what to explain -----------------------------------------------------------------------------

@dataclass
class Target:
    """One explained output: a scalar F = sum(selection * task scores), and where it sits for the rollout view."""

    name: str
    selection: torch.Tensor  # same shape as one row of the task scores
    positions: list[int]  # token positions (in the row) the output is read at
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    """One example's encoded window, its prediction and the outputs to explain."""

    example: int
    window: int  # row of the encoded batch
    prediction: Any
    targets: list[Target]
    extra: dict[str, Any] = field(default_factory=dict)


def task_scores(task: str, outputs: Any) -> torch.Tensor:
    """The per-row output tensor targets select from: [B, C] logits, [B, T, C] tag logits, [B, 2, T] start/end."""
    if task == "qa":
        return torch.stack([outputs.start_logits, outputs.end_logits], dim=1)
    return outputs.logits


def encode(task: str, examples: list[dict[str, Any]], tokenizer: Any, max_seq_length: int) -> Any:
    """Tokenise a batch of examples (QA: into overlapping windows of the context, as tuneforge does)."""
    common = {"truncation": True, "max_length": max_seq_length, "padding": True, "return_tensors": "pt",
              "return_special_tokens_mask": True}
    if task == "classification":
        pairs = [e["text_pair"] for e in examples]
        return tokenizer([e["text"] for e in examples], pairs if any(p is not None for p in pairs) else None, **common)
    if task == "ner":
        return tokenizer([e["words"] for e in examples], is_split_into_words=True, **common)
    common["truncation"] = "only_second"
    return tokenizer([e["question"].lstrip() for e in examples], [e["context"] for e in examples],
                     stride=min(128, max_seq_length // 2), return_overflowing_tokens=True, return_offsets_mapping=True,
                     **common)


def predict_rows(loaded: LoadedModel, examples: list[dict[str, Any]], enc: Any, scores: torch.Tensor) -> list[Row]:
    """Predictions and explanation targets for a batch, from the task scores of its encoded rows."""
    task, id2label = loaded.task, loaded.id2label
    rows: list[Row] = []
    if task == "classification":
        for i in range(len(examples)):
            logits = scores[i]
            if loaded.problem_type == "regression" or logits.numel() == 1:
                value = float(logits[0])
                rows.append(Row(i, i, value, [Target("output", torch.eye(logits.numel())[0], [0])]))
                continue
            if loaded.problem_type == "multi_label_classification":
                probs = torch.sigmoid(logits)
                chosen = [int(k) for k in torch.nonzero(probs > 0.5).flatten()] or [int(probs.argmax())]
                prediction: Any = [id2label.get(k, str(k)) for k in chosen]
            else:
                probs = torch.softmax(logits, -1)
                chosen = [int(probs.argmax())]
                prediction = id2label.get(chosen[0], str(chosen[0]))
            targets = [Target(id2label.get(k, str(k)), torch.eye(logits.numel())[k], [0], {"probability": float(probs[k])})
                       for k in chosen]
            extra = {"probabilities": {id2label.get(k, str(k)): round(float(p), 6) for k, p in enumerate(probs)}}
            rows.append(Row(i, i, prediction, targets, extra))
        return rows
    if task == "ner":
        for i, ex in enumerate(examples):
            first: dict[int, int] = {}
            for t, w in enumerate(enc.word_ids(i)):
                if w is not None and w not in first:
                    first[w] = t
            tag_ids = {w: int(scores[i, t].argmax()) for w, t in first.items()}
            tags = [id2label.get(tag_ids[w], "O") if w in tag_ids else None for w in range(len(ex["words"]))]
            entities = iob2_entities([t or "O" for t in tags])
            targets = []
            for kind, s, e in entities:
                sel = torch.zeros_like(scores[i])
                for w in range(s, e + 1):
                    sel[first[w], tag_ids[w]] = 1.0
                text = " ".join(ex["words"][s:e + 1])
                targets.append(Target(f"{kind}: {text}", sel, [first[w] for w in range(s, e + 1)],
                                      {"type": kind, "start_word": s, "end_word": e, "text": text}))
            prediction = [t.meta for t in targets]
            rows.append(Row(i, i, prediction, targets, {"predicted_tags": tags,
                                                       "truncated_words": sum(t is None for t in tags)}))
        return rows
    # QA: the best span over every window of the example; explain the window that holds it
    best: dict[int, tuple[float, int, int, int]] = {}
    for r, sample in enumerate(enc["overflow_to_sample_mapping"].tolist()):
        seq = enc.sequence_ids(r)
        context = torch.tensor([s == 1 for s in seq])
        start, end = scores[r, 0], scores[r, 1]
        pair = start[:, None] + end[None, :]
        n = len(seq)
        band = torch.triu(torch.ones(n, n, dtype=torch.bool)) & ~torch.triu(torch.ones(n, n, dtype=torch.bool),
                                                                          MAX_ANSWER_TOKENS)
        valid = band & context[:, None] & context[None, :]
        if not valid.any():
            continue
        flat = int(pair.masked_fill(~valid, float("-inf")).argmax())
        s, e = divmod(flat, n)
        score = float(pair[s, e])
        if sample not in best or score > best[sample][0]:
            best[sample] = (score, r, s, e)
    for i, ex in enumerate(examples):
        if i not in best:  # no context token fits in any window (a question as long as max_seq_length)
            rows.append(Row(i, -1, None, [], {"note": "no context token fits in max_seq_length"}))
            continue
        score, r, s, e = best[i]
        offsets = enc["offset_mapping"][r]
        a, b = int(offsets[s][0]), int(offsets[e][1])
        n = scores.shape[-1]
        prediction = {"text": ex["context"][a:b], "answer_start": a, "score": round(score, 4)}
        targets = [Target("start", torch.eye(2 * n)[s].view(2, n), [s], {"token": s}),
                   Target("end", torch.eye(2 * n)[n + e].view(2, n), [e], {"token": e})]
        rows.append(Row(i, r, prediction, targets))
    return rows


def iob2_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word) of each entity in IOB2 tags; an I- tag after a different type starts one."""
    entities: list[tuple[str, int, int]] = []
    kind, start = None, -1
    for k, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-")
        continues = prefix == "I" and name == kind
        if kind is not None and not continues:
            entities.append((kind, start, k - 1))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = name, k
    return entities


# ---- attributions and attention ------------------------------------------------------------------

def baseline_ids(input_ids: torch.Tensor, special_mask: torch.Tensor, attention_mask: torch.Tensor,
                 pad_id: int) -> torch.Tensor:
    """Every real non-special token replaced by the pad id; [CLS], [SEP] and padding kept."""
    return torch.where((special_mask == 0) & (attention_mask == 1), torch.full_like(input_ids, pad_id), input_ids)


def make_forward(loaded: LoadedModel) -> Callable[..., torch.Tensor]:
    """F(input_ids, attention_mask, token_type_ids, selection) = sum(selection * task scores) per row."""
    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                selection: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        scores = task_scores(loaded.task, loaded.model(**kwargs))
        return (scores * selection).flatten(1).sum(1)
    return forward


def attention_rollout(attentions: np.ndarray) -> np.ndarray:
    """Abnar & Zuidema (2020): per layer, heads averaged, half identity for the residual, rows renormalised;
    the layers multiplied from the first up. ``attentions``: [layers, heads, n, n]; returns [n, n]."""
    n = attentions.shape[-1]
    eye = np.eye(n)
    rollout = eye
    for layer in attentions:
        a = 0.5 * layer.mean(0) + 0.5 * eye
        a = a / a.sum(-1, keepdims=True)
        rollout = a @ rollout
    return rollout


def explain(loaded: LoadedModel, examples: list[dict[str, Any]], n_steps: int = 50, batch_size: int = 8,
            max_seq_length: int = 384, keep_attention: int | None = None,
            progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Explain every example: returns one JSON-ready row per example and, for example ``keep_attention``, its
    tokens, attention maps [layers, heads, n, n], rollout matrix and first explanation."""
    from captum.attr import LayerIntegratedGradients
    from tqdm.auto import tqdm

    model, tokenizer, task = loaded.model, loaded.tokenizer, loaded.task
    if not getattr(tokenizer, "is_fast", False) and task != "classification":
        raise ConfigError(f"--model: {task} explanations need a fast tokenizer (word ids / offsets); "
                          f"{type(tokenizer).__name__} is not one")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    if pad_id is None:
        raise ConfigError("--model: the tokenizer has neither a pad nor an unk token to build the baseline from")
    model.requires_grad_(False)  # gradients are needed for the embeddings only
    forward = make_forward(loaded)
    lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
    with_attention = not loaded.prompt_learning
    out: list[dict[str, Any]] = []
    kept: dict[str, Any] | None = None
    bar = tqdm(total=len(examples), desc="explaining", unit="example", disable=not progress)
    for lo in range(0, len(examples), batch_size):
        batch = examples[lo: lo + batch_size]
        enc = encode(task, batch, tokenizer, max_seq_length)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        types = enc.get("token_type_ids")
        with torch.no_grad():
            kwargs = {"input_ids": ids, "attention_mask": mask, "output_attentions": with_attention}
            if types is not None:
                kwargs["token_type_ids"] = types
            outputs = model(**kwargs)
        scores = task_scores(task, outputs)
        attentions = (torch.stack(outputs.attentions, 1).float().numpy()
                      if with_attention and outputs.attentions is not None else None)  # [B, L, H, T, T]
        rows = predict_rows(loaded, batch, enc, scores)
        base = baseline_ids(ids, enc["special_tokens_mask"], mask, pad_id)
        jobs = [(row, target) for row in rows for target in row.targets]
        results: dict[int, list[dict[str, Any]]] = {id(row): [] for row in rows}
        for j in range(0, len(jobs), batch_size):
            chunk = jobs[j: j + batch_size]
            index = torch.tensor([row.window for row, _ in chunk])
            sel = torch.stack([t.selection for _, t in chunk])
            args = (mask[index], types[index] if types is not None else None, sel)
            attr, delta = lig.attribute(inputs=ids[index], baselines=base[index], additional_forward_args=args,
                                        n_steps=n_steps, return_convergence_delta=True)
            with torch.no_grad():
                f_input = forward(ids[index], *args)
                f_base = forward(base[index], *args)
            per_token = attr.sum(-1).detach()
            for k, (row, target) in enumerate(chunk):
                real = mask[row.window].bool()
                entry = {"target": target.name, **target.meta,
                         "attributions": [float(v) for v in per_token[k][real]],
                         "delta": float(delta[k]), "score": float(f_input[k]), "baseline_score": float(f_base[k])}
                if attentions is not None:
                    positions = torch.nonzero(real).flatten().tolist()
                    rollout = attention_rollout(attentions[row.window][:, :, positions][:, :, :, positions])
                    where = [positions.index(p) for p in target.positions]
                    entry["rollout"] = [float(v) for v in rollout[where].mean(0)]
                results[id(row)].append(entry)
        for row in rows:
            ex = batch[row.example]
            number = lo + row.example
            record: dict[str, Any] = {"index": number, "line": ex["line"]}
            record.update({k: v for k, v in ex.items() if k not in ("line", "gold")})
            if row.window >= 0:
                real = mask[row.window].bool()
                record["tokens"] = tokenizer.convert_ids_to_tokens(ids[row.window][real].tolist())
            else:
                record["tokens"] = []
            record["prediction"] = row.prediction
            record["gold"] = ex["gold"]
            record.update(row.extra)
            if task == "ner" and ex["gold"] is not None:
                record["gold_entities"] = [{"type": k, "start_word": s, "end_word": e,
                                            "text": " ".join(ex["words"][s:e + 1])} for k, s, e in iob2_entities(ex["gold"])]
            record["explanations"] = results[id(row)]
            out.append(record)
            if keep_attention == number and row.window >= 0:
                real = mask[row.window].bool()
                positions = torch.nonzero(real).flatten().tolist()
                maps = attentions[row.window][:, :, positions][:, :, :, positions] if attentions is not None else None
                kept = {"index": number, "tokens": record["tokens"], "attentions": maps,
                        "rollout": attention_rollout(maps) if maps is not None else None,
                        "explanation": record["explanations"][0] if record["explanations"] else None,
                        "prediction": row.prediction}
        bar.update(len(batch))
    bar.close()
    return out, kept


# ---- pictures and the page -----------------------------------------------------------------------

def _tick_labels(tokens: list[str], limit: int = 80) -> tuple[list[int], list[str]]:
    step = max(1, len(tokens) // limit)
    return list(range(0, len(tokens), step)), tokens[::step]


def plot_attention(kept: dict[str, Any], path: Path) -> Path:
    """Every layer (rows) and head (columns) of the kept example's attention, one small map each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = kept["attentions"]
    layers, heads = maps.shape[:2]
    fig, axes = plt.subplots(layers, heads, figsize=(1.3 * heads + 1, 1.3 * layers + 1), squeeze=False)
    for i in range(layers):
        for j in range(heads):
            ax = axes[i][j]
            ax.imshow(maps[i, j], cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"head {j}", fontsize=7)
            if j == 0:
                ax.set_ylabel(f"layer {i}", fontsize=7)
    fig.suptitle(f"example {kept['index']}: attention (row = query token, column = key token), "
                 f"{len(kept['tokens'])} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rollout(kept: dict[str, Any], path: Path) -> Path:
    """The rollout matrix with token labels, and below it the two per-token views of the first explanation:
    Integrated Gradients attributions and rollout relevance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = kept["tokens"]
    n = len(tokens)
    exp = kept["explanation"]
    size = min(14.0, 3 + 0.22 * n)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(size, size * 0.75 + 3), height_ratios=[3, 1.2])
    top.imshow(kept["rollout"], cmap="magma")
    ticks, labels = _tick_labels(tokens)
    top.set_xticks(ticks, labels, rotation=90, fontsize=7)
    top.set_yticks(ticks, labels, fontsize=7)
    top.set_title(f"example {kept['index']}: attention rollout (Abnar & Zuidema 2020)", fontsize=10)
    if exp is not None:
        ig = np.array(exp["attributions"])
        ig = ig / (np.abs(ig).max() or 1.0)
        x = np.arange(n)
        bottom.bar(x - 0.2, ig, width=0.4, color=["tab:green" if v >= 0 else "tab:red" for v in ig],
                   label="Integrated Gradients (scaled to max |.| = 1)")
        if "rollout" in exp:
            ro = np.array(exp["rollout"])
            bottom.bar(x + 0.2, ro / (ro.max() or 1.0), width=0.4, color="tab:blue", alpha=0.6,
                       label="rollout relevance (scaled to max = 1)")
        bottom.axhline(0, color="black", linewidth=0.5)
        bottom.set_xticks(ticks, labels, rotation=90, fontsize=7)
        bottom.set_xlim(-0.7, n - 0.3)
        bottom.set_title(f"explained: {exp['target']}  (delta {exp['delta']:.2e})", fontsize=9)
        bottom.legend(fontsize=7, loc="upper right")
    else:
        bottom.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _shaded(tokens: list[str], scores: list[float], color: tuple[int, int, int], negative: tuple[int, int, int]) -> str:
    top = max((abs(s) for s in scores), default=0.0) or 1.0
    spans = []
    for token, s in zip(tokens, scores):
        r, g, b = color if s >= 0 else negative
        spans.append(f'<span class="t" style="background:rgba({r},{g},{b},{abs(s) / top:.3f})" '
                     f'title="{s:+.4f}">{html.escape(token)}</span>')
    return " ".join(spans)


def _short(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, dict) and "text" in value:
        return html.escape(repr(value["text"]))
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return "<br>".join(html.escape(f"{v['type']}: {v['text']}") for v in value)
    if isinstance(value, list) and not value:
        return "(none)"
    return html.escape(str(value))


LEGEND = (
    "<p>Integrated Gradients attributions per token (hover for the value): <span class='t' "
    "style='background:rgba(22,163,74,.6)'>supports</span> <span class='t' style='background:rgba(220,38,38,.6)'>"
    "opposes</span> the explained output, each line scaled to its own largest |value|. The smaller line beneath "
    "is attention rollout (<span class='t' style='background:rgba(37,99,235,.5)'>blue</span>). Delta: "
    "sum of attributions minus (F(input) - F(baseline)).</p>"
)


def write_html(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """One self-contained page: per example, one line per explained output with its tokens shaded by
    attribution (green supports the output, red speaks against it) and, beneath, the rollout view (blue)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:system-ui,sans-serif;margin:1.5em;font-size:14px}",
        "table{border-collapse:collapse;width:100%}",
        "td,th{border-bottom:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}",
        ".t{padding:1px 2px;border-radius:3px;line-height:1.9}.ro{font-size:11px;color:#333}",
        ".ok{color:#15803d}.bad{color:#b91c1c}.d{color:#666;font-size:12px}</style></head><body>",
        f"<h2>{html.escape(title)}</h2>",
        LEGEND,
        "<table><tr><th>#</th><th>explained output</th><th>tokens</th><th>prediction</th><th>gold</th><th>delta</th></tr>",
    ]
    for row in rows:
        explanations = row["explanations"] or [None]
        prediction, gold = row["prediction"], row.get("gold_entities", row["gold"])
        mark = ""
        if gold is not None and isinstance(prediction, str):
            mark = " class='ok'" if prediction == gold else " class='bad'"
        for k, exp in enumerate(explanations):
            cells = []
            if k == 0:
                span = f" rowspan='{len(explanations)}'"
                cells.append(f"<td{span}>{row['index']}</td>")
            if exp is None:
                cells.append("<td>(nothing predicted to explain)</td><td>" + html.escape(" ".join(row["tokens"])) + "</td>")
            else:
                view = _shaded(row["tokens"], exp["attributions"], (22, 163, 74), (220, 38, 38))
                if "rollout" in exp:
                    view += "<div class='ro'>" + _shaded(row["tokens"], exp["rollout"], (37, 99, 235),
                                                         (37, 99, 235)) + "</div>"
                cells.append(f"<td>{html.escape(exp['target'])}</td><td>{view}</td>")
            if k == 0:
                cells.append(f"<td{span}{mark}>{_short(prediction)}</td><td{span}>{_short(gold)}</td>")
            delta = "" if exp is None else f"{exp['delta']:.1e}"
            cells.append(f"<td class='d'>{delta}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table></body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ---- command line --------------------------------------------------------------------------------

def default_output(model: Path) -> Path:
    """``<run>/<timestamp>-explain`` beside the run an export belongs to (never inside an earlier run's
    directory), else ``runs/explain/<timestamp>``."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    run = model.resolve().parent
    if model.resolve().name.startswith("export") and ((run / "run_info.json").is_file() or (run / "config.yaml").is_file()):
        return run.parent / f"{stamp}-explain"
    return Path("runs") / "explain" / stamp


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Explain ``args.input`` with ``args.model``; returns the paths written and a summary."""
    if args.n_steps < 1:
        raise ConfigError(f"--n_steps: expected an integer >= 1, got {args.n_steps}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size: expected an integer >= 1, got {args.batch_size}")
    loaded = load_export(args.model, args.task)
    examples = read_examples(args.input, loaded.task, loaded.tokenizer, args.max_seq_length)
    if args.max_samples is not None:
        examples = examples[: args.max_samples]
    if not 0 <= args.attention_example < len(examples):
        raise ConfigError(f"--attention_example: expected an index from 0 to {len(examples) - 1}, "
                          f"got {args.attention_example}")
    out_dir = Path(args.output) if args.output else default_output(Path(args.model))
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*output_attentions.*")
        rows, kept = explain(loaded, examples, n_steps=args.n_steps, batch_size=args.batch_size,
                             max_seq_length=args.max_seq_length, keep_attention=args.attention_example,
                             progress=not args.no_progress)
    jsonl = out_dir / "explanations.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    page = write_html(rows, out_dir / "explanations.html", f"{Path(args.input).name} explained by {args.model}")
    written = {"jsonl": str(jsonl), "html": str(page)}
    if kept is not None and kept["attentions"] is not None:
        written["attention_png"] = str(plot_attention(kept, out_dir / f"attention_{kept['index']}.png"))
        written["rollout_png"] = str(plot_rollout(kept, out_dir / f"rollout_{kept['index']}.png"))
    explained = [e for r in rows for e in r["explanations"]]
    coarse = sum(abs(e["delta"]) > max(0.05 * abs(e["score"] - e["baseline_score"]), 1e-3) for e in explained)
    return {"output": str(out_dir), "examples": len(rows), "explanations": len(explained), "task": loaded.task,
            "max_abs_delta": max((abs(e["delta"]) for e in explained), default=0.0), "coarse": coarse, **written}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export folder (plain transformers or PEFT adapter)")
    p.add_argument("--input", required=True, help="data file, read as tuneforge reads it")
    p.add_argument("--task", choices=TASKS, default=None, help="default: read from the export")
    p.add_argument("--n_steps", type=int, default=50, help="Integrated Gradients integration steps")
    p.add_argument("--batch_size", type=int, default=8,
                   help="outputs attributed at once (memory grows with batch_size * n_steps)")
    p.add_argument("--max_seq_length", type=int, default=384, help="tokens per example (QA: per context window)")
    p.add_argument("--max_samples", type=int, default=None, help="explain only the first N examples")
    p.add_argument("--output", default=None, help="output folder")
    p.add_argument("--attention_example", type=int, default=0, help="example whose attention maps are drawn")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-file loading bars or load reports on the terminal while the block (or the decorated ``main``) runs:
    errors stay one line, progress is ours. transformers' verbosity and progress bars are put back afterwards (the
    tools also run in-process, from tests and notebooks)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@quiet_transformers()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (ConfigError, DataError) as e:
        print(f"error: {first_line(e, 400)}", file=sys.stderr)
        return 2
    print(f"Explained {summary['examples']} examples ({summary['explanations']} outputs, largest |delta| "
          f"{summary['max_abs_delta']:.2e}) into {summary['output']}")
    for key in ("jsonl", "html", "attention_png", "rollout_png"):
        if key in summary:
            print(f"  {key:14s} {summary[key]}")
    if summary["coarse"]:
        print(f"warning: {summary['coarse']} of {summary['explanations']} explanations have |delta| above 5% of "
              f"|F(input) - F(baseline)|: the integral is coarse there; raise --n_steps (now {args.n_steps})",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
