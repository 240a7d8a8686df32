"""Dialogue data (next-reply generation): conversations rendered with the tokenizer's chat template.

Canonical record: ``{"history": [{"role", "content"}, ...], "reference": str | None, "reply_only": bool}``: the
turns before the reply (a system message first when there is one), the assistant reply that is learned and that
generated replies are scored against (None in predict data that ends with a user turn), and whether the example
learns that reply only (one split off a longer conversation, ``split_replies``) rather than the assistant turns
``assistant_turns`` names. The whole conversation is ``history + [{"role": "assistant", "content": reference}]``.

Features: the conversation rendered by ``tokenizer.apply_chat_template`` and tokenised in one piece.
``labels`` copy the tokens of the assistant turns to learn (their text and the end-of-turn token that follows
it, located through the character offsets of the rendered text) and are -100 on everything else: system and
user text, role headers, the template's own text. ``reply_start`` is where the last reply begins: generation
starts there. A conversation longer than ``max_seq_length`` loses whole turns from its start (the system
prompt stays) until it fits; the reply being learned is never cut.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from jinja2 import TemplateError
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.base import TransformerDataModule, column_tensor
from lit_modules.errors import DataError, first_line
from lit_modules.schema import IGNORE_INDEX

Layout = Literal["auto", "messages", "sharegpt", "history", "dialogsum"]
AssistantTurns = Literal["all", "last"]
SplitReplies = Literal["never", "evaluation", "always"]
TURN_COLUMNS = ("messages", "conversations", "conversation", "chat", "turns")
# role names of the common layouts (OpenAI messages, ShareGPT's "from") -> chat-template roles
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant"}
SPEAKER_LINE = re.compile(r"^\s*([^:\n]{1,40}?)\s*:\s?(.*)$")

Turn = dict[str, str]


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the special and added tokens: the end-of-turn markers chat templates write are among them."""
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})


def render(tokenizer: Any, messages: list[Turn], generation_prompt: bool = False) -> str:
    """The chat template's text for ``messages`` (with the assistant header after it when ``generation_prompt``)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def parse_transcript(text: str, assistant_speaker: str, where: str) -> list[Turn]:
    """``SPEAKER: text`` lines (DialogSum's ``#Person1#: ...``) -> turns: ``assistant_speaker``'s lines are the
    assistant's, every other speaker's the user's; consecutive lines of one role become one turn."""
    turns: list[Turn] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = SPEAKER_LINE.match(line)
        if m is None:
            if not turns:
                raise DataError(f"{where}: dialogue line {number} names no speaker ('#Person1#: ...' expected), "
                                f"got {line[:60]!r}")
            turns[-1]["content"] += "\n" + line.strip()
            continue
        role = "assistant" if m.group(1).strip() == assistant_speaker else "user"
        content = m.group(2).strip()
        if not content:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n" + content
        else:
            turns.append({"role": role, "content": content})
    return turns


class DialogueDataModule(TransformerDataModule):
    """Conversations for next-reply fine-tuning of chat models, from JSON / JSONL / parquet files or a hub dataset.

    Layouts (``layout: auto`` picks one from the first record):

    - ``messages``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}``;
    - ``sharegpt``: ``{"conversations": [{"from": "system" | "human" | "gpt", "value": ...}, ...]}``;
    - ``history``: ``{"history": str | [turns], "response": str}``: a list of strings alternates user and assistant
      turns and ends with the user turn the response answers (or holds ``{role, content}`` objects);
    - ``dialogsum``: DialogSum's ``{"dialogue": "#Person1#: ...\\n#Person2#: ..."}`` transcripts; the lines of
      ``assistant_speaker`` are the assistant's turns, the other speakers' the user's.

    A record's own system message (first in its turns) or ``system`` field wins over ``system_prompt``.

    Args:
        layout: the record layout (see above).
        conversation_column: the field holding the turns, the history or the transcript (default per layout:
            the first of messages, conversations, conversation, chat, turns; ``history``; ``dialogue``).
        response_column: ``history`` layout: the reply (default ``response``; may be absent in predict data).
        system_prompt: a system message for conversations that have none.
        assistant_turns: which assistant turns the loss counts: ``all`` of them or only the ``last``. An assistant
            turn that opens a conversation (no user turn before it) is context, never learned.
        split_replies: ``never``: a conversation is one example, whose last assistant turn is the reply generated at
            test / predict time. ``always``: every assistant turn becomes an example of its own (the conversation up
            to it, then the reply, which is all it learns): "each turn given its history". ``evaluation``: so in
            validation / test / predict data (every reply is generated and scored), while training conversations
            stay whole and learn all their assistant turns in one pass: the same loss terms, a fraction of the
            compute.
        assistant_speaker: ``dialogsum`` layout: the speaker whose lines are the assistant's (``#Person2#``).
        max_seq_length: the most tokens of one rendered conversation; longer ones lose whole turns from their start
            (the system prompt stays), and a conversation whose reply to learn does not fit with the turn before
            it is left out (counted in a warning; predict data stop with an error instead).
        padding_free: training batches without padding: the conversations of a batch are concatenated into one
            row, ``position_ids`` restart at 0 for each and there is no attention mask, from which transformers
            builds a block-diagonal causal mask (tested with SDPA), so no conversation sees
            another and the loss is the padded batch's (a test checks). Evaluation batches stay padded rows
            (generation needs them).
        **kwargs: the shared options of :class:`~datamodules.base.TransformerDataModule` (``max_train_samples``
            and ``max_eval_samples`` count conversations as read, before ``split_replies``).
    """

    task_name = "dialogue"
    model_input_pad: ClassVar[dict[str, int | None]] = {"input_ids": None, "labels": IGNORE_INDEX}
    position_columns = ("reply_start",)

    def __init__(
        self,
        layout: Layout = "auto",
        conversation_column: str | None = None,
        response_column: str = "response",
        system_prompt: str | None = None,
        assistant_turns: AssistantTurns = "all",
        split_replies: SplitReplies = "never",
        assistant_speaker: str = "#Person2#",
        max_seq_length: int = 512,
        padding_free: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_seq_length=max_seq_length, **kwargs)
        if layout not in ("auto", "messages", "sharegpt", "history", "dialogsum"):
            raise DataError(f"data.layout: expected auto, messages, sharegpt, history or dialogsum, got {layout!r}")
        if assistant_turns not in ("all", "last"):
            raise DataError(f"data.assistant_turns: expected 'all' or 'last', got {assistant_turns!r}")
        if split_replies not in ("never", "evaluation", "always"):
            raise DataError(f"data.split_replies: expected never, evaluation or always, got {split_replies!r}")
        if system_prompt is not None and not system_prompt.strip():
            raise DataError("data.system_prompt: expected a non-empty text or null")
        self.layout = layout
        self.conversation_column = conversation_column
        self.response_column = response_column
        self.system_prompt = system_prompt
        self.assistant_turns = assistant_turns
        self.split_replies = split_replies
        self.assistant_speaker = assistant_speaker
        self.padding_free = padding_free
        self.reply_starts: dict[str, np.ndarray] = {}
        self._source = "data"  # the file being encoded (for error messages from encode)

    def cache_key_params(self) -> dict[str, Any]:
        return {**super().cache_key_params(), "layout": self.layout, "column": self.conversation_column,
                "response": self.response_column, "system": self.system_prompt, "turns": self.assistant_turns,
                "split_replies": self.split_replies, "speaker": self.assistant_speaker,
                "chat_template": getattr(self._get_tokenizer(), "chat_template", None)}

    # ---- records -------------------------------------------------------------------------------

    def _layout(self, first: dict[str, Any], source: str) -> tuple[str, str]:
        """The layout and the column holding the conversation, found in the first record."""
        found = ", ".join(first)
        layout, column = self.layout, self.conversation_column
        if column is None:
            default = {"history": ("history",), "dialogsum": ("dialogue",)}.get(layout, TURN_COLUMNS)
            if layout == "auto":
                default = (*TURN_COLUMNS, "history", "dialogue")
            column = next((c for c in default if c in first), None)
        if layout == "auto" and column is not None:
            value = first.get(column)
            if column == "history" or self.response_column in first:
                layout = "history"
            elif isinstance(value, str):
                layout = "dialogsum"
            elif isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
                layout = "sharegpt"
            else:
                layout = "messages"
        if column is None or column not in first:
            wanted = f"'{column}'" if column else "found (looked for messages, conversations, history, dialogue, ...)"
            raise DataError(f"{source}: no conversation column {wanted}; columns found: {found} "
                            "(set data.conversation_column or data.layout)")
        return layout, column

    def _turn(self, item: Any, layout: str, where: str, field: str) -> Turn:
        keys = ("from", "value") if layout == "sharegpt" else ("role", "content")
        if not isinstance(item, dict) or keys[0] not in item or keys[1] not in item:
            raise DataError(f"{where}: {field} must be an object with '{keys[0]}' and '{keys[1]}', got {item!r:.80}")
        role, content = item[keys[0]], item[keys[1]]
        if role not in ROLES:
            raise DataError(f"{where}: {field}.{keys[0]} {role!r} is not a known role ({', '.join(ROLES)})")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: {field}.{keys[1]} must be a non-empty string, got {content!r:.80}")
        return {"role": ROLES[role], "content": content.strip()}

    def _conversation(self, rec: dict[str, Any], layout: str, column: str, split: str, where: str) -> list[Turn]:
        """Every turn of one record, its system message first when it has one."""
        value = rec.get(column)
        if layout == "dialogsum":
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: '{column}' must be a non-empty transcript string, got {value!r:.80}")
            turns = parse_transcript(value, self.assistant_speaker, where)
        elif layout == "history":
            if isinstance(value, str) and value.strip():
                turns = [{"role": "user", "content": value.strip()}]
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                turns = [self._turn(v, "messages", where, f"{column}[{i}]") for i, v in enumerate(value)]
            elif isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
                # the last history turn is the user's (the response answers it); roles alternate backwards from it
                turns = [{"role": "user" if (len(value) - i) % 2 else "assistant", "content": v.strip()}
                         for i, v in enumerate(value)]
            else:
                raise DataError(f"{where}: '{column}' must be a non-empty string or a list of turns, got {value!r:.80}")
            response = rec.get(self.response_column)
            if response is not None or not split.startswith("predict"):
                if not isinstance(response, str) or not response.strip():
                    raise DataError(f"{where}: '{self.response_column}' must be a non-empty string, "
                                    f"got {response!r:.80}")
                turns.append({"role": "assistant", "content": response.strip()})
        else:
            if not isinstance(value, list) or not value:
                raise DataError(f"{where}: '{column}' must be a non-empty list of turns, got {value!r:.80}")
            turns = [self._turn(v, layout, where, f"{column}[{i}]") for i, v in enumerate(value)]
        for i, turn in enumerate(turns[1:], 1):
            if turn["role"] == "system":
                raise DataError(f"{where}: turn {i} is a system message; only the first turn may be one")
        if turns[0]["role"] != "system":
            system = rec.get("system") if isinstance(rec.get("system"), str) and rec["system"].strip() else None
            system = system or self.system_prompt
            if system:
                turns.insert(0, {"role": "system", "content": system.strip()})
        return turns

    def canonical_columns(self, records: list[dict[str, Any]], lines: list[int], split: str,
                          source: str) -> dict[str, list]:
        self._check_tokenizer()
        self._source = source
        layout, column = self._layout(records[0], source)
        out: dict[str, list] = {"history": [], "reference": [], "reply_only": [], "line": []}
        trailing = 0
        for rec, line in zip(records, lines):
            where = f"{source}:{line}"
            turns = self._conversation(rec, layout, column, split, where)
            head = turns[:1] if turns[0]["role"] == "system" else []
            body = turns[len(head):]
            if not body:
                raise DataError(f"{where}: the conversation has no user or assistant turn")
            # replies that answer something: an assistant turn that opens the conversation is context
            replies = [i for i, t in enumerate(body) if t["role"] == "assistant" and i > 0]
            predict = split.partition("/")[0] == "predict"  # predict/<name>: one of several named predict sets
            if not replies and not predict:
                raise DataError(f"{where}: the conversation has no assistant reply to learn (an assistant turn after "
                                "a user turn)")
            examples: list[tuple[list[Turn], str | None]] = []
            split_up = self.split_replies == "always" or (self.split_replies == "evaluation" and split != "train")
            if split_up:
                examples = [(head + body[:i], body[i]["content"]) for i in replies]
                if predict and (body[-1]["role"] != "assistant" or not examples):
                    examples.append((head + body, None))
            elif predict and (not replies or replies[-1] != len(body) - 1):
                examples = [(head + body, None)]
            else:
                last = replies[-1]
                trailing += last < len(body) - 1
                examples = [(head + body[:last], body[last]["content"])]
            for history, reference in examples:
                out["history"].append(history)
                out["reference"].append(reference)
                out["reply_only"].append(split_up)
                out["line"].append(line)
        if trailing:
            rank_zero_info(f"{source}: {trailing} conversation(s) end with turns after their last assistant reply; "
                           "those turns teach nothing and were left out")
        return out

    def _check_tokenizer(self) -> None:
        tok = self._get_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise DataError("the tokenizer has no chat template: set model.chat_template (a Jinja template or a "
                            ".jinja file)")
        if not getattr(tok, "is_fast", False):
            raise DataError(f"{type(tok).__name__} is not a fast tokenizer: locating the assistant turns needs the "
                            "character offsets only fast (tokenizers-backed) tokenizers give")

    # ---- features ------------------------------------------------------------------------------

    def encode(self, batch: dict[str, list]) -> dict[str, list]:
        tok = self._get_tokenizer()
        specials = special_token_ids(tok)
        out: dict[str, list] = {"input_ids": [], "labels": [], "reply_start": [], "dropped_turns": [],
                                "too_long": []}
        lines = batch.get("line") or [None] * len(batch["history"])
        reply_only = batch.get("reply_only") or [False] * len(batch["history"])
        for history, reference, only, line in zip(batch["history"], batch["reference"], reply_only, lines):
            history = [{"role": t["role"], "content": t["content"]} for t in history]
            try:
                features = self._encode_conversation(tok, specials, history, reference, only)
            except TemplateError as e:  # a template's own refusal (raise_exception: "roles must alternate", ...)
                raise DataError(f"{self._source}:{line}: the chat template cannot render this conversation: "
                                f"{first_line(e)}") from None
            for key, value in features.items():
                out[key].append(value)
        return out

    def _encode_conversation(self, tok: Any, specials: set[int], history: list[Turn], reference: str | None,
                             reply_only: bool = False) -> dict[str, Any]:
        system = history[:1] if history and history[0]["role"] == "system" else []
        turns = history[len(system):] + ([{"role": "assistant", "content": reference}] if reference is not None else [])
        # where a window may start: turn 0, any later user turn, and at the latest the turn before the reply
        latest = max(len(turns) - 2, 0) if reference is not None else len(turns) - 1
        starts = [0] + [k for k in range(1, latest + 1) if turns[k]["role"] == "user"]
        if starts[-1] != latest:
            starts.append(latest)
        windows: dict[int, tuple[str, Any]] = {}

        def window(j: int) -> tuple[str, Any]:
            if j not in windows:
                text = render(tok, system + turns[starts[j]:], generation_prompt=reference is None)
                windows[j] = (text, tok(text, add_special_tokens=False, return_offsets_mapping=True))
            return windows[j]

        # dropping turns only shortens the text: the first start that fits is found by bisection
        lo, hi = 0, len(starts) - 1
        if len(window(0)[1]["input_ids"]) > self.max_seq_length:
            lo = 1
            while lo < hi:
                mid = (lo + hi) // 2
                if len(window(mid)[1]["input_ids"]) <= self.max_seq_length:
                    hi = mid
                else:
                    lo = mid + 1
            lo = min(lo, len(starts) - 1)
        text, enc = window(lo)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        messages = system + turns[starts[lo]:]
        labels = [IGNORE_INDEX] * len(ids)
        reply_start = len(ids)
        if reference is not None:
            first = len(system)
            learned = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > first]
            if self.assistant_turns == "last" or reply_only:  # a split-off reply is learned in its own example only
                learned = learned[-1:]
            for i in learned:
                head = render(tok, messages[:i], generation_prompt=True)
                if not text.startswith(head):
                    raise DataError("the chat template does not render a conversation as the rendering of its first "
                                    "turns followed by the rest, so the assistant turns cannot be located; use a "
                                    "template that does (set model.chat_template)")
                self._label_turn(ids, offsets, labels, specials, text, len(head), messages[i]["content"])
            head = render(tok, messages[:-1], generation_prompt=True)
            reply_start = sum(1 for start, _ in offsets if start < len(head))
        return {"input_ids": ids, "labels": labels, "reply_start": reply_start, "dropped_turns": starts[lo],
                "too_long": len(ids) > self.max_seq_length}

    @staticmethod
    def _label_turn(ids: list[int], offsets: list[tuple[int, int]], labels: list[int], specials: set[int], text: str,
                    begin: int, content: str) -> None:
        """Copy into ``labels`` the tokens of one assistant turn: those overlapping its text, then up to and
        including the first special token after it (the end-of-turn marker the model learns to stop with)."""
        start = text.find(content, begin)
        if start < 0:  # templates that trim the text
            content = content.strip()
            start = text.find(content, begin)
        if start < 0:
            raise DataError("the chat template does not write the assistant's text as it is, so its tokens cannot be "
                            f"located (looked for {content[:40]!r}); use a template that does (model.chat_template)")
        end = start + len(content)
        marker = False
        for t, (s, e) in enumerate(offsets):
            if e > start and s < end and e > s:
                labels[t] = ids[t]
            elif s >= end and not marker:
                labels[t] = ids[t]
                marker = ids[t] in specials
                if marker:
                    break
        if not marker:
            raise DataError("the chat template ends assistant turns with no special token, so the model could not "
                            "learn where a reply stops; use a template that does (model.chat_template)")

    def resolve_schema(self, stage: str | None) -> None:
        """Report dropped turns; leave out conversations whose reply cannot fit (predict data: an error); publish
        the references per split and the system prompt (the export records it)."""
        self.schema.prompt = {"system_prompt": self.system_prompt}
        for split in list(self.datasets):
            ds, where = self.datasets[split], self._source_name(split)
            cut = sum(1 for n in ds["dropped_turns"] if n)
            if cut:
                rank_zero_info(f"{where}: {cut} of {len(ds)} examples lost their first turns to fit "
                               f"data.max_seq_length={self.max_seq_length}")
            too_long = np.asarray(ds["too_long"], dtype=bool)
            if too_long.any():
                line = ds[int(np.argmax(too_long))]["line"]
                if split.partition("/")[0] == "predict":
                    raise DataError(f"{where}:{line}: the last turn (with the system prompt) takes more than "
                                    f"data.max_seq_length={self.max_seq_length} tokens; raise data.max_seq_length")
                rank_zero_warn(f"{where}: {int(too_long.sum())} of {len(ds)} examples left out: the reply to learn and "
                               f"the turn before it take more than data.max_seq_length={self.max_seq_length} tokens "
                               f"(first at line {line})")
                if too_long.all():
                    raise DataError(f"{where}: no example fits data.max_seq_length={self.max_seq_length}; raise it")
                ds = self.datasets[split] = ds.select(np.flatnonzero(~too_long), keep_in_memory=True)
            self.reply_starts[split] = np.asarray(ds["reply_start"], dtype=np.int64)
            references = ds["reference"]
            if all(r is not None for r in references):
                self.schema.splits[split].references = [[r] for r in references]

    def extra_batch_columns(self, split: str) -> dict[str, np.ndarray]:
        return {"reply_start": self.reply_starts[split]}

    def make_collator(self, split: str, pad: dict[str, int]) -> Callable[[Any], dict[str, torch.Tensor]]:
        if split == "train" and self.padding_free:
            return collate_padding_free
        return super().make_collator(split, pad)


def collate_padding_free(batch: dict[str, Any] | list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """One row per batch: the examples' tokens end to end, ``position_ids`` restarting at 0 for each, no attention
    mask (transformers' packed-sequence masking keeps each example to itself) and the first label of every example
    ignored, so no example is trained to predict the next one's first token: what transformers'
    ``DataCollatorWithFlattening`` does to a list of rows, done here to a columnar batch (the data modules' batches)
    whose other columns stay one value per example."""
    if isinstance(batch, list):
        batch = batch[0]
    lengths = np.fromiter((len(x) for x in batch["input_ids"]), dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    labels = np.concatenate([np.asarray(x, dtype=np.int64) for x in batch["labels"]])
    labels[starts] = IGNORE_INDEX
    out = {
        "input_ids": torch.from_numpy(np.concatenate([np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]))[None],
        "labels": torch.from_numpy(labels)[None],
        "position_ids": torch.from_numpy(np.arange(lengths.sum()) - np.repeat(starts, lengths))[None],
    }
    out.update({name: column_tensor(rows) for name, rows in batch.items() if name not in out})
    return out
