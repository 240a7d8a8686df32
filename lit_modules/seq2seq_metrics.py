"""Generation metrics: ROUGE-1/2/L/Lsum, SacreBLEU and mean generated length as torchmetrics ``Metric``s.

Each metric keeps one row per example, keyed by the example's index, and counts every index once
when it computes. The project's evaluation sampler (``EvalShardSampler``) never repeats an example;
the keyed rows keep the result identical to a single-process run also under a sampler that does
(Lightning's ``DistributedSampler`` pads processes with repeats, e.g. in a user's own ``val_dataloader``). The scoring itself is torchmetrics'
(ROUGE as in Google's ``rouge-score`` package, SacreBLEU's tokenisation and corpus statistics); what
is ours is the offline sentence splitting for ROUGE-Lsum and the per-example bookkeeping.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SentenceSplitter = Literal["rules", "punkt"]

# Tokens ending in a period that do not end a sentence (lower-cased, without the final period).
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "cf", "al", "fig", "figs",
    "eq", "eqs", "no", "nos", "vol", "pp", "ed", "eds", "inc", "ltd", "co", "corp", "dept", "gen", "gov", "sen",
    "rep", "u.s", "u.k", "u.n", "e.u", "a.m", "p.m", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec", "approx", "est", "resp", "sec", "ch",
}
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str, splitter: SentenceSplitter = "rules") -> list[str]:
    """Split ``text`` into sentences for ROUGE-Lsum; line breaks always end a sentence.

    ``rules`` (default, offline, deterministic): a break after ``.``, ``!`` or ``?`` followed by space
    and a capital letter or digit, except after common abbreviations and single-letter initials.
    ``punkt``: NLTK's trained English Punkt model, as the Hugging Face summarization examples use;
    it needs the NLTK data package ``punkt_tab`` (``python -m nltk.downloader punkt_tab``).
    """
    sentences: list[str] = []
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        if splitter == "punkt":
            import nltk

            sentences.extend(s for s in nltk.sent_tokenize(line) if s.strip())
            continue
        start = 0
        for m in _BOUNDARY.finditer(line):
            last_word = line[start:m.start()].rsplit(None, 1)[-1].rstrip(".!?\"')]").lower()
            if line[m.start() - 1] == "." and (last_word in _ABBREVIATIONS or re.fullmatch(r"[a-z]", last_word)):
                continue
            sentences.append(line[start:m.start()].strip())
            start = m.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if s]


def check_sentence_splitter(splitter: str, key: str) -> None:
    """Fail early when the chosen splitter cannot run here (``punkt`` without its NLTK data)."""
    from lit_modules.base import ConfigError

    if splitter not in ("rules", "punkt"):
        raise ConfigError(f"{key}: expected 'rules' or 'punkt', got {splitter!r}")
    if splitter == "punkt":
        import nltk

        try:
            nltk.data.find("tokenizers/punkt_tab/english/")
        except LookupError:
            raise ConfigError(f"{key}: 'punkt' needs NLTK's punkt_tab data (python -m nltk.downloader punkt_tab); "
                              "use 'rules' offline") from None


class _PerExampleMetric(Metric):
    """Rows of per-example values keyed by example index; :meth:`unique_rows` counts each index once."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("idx", default=[], dist_reduce_fx="cat")
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def _add(self, idx: Tensor | Sequence[int], rows: Tensor) -> None:
        self.idx.append(torch.as_tensor(idx, dtype=torch.long, device=self.device).reshape(-1))
        self.rows.append(rows.to(self.device, torch.float64).reshape(len(self.idx[-1]), -1))

    def unique_rows(self) -> Tensor:
        """All rows, the first one of each example index (in index order)."""
        if len(self.idx) == 0:  # a list before synchronisation, one tensor after it
            return torch.zeros(0, 0, dtype=torch.float64, device=self.device)
        idx, rows = dim_zero_cat(self.idx), dim_zero_cat(self.rows)
        unique, inverse = torch.unique(idx, return_inverse=True)
        first = torch.full((len(unique),), len(idx), dtype=torch.long, device=idx.device)
        first = first.scatter_reduce(0, inverse, torch.arange(len(idx), device=idx.device), reduce="amin")
        return rows[first]


class RougeScore(_PerExampleMetric):
    """ROUGE-1/2/L/Lsum F-measure, averaged over examples; with several references the best one counts.

    Tokenisation and scoring follow Google's ``rouge-score`` package (lower case, alphanumeric tokens,
    optional Porter stemming of tokens longer than 3 characters). ROUGE-Lsum is the summary-level LCS
    over sentences (:func:`split_sentences`), like ``rouge-score`` on newline-separated sentences.
    """

    higher_is_better = True

    def __init__(self, use_stemmer: bool = True, sentence_splitter: SentenceSplitter = "rules", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.use_stemmer = use_stemmer
        self.sentence_splitter = sentence_splitter
        self._stemmer: Any = None
        if use_stemmer:
            from nltk.stem import porter

            self._stemmer = porter.PorterStemmer()  # as rouge-score

    def update(self, preds: Sequence[str], references: Sequence[Sequence[str]], idx: Tensor | Sequence[int]) -> None:
        from torchmetrics.functional.text.rouge import (
            _normalize_and_tokenize_text,
            _rouge_l_score,
            _rouge_lsum_score,
            _rouge_n_score,
        )

        def tokens(text: str) -> Sequence[str]:
            return _normalize_and_tokenize_text(text, self._stemmer)

        def sentence_tokens(text: str) -> list[Sequence[str]]:
            return [tokens(s) for s in split_sentences(text, self.sentence_splitter)]

        rows = []
        for pred, refs in zip(preds, references):
            p, p_sents = tokens(pred), sentence_tokens(pred)
            best = [0.0] * len(ROUGE_KEYS)
            for ref in refs:
                r = tokens(ref)
                scores = (_rouge_n_score(p, r, 1), _rouge_n_score(p, r, 2), _rouge_l_score(p, r),
                          _rouge_lsum_score(p_sents, sentence_tokens(ref)))
                best = [max(b, float(s["fmeasure"])) for b, s in zip(best, scores)]
            rows.append(best)
        self._add(idx, torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(ROUGE_KEYS)))

    def compute(self) -> dict[str, Tensor]:
        rows = self.unique_rows()
        if rows.numel() == 0:
            return {k: torch.tensor(0.0, device=self.device) for k in ROUGE_KEYS}
        means = rows.mean(0).float()
        return dict(zip(ROUGE_KEYS, means))


class SacreBleuScore(_PerExampleMetric):
    """Corpus SacreBLEU (0-100, as the ``sacrebleu`` package reports it) over examples with one or more references.

    Each example's n-gram statistics are kept separately (so that repeated examples count once) and
    summed at the end, which gives the corpus score.
    """

    higher_is_better = True
    n_gram = 4

    def __init__(self, tokenize: str = "13a", lowercase: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from torchmetrics.functional.text.sacre_bleu import _SacreBLEUTokenizer

        self.tokenizer = _SacreBLEUTokenizer(tokenize, lowercase)  # type: ignore[arg-type]

    def update(self, preds: Sequence[str], references: Sequence[Sequence[str]], idx: Tensor | Sequence[int]) -> None:
        from torchmetrics.functional.text.bleu import _bleu_score_update

        n = self.n_gram
        rows = torch.zeros(len(preds), 2 + 2 * n, dtype=torch.float64)
        for row, pred, refs in zip(rows, preds, references):
            numerator, denominator = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
            pred_len, ref_len = _bleu_score_update([pred], [list(refs)], numerator, denominator,
                                                   torch.tensor(0.0), torch.tensor(0.0), n, self.tokenizer)
            row[0], row[1], row[2:2 + n], row[2 + n:] = pred_len, ref_len, numerator, denominator
        self._add(idx, rows)

    def compute(self) -> Tensor:
        from torchmetrics.functional.text.bleu import _bleu_score_compute

        rows = self.unique_rows()
        if rows.numel() == 0:
            return torch.tensor(0.0, device=self.device)
        total, n = rows.sum(0), self.n_gram
        bleu = _bleu_score_compute(total[0], total[1], total[2:2 + n], total[2 + n:], n, [1.0 / n] * n, False)
        return (100 * bleu).float()


class MeanGeneratedLength(_PerExampleMetric):
    """Mean number of generated tokens per example (up to and including the end-of-sequence token)."""

    higher_is_better = None

    def update(self, gen_lengths: Tensor, idx: Tensor | Sequence[int]) -> None:
        self._add(idx, torch.as_tensor(gen_lengths, dtype=torch.float64))

    def compute(self) -> Tensor:
        rows = self.unique_rows()
        return rows.mean().float() if rows.numel() else torch.tensor(0.0, device=self.device)
