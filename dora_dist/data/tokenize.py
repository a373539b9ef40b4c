"""Raw examples -> token ids and labels (-100 where no loss is taken), then optional packing.

Formats:
  text               {"text": ...}                          loss on every token
  prompt_completion  {"prompt": ..., "completion": ...}     loss on the completion (and EOS) only
  chat               {"messages": [{"role", "content"}...]} rendered with the tokenizer's chat template; loss on
                                                            the assistant turns only
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dora_dist.errors import DataError

IGNORE_INDEX = -100


def detect_format(columns: list[str], dcfg) -> str:
    if dcfg.format != "auto":
        needed = {
            "text": [dcfg.text_field],
            "prompt_completion": [dcfg.prompt_field, dcfg.completion_field],
            "chat": [dcfg.messages_field],
        }[dcfg.format]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(
                f"data.format={dcfg.format} needs field(s) {missing} but the data set has columns "
                f"{columns}: set {_field_keys(dcfg.format)} to the column(s) holding them, or data.format"
            )
        return dcfg.format
    if dcfg.messages_field in columns:
        return "chat"
    if dcfg.prompt_field in columns and dcfg.completion_field in columns:
        return "prompt_completion"
    if dcfg.text_field in columns:
        return "text"
    raise DataError(
        f"cannot tell the data format from columns {columns}: expected '{dcfg.text_field}' (text), "
        f"'{dcfg.prompt_field}'+'{dcfg.completion_field}' (prompt_completion) or "
        f"'{dcfg.messages_field}' (chat); set data.format and the data.*_field keys"
    )


def _field_keys(fmt: str) -> str:
    return {
        "text": "data.text_field",
        "prompt_completion": "data.prompt_field / data.completion_field",
        "chat": "data.messages_field",
    }[fmt]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    return (
        [tokenizer.bos_token_id]
        if getattr(tokenizer, "bos_token_id", None) is not None
        and getattr(tokenizer, "add_bos_token", True)
        and tokenizer.bos_token_id != tokenizer.eos_token_id
        else []
    )


def encode_text(tokenizer, text: str, add_eos: bool) -> tuple[list[int], list[int]]:
    ids = _bos(tokenizer) + _ids(tokenizer, text)
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


def encode_prompt_completion(tokenizer, prompt: str, completion: str, add_eos: bool) -> tuple[list[int], list[int]]:
    p = _bos(tokenizer) + _ids(tokenizer, prompt)
    c = _ids(tokenizer, completion)
    if add_eos and tokenizer.eos_token_id is not None:
        c.append(tokenizer.eos_token_id)
    return p + c, [IGNORE_INDEX] * len(p) + c


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages: list[dict], add_eos: bool) -> tuple[list[int], list[int]]:
    """Render with the chat template; label only the characters of assistant turns.

    An assistant turn's span is the text between the rendering of the conversation before it (with the generation
    prompt) and the rendering including it; tokens starting inside a span get labels.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat data needs a tokenizer with a chat template (tokenizer.chat_template is not set)")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise DataError("each chat example must be a list of {'role': ..., 'content': ...} messages")
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else _render(tokenizer, [], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise DataError("the chat template is not prefix-stable; cannot locate assistant turns for the loss mask")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [
        tok if any(s <= off[0] < e for s, e in spans) else IGNORE_INDEX for tok, off in zip(ids, offsets, strict=True)
    ]
    if add_eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if spans else IGNORE_INDEX)
    return ids, labels


def check_chat_template(fmt: str, tokenizer, dcfg) -> None:
    """Chat data is rendered through the tokenizer's chat template: refuse a tokenizer without one up front."""
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"data.format=chat (field '{dcfg.messages_field}') needs a tokenizer with a chat template, "
            f"and the tokenizer {name!r} has none: set model.tokenizer to one that has, or use "
            "data.format=text / prompt_completion"
        )


def _numbered(index: int) -> str:
    return f"number {index + 1}"


def check_lengths(
    encoded: list[tuple[list[int], list[int]]], dcfg, what: str = "training", where: Callable[[int], str] = _numbered
) -> None:
    """Refuse examples that data.seq_len cannot hold: a prompt (the tokens before the first one with a loss) as
    long as seq_len, whose completion would be cut off or split from it; and a data set in which every example is
    longer than seq_len (all would be truncated, packed or not: seq_len is surely too small)."""
    seq_len = dcfg.seq_len
    for index, (_, labels) in enumerate(encoded):
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if first is not None and first >= seq_len:
            raise DataError(
                f"{what} example {where(index)}: its prompt is {first} tokens, not shorter than "
                f"data.seq_len={seq_len}, so its completion does not fit; raise data.seq_len or shorten "
                "the prompt"
            )
    if encoded and all(len(ids) > seq_len for ids, _ in encoded):
        shortest = min(len(ids) for ids, _ in encoded)
        raise DataError(
            f"every {what} example is longer than data.seq_len={seq_len} tokens (the shortest has "
            f"{shortest}) and would be truncated; raise data.seq_len (packing never splits an example)"
        )


def encode_example(
    example: dict[str, Any],
    fmt: str,
    tokenizer,
    dcfg,
    index: int | None = None,
    where: Callable[[int], str] = _numbered,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example; `where(index)` names it in an error ("at line 3 of data.jsonl")."""
    if fmt == "text":
        text = example[dcfg.text_field]
        if not isinstance(text, str):
            at = f" in the example {where(index)}" if index is not None else ""
            raise DataError(f"data field '{dcfg.text_field}' must be a string{at}, got {type(text).__name__}")
        return encode_text(tokenizer, text, dcfg.add_eos)
    if fmt == "prompt_completion":
        return encode_prompt_completion(
            tokenizer, example[dcfg.prompt_field], example[dcfg.completion_field], dcfg.add_eos
        )
    return encode_chat(tokenizer, example[dcfg.messages_field], dcfg.add_eos)


def truncate(examples, seq_len: int):
    return [(ids[:seq_len], labels[:seq_len]) for ids, labels in examples]


def n_targets(labels: list[int]) -> int:
    """Tokens that get a loss after the causal shift (labels[1:] not ignored)."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)
