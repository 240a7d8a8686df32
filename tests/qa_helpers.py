"""Helpers for the question answering tests: synthetic SQuAD data and an oracle model.

The synthetic data is built from a small word list (so a tiny BERT's vocabulary covers it) with long
contexts, so that small ``max_seq_length`` values cut them into many windows.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from lit_modules.question_answering import QuestionAnsweringModule

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu red green blue black white river stone cloud "
         "forest city").split()
QA_VOCAB = [*WORDS, "what", "comes", "after", "is", "the", "a", "an", "of", ".", ",", "?"]


def make_squad(n_paragraphs: int = 6, questions_per_paragraph: int = 4, v2: bool = False, seed: int = 0,
               min_words: int = 20, max_words: int = 140) -> dict[str, Any]:
    """A SQuAD-format dataset whose answers are 1-3 word spans; v2 makes every third question unanswerable."""
    rng = random.Random(seed)
    paragraphs = []
    for p in range(n_paragraphs):
        n = rng.randint(min_words, max_words)
        words = [rng.choice(WORDS) for _ in range(n)]
        pieces, starts, pos = [], [], 0
        for i, w in enumerate(words):
            starts.append(pos)
            piece = w + (" ." if i % 9 == 8 else "")
            pieces.append(piece)
            pos += len(piece) + 1
        context = " ".join(pieces)
        qas = []
        for q in range(questions_per_paragraph):
            qid = f"p{p}q{q}"
            if v2 and (p * questions_per_paragraph + q) % 3 == 2:
                qas.append({"id": qid, "question": f"what comes after {rng.choice(WORDS)} {rng.choice(WORDS)} ?",
                            "answers": [], "is_impossible": True})
                continue
            i = rng.randrange(1, n)
            length = rng.randint(1, min(3, n - i))
            end = starts[i + length - 1] + len(words[i + length - 1])
            text = context[starts[i]: end]
            answers = [{"text": text, "answer_start": starts[i]}]
            if length > 1:  # a second annotator's shorter answer
                answers.append({"text": words[i], "answer_start": starts[i]})
            qa = {"id": qid, "question": f"what comes after {words[i - 1]} ?", "answers": answers}
            if v2:
                qa["is_impossible"] = False
            qas.append(qa)
        paragraphs.append({"context": context, "qas": qas})
    return {"version": "v2.0" if v2 else "1.1", "data": [{"title": "synthetic", "paragraphs": paragraphs}]}


def flat_records(squad: dict[str, Any]) -> list[dict[str, Any]]:
    """SQuAD JSON -> flat records in the Hugging Face ``squad`` layout."""
    rows = []
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows.append({"id": qa["id"], "title": article["title"], "context": paragraph["context"],
                             "question": qa["question"],
                             "answers": {"text": [a["text"] for a in qa["answers"]],
                                         "answer_start": [a["answer_start"] for a in qa["answers"]]}})
    return rows


class OracleQAModule(QuestionAnsweringModule):
    """A QA module whose logits point at the gold span for some questions and at a wrong span for the others.

    Which questions are answered right depends only on the question's tokens (:func:`oracle_is_right`),
    never on batching or on which process sees a window, so one and several processes must score the same.
    """

    def forward(self, **inputs: torch.Tensor) -> Any:
        outputs = self.model(**inputs)
        start, end = inputs.get("start_positions"), inputs.get("end_positions")
        if start is None:
            return outputs
        ids, types = inputs["input_ids"], inputs["token_type_ids"]
        s = torch.zeros_like(outputs.start_logits)
        e = torch.zeros_like(outputs.end_logits)
        rows = torch.arange(ids.shape[0])
        question_sum = (ids * (types == 0) * inputs["attention_mask"]).sum(1)
        right = oracle_is_right(question_sum)
        first_context = (types == 1).long().argmax(1)
        s[rows, torch.where(right, start, first_context)] = 10.0
        e[rows, torch.where(right, end, first_context)] = 10.0
        outputs.start_logits, outputs.end_logits = s, e
        return outputs


def oracle_is_right(question_token_sum: torch.Tensor) -> torch.Tensor:
    return question_token_sum % 3 != 0
