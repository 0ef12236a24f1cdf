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
    """The text the model sees before the answer ("" for text records: all of it is trained on).

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


def prompt_ids(tokenizer, record: dict) -> list[int]:
    """Token ids of ``format_prompt``; a chat template brings its own special tokens."""
    prompt = format_prompt(tokenizer, record)
    if not prompt:
        return []
    with_specials = not getattr(tokenizer, "chat_template", None)
    return tokenizer(prompt, add_special_tokens=with_specials)["input_ids"]


def encode(tokenizer, record: dict, max_length: int) -> dict[str, list[int]]:
    """Tokenize a record into ``input_ids`` and ``labels`` (-100 exactly on prompt tokens).

    The answer (or the whole text) ends with the eos token so the model learns to stop. Too-long
    examples are cut from the right, keeping the prompt's start. If that would leave no answer
    token, the prompt is cut from the LEFT instead so the answer's first tokens survive: an
    example with nothing to supervise would only waste a step.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token")
    prompt = prompt_ids(tokenizer, record)
    if "instruction" in record:
        answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    else:
        answer = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
    answer = answer + [tokenizer.eos_token_id]
    n_answer = min(len(answer), max(1, max_length - len(prompt)))
    n_prompt = min(len(prompt), max_length - n_answer)
    prompt, answer = prompt[len(prompt) - n_prompt:], answer[:n_answer]
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * n_prompt + answer}


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
