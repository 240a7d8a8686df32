"""Prompt-based classification data (PET / LM-BFF): each text rendered into a template.

    "{text} It was {mask}."          masked LM: the label word is predicted at the mask
    "Review: {text}\\nSentiment:"     causal LM: the label word is scored right after the prompt

Everything else (reading, labels, few-shot sampling, caching, batching) is text classification's.
"""

from __future__ import annotations

from typing import Any

from datamodules.readers import DataError
from datamodules.text_classification import TextClassificationDataModule


class PromptClassificationDataModule(TextClassificationDataModule):
    """Text classification data rendered into a prompt template.

    Args:
        template: the prompt, with ``{text}`` (and ``{text_pair}`` for pairs); ``{mask}`` marks where
            a masked LM predicts the label word. Without ``{mask}`` the label word follows the prompt
            (causal LMs). When the input is too long, the text is shortened, never the template.
        **kwargs: the options of :class:`~datamodules.text_classification.TextClassificationDataModule`.
    """

    task_name = "prompt_classification"

    def __init__(self, template: str = "{text} It was {mask}.", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if "{text}" not in template:
            raise DataError(f"data.template: must contain {{text}}, got {template!r}")
        try:
            template.format(text="", text_pair="", mask="")
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"data.template: only {{text}}, {{text_pair}} and {{mask}} may be used ({e}); got {template!r}") from None
        self.template = template

    def cache_key_params(self) -> dict[str, Any]:
        return {**super().cache_key_params(), "template": self.template}

    def _render(self, text: str, pair: str | None, mask: str) -> str:
        return self.template.format(text=text, text_pair=pair or "", mask=mask)

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        tok = self._get_tokenizer()
        masked = "{mask}" in self.template
        if masked and tok.mask_token is None:
            raise DataError(f"data.template: has {{mask}} but the tokenizer ({type(tok).__name__}) has no mask token; "
                            "drop {mask} to score the label word after the prompt (causal LMs)")
        mask = tok.mask_token if masked else ""
        input_ids = []
        for text, pair in zip(batch["text"], batch["text_pair"]):
            ids = tok(self._render(text, pair, mask))["input_ids"]
            if len(ids) > self.max_seq_length:  # shorten the text, keep the whole template
                over = len(ids) - self.max_seq_length
                words = tok(text, add_special_tokens=False)["input_ids"]
                text = tok.decode(words[: max(1, len(words) - over - 2)])
                ids = tok(self._render(text, pair, mask))["input_ids"][: self.max_seq_length]
            if masked and ids.count(tok.mask_token_id) != 1:
                raise DataError(f"data.template: the rendered prompt must hold exactly one {tok.mask_token}; "
                                f"got {ids.count(tok.mask_token_id)} for {text[:60]!r}")
            input_ids.append(ids)
        return {"input_ids": input_ids}
