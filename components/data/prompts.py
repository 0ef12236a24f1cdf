"""Prompt formatting, tokenization with prompt masking, batching and exact-match scoring.

Training and evaluation share ``format_prompt`` so the model is scored on exactly the prompt it
was trained to answer.
"""

from __future__ import annotations

import re

import torch

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips

_ALPACA = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def _user_message(record: dict) -> str:
    extra = record.get("input") or ""
    return record["instruction"] + ("\n\n" + extra if extra else "")


def format_prompt(tokenizer, record: dict) -> str:
    """The text the model sees before an instruction record's answer ("" for text records).

    Uses the tokenizer's chat template (one user message, generation prompt added) when it has
    one, otherwise an Alpaca-style prompt.
    """
    if "instruction" not in record:
        return ""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": _user_message(record)}],
            tokenize=False,
            add_generation_prompt=True,
        )
    extra = record.get("input") or ""
    input_block = f"### Input:\n{extra}\n\n" if extra else ""
    return _ALPACA.format(instruction=record["instruction"], input_block=input_block)


def _chat_text(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    """``messages`` rendered by the tokenizer's chat template, or (without one) as ``### Role:`` blocks."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    text = "".join(f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages)
    return text + ("### Assistant:\n" if generation_prompt else "")


def chat_pieces(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """A conversation as (text, trained) pieces whose concatenation is its rendering: each assistant
    turn (with the template's end-of-turn marker) is trained, everything before it is context.

    ValueError when the chat template renders a conversation's start differently from the whole
    (then no turn boundary is well defined)."""
    pieces, done = [], ""
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _chat_text(tokenizer, messages[:j], True)
        full = _chat_text(tokenizer, messages[: j + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError(f"the chat template of {type(tokenizer).__name__} renders turn {j} of a conversation "
                             "differently from the conversation before it; train on one assistant turn per record")
        answer = full[len(prompt):] if getattr(tokenizer, "chat_template", None) else message["content"]
        pieces += [(prompt[len(done):], False), (answer, True)]
        done = full if getattr(tokenizer, "chat_template", None) else prompt + answer
    return pieces


def prompt_ids(tokenizer, record: dict) -> list[int]:
    """Token ids the model is given before the answer exact match scores (see records.reference)."""
    with_specials = not getattr(tokenizer, "chat_template", None)
    if "messages" in record:
        prompt = _chat_text(tokenizer, record["messages"][:-1], True)
        return tokenizer(prompt, add_special_tokens=with_specials)["input_ids"]
    if "prompt" in record:
        return tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
    prompt = format_prompt(tokenizer, record)
    if not prompt:
        return []
    return tokenizer(prompt, add_special_tokens=with_specials)["input_ids"]


def _segments(tokenizer, record: dict) -> list[tuple[list[int], bool]]:
    """(token ids, trained) segments of a record; the answer ends with eos so the model learns to stop."""
    eos = [tokenizer.eos_token_id]
    if "messages" in record:
        with_specials = not getattr(tokenizer, "chat_template", None)
        segments = []
        for i, (text, trained) in enumerate(chat_pieces(tokenizer, record["messages"])):
            ids = tokenizer(text, add_special_tokens=with_specials and i == 0)["input_ids"]
            segments.append((ids + (eos if trained and with_specials else []), trained))
        return segments
    if "prompt" in record:
        answer = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        return [(prompt_ids(tokenizer, record), False), (answer + eos, True)]
    if "instruction" in record:
        answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        return [(prompt_ids(tokenizer, record), False), (answer + eos, True)]
    return [(tokenizer(record["text"], add_special_tokens=True)["input_ids"] + eos, True)]


def full_length(tokenizer, record: dict) -> int:
    """Tokens in the record before any cut: above max_length, ``encode`` truncates it."""
    return sum(len(ids) for ids, _ in _segments(tokenizer, record))


def truncated(tokenizer, records: list[dict], max_length: int, where: str = "records") -> int:
    """How many of ``records`` are longer than max_length tokens (``encode`` cuts them); a record
    the tokenizer's chat template cannot split into turns fails here, at load, naming it."""
    cut = 0
    for number, record in enumerate(records, start=1):
        try:
            cut += full_length(tokenizer, record) > max_length
        except Exception as e:  # noqa: BLE001 - a chat template raises its own errors (jinja2's TemplateError, ...)
            raise ValueError(f"{where}: record {number} (of the split, in file order): {type(e).__name__}: {e}") from None
    return cut


def encode(tokenizer, record: dict, max_length: int) -> dict[str, list[int]]:
    """Tokenize a record into ``input_ids`` and ``labels`` (-100 on every untrained token).

    Too-long examples are cut from the right, keeping the start. A prompt-answer record whose
    prompt would leave no answer token has its prompt cut from the LEFT instead, so the answer's
    first tokens survive (an example with nothing to supervise would only waste a step); a
    conversation whose first max_length tokens hold no assistant token keeps its last ones.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token")
    segments = _segments(tokenizer, record)
    if len(segments) == 2 and not segments[0][1]:  # prompt, answer
        prompt, answer = segments[0][0], segments[1][0]
        n_answer = min(len(answer), max(1, max_length - len(prompt)))
        n_prompt = min(len(prompt), max_length - n_answer)
        prompt, answer = prompt[len(prompt) - n_prompt:], answer[:n_answer]
        return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * n_prompt + answer}
    ids = [t for seg, _ in segments for t in seg]
    labels = [t if trained else IGNORE_INDEX for seg, trained in segments for t in seg]
    window = slice(0, max_length)
    if all(label == IGNORE_INDEX for label in labels[window]):
        window = slice(max(0, len(ids) - max_length), len(ids))
    return {"input_ids": ids[window], "labels": labels[window]}


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples to the batch's longest: pad_id ids, -100 labels, 0 mask."""
    width = max(len(example["input_ids"]) for example in batch)
    input_ids, labels, attention_mask = [], [], []
    for example in batch:
        pad = width - len(example["input_ids"])
        input_ids.append(example["input_ids"] + [pad_id] * pad)
        labels.append(example["labels"] + [IGNORE_INDEX] * pad)
        attention_mask.append([1] * len(example["input_ids"]) + [0] * pad)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
    }


def normalize_answer(s: str) -> str:
    """Strip, collapse whitespace, drop trailing periods, casefold: "Positive." == "positive"."""
    return re.sub(r"\s+", " ", s.strip()).rstrip(".").strip().casefold()


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the prediction equals the reference after ``normalize_answer``."""
    return normalize_answer(prediction) == normalize_answer(reference)
