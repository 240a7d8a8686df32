"""The contract between a data module and a model: what each hands the other, once, in one place.

Two one-way flows, both made by :func:`connect` (``train.py`` calls it right after building the classes;
plain Python calls it by hand, see the README):

- model -> data: the model's tokenizer (one object, never copied) and :class:`ModelFacts`: the label set the model's head already has (from a
  checkpoint or ``model.labels``; the data then maps its labels to those ids), the feature layout it needs
  (``decoder_only``) and how many positions it takes (``max_positions``; longer ``max_seq_length`` options
  are refused before anything is read);
- data -> model: :class:`DataSchema`: the data module's ``schema`` object, which its ``setup`` fills
  (label set, problem type, unanswerable questions, per-split evaluation data such as seq2seq references
  or QA windows) and the model reads in its own ``setup`` and evaluation. Lightning calls a data module's
  ``setup`` before the model's, and a model that finds the schema unfilled stops with a one-line error.

Neither side imports the other or reaches through the trainer. This module is neutral ground: both
``lit_modules/`` and ``datamodules/`` import it, it imports neither; the constants both sides use live
here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from lit_modules.errors import ConfigError

IGNORE_INDEX = -100  # label value the loss ignores (padding, prompts of decoder-only models, unscored sub-tokens)
DEFAULT_PROMPT = "{source}\n"  # decoder-only seq2seq: the prompt around the source unless data.prompt_template says
STAGE_SPLIT = {"train": "train", "val": "validation", "validation": "validation", "test": "test", "predict": "predict"}


@dataclass(frozen=True)
class ModelFacts:
    """What the data module needs from the model, handed over once by :func:`connect`.

    Attributes:
        task: the model's task name (must equal the data module's).
        labels: the label / tag names in id order when the model's head already has them (a checkpoint,
            ``model.labels``); None: the data's training labels decide.
        problem_type: classification problem type when the model fixes it.
        decoder_only: seq2seq layout: source and target in one sequence (decoder-only LMs).
        max_positions: the most tokens one sequence may have (the model's position embeddings); None: no limit.
        model_name: how the user named the model (for error messages).
    """

    task: Optional[str] = None
    labels: Optional[tuple[str, ...]] = None
    problem_type: Optional[str] = None
    decoder_only: bool = False
    max_positions: Optional[int] = None
    model_name: str = "the model"


@dataclass
class QAFeatures:
    """What QA post-processing needs from one split's windows, as arrays (built once per split).

    Attributes:
        example: window -> question number (0..n_questions-1), in window-row order.
        offset_start / offset_end: ``[n_windows, max_len]`` character offsets of each token; -1 outside the context.
        cls_index: the CLS position of each window (the no-answer score).
        ids / questions / contexts: per question.
        answers: the gold answer texts per question (empty: unanswerable).
    """

    example: np.ndarray
    offset_start: np.ndarray
    offset_end: np.ndarray
    cls_index: np.ndarray
    ids: list[str]
    questions: list[str]
    contexts: list[str]
    answers: list[list[str]]


@dataclass
class SplitData:
    """What evaluation and prediction need from one split beyond its batches (``batch["idx"]`` indexes these).

    Attributes:
        table: the split's cached features (a ``datasets.Dataset``): the canonical record fields and the
            tokenised features, one row per feature; prediction files take their input fields from it.
        references: seq2seq: every reference text of each row (generated text is scored against them).
        qa: extractive QA: the windows' offsets and the questions' contexts and gold answers.
    """

    table: Any = None
    references: Optional[list[list[str]]] = None
    qa: Optional[QAFeatures] = None


@dataclass
class DataSchema:
    """What the model needs from the data: produced by the data module (its ``schema`` attribute, filled in
    its ``setup``) and read by the model, which receives the object once through :func:`connect`.

    Attributes:
        task: the data module's task name.
        resolved: True once the data module's ``setup`` has filled it.
        labels: label / tag names in id order (the model's own when it had them, else the training data's).
        problem_type: text classification: single_label_classification, multi_label_classification or regression.
        has_unanswerable: extractive QA: whether questions without an answer occur (SQuAD v2.0 style).
        added_tokens: tokens the data module added to the tokenizer (the model resizes its embeddings).
        prompt: seq2seq: the source prefix / prompt template / languages (written into the export).
        splits: per split key (``validation``, ``test``, ``predict``, ``validation/<name>`` for each of several named
            evaluation sets), the :class:`SplitData` evaluation needs.
        eval_sets: per evaluation split, the names of its sets in dataloader order (empty: one unnamed set).
        encode: the data module's own ``encode`` (canonical columns -> features), for models that must encode a
            text the data did not hold (prompt classification's content-free calibration inputs).
    """

    task: str
    resolved: bool = False
    labels: Optional[list[str]] = None
    problem_type: Optional[str] = None
    has_unanswerable: Optional[bool] = None
    added_tokens: list[str] = field(default_factory=list)
    prompt: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, SplitData] = field(default_factory=dict)
    eval_sets: dict[str, list[str]] = field(default_factory=dict)
    encode: Optional[Callable[[dict[str, list]], dict[str, list]]] = None

    def split(self, stage_or_split: str) -> SplitData:
        """The :class:`SplitData` of a split key (``validation``, ``validation/xquad``) or of the stage that evaluates
        it (``val``, ``val/xquad``)."""
        kind, slash, set_name = stage_or_split.partition("/")
        name = STAGE_SPLIT.get(kind, kind) + slash + set_name
        if not self.resolved or name not in self.splits:
            raise ConfigError(f"the data of split '{name}' has not been set up: run the model with its data module "
                              "(lit_modules.schema.connect(model, data), then trainer.fit / validate / test / predict)")
        return self.splits[name]


def stage_key(stage: str, set_name: str) -> str:
    """The metric prefix of a stage's evaluation set: ``val`` for a single set, ``val/<name>`` for a named one."""
    return f"{stage}/{set_name}" if set_name else stage


def connect(model: Any, data: Any) -> None:
    """Hand the model's facts (tokenizer, fixed label set, layout, length limit) to the data module and the data
    module's schema to the model. Call it once, after building both and before the trainer runs them.

    Raises a one-line :class:`ConfigError` when the two are made for different tasks.
    """
    model_task, data_task = getattr(model, "task", None), getattr(data, "task_name", None)
    if model_task != data_task:
        raise ConfigError(f"model {type(model).__name__} does {_task_words(model_task)} but data "
                          f"{type(data).__name__} holds {_task_words(data_task)} data: choose a model and a data "
                          "module of the same task")
    data.connect(model.tokenizer, model.model_facts())
    model.connect(data.schema)


def _task_words(task: Optional[str]) -> str:
    return (task or "an unknown task").replace("_", " ")
