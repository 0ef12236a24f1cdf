"""Embedded default data: small templated tasks, a different mix per site.

Used by the demo when the user gives no ``--data``. Every task has a short answer that follows
from the input by a simple rule (so exact match is meaningful and a LoRA can learn it in a few
dozen steps), yet SmolLM2-135M-Instruct mostly fails it zero-shot because it rambles or formats
its answer wrongly.

Tasks (``DEFAULT_TASKS``):
- ``sentiment``: a two-clause review built from word lists -> ``positive`` / ``negative``.
- ``topic``: a templated headline -> ``sports`` / ``business`` / ``science`` / ``world``.
- ``larger_number``: two numbers -> the larger one.
- ``last_word``: a string of words -> its last word.

Mix per site (``site_index % 3``; any index >= 0 works), as shares of the records:
- site 0: sentiment 70 %, last_word 20 %, topic 5 %, larger_number 5 %
- site 1: topic 70 %, last_word 20 %, sentiment 5 %, larger_number 5 %
- site 2: larger_number 70 %, last_word 20 %, sentiment 5 %, topic 5 %

Train and eval records come from disjoint halves of each task's input space (a checksum of the
input decides), so no eval input appears in any site's training data, whatever the seed.
"""

from __future__ import annotations

import random
import zlib

DEFAULT_TASKS = ("sentiment", "topic", "larger_number", "last_word")

_INSTRUCTIONS = {
    "sentiment": "Reply with only the sentiment label (positive or negative) of this review.",
    "topic": "Reply with only the category (sports, business, science or world) of this headline.",
    "larger_number": "Reply with only the larger of these two numbers.",
    "last_word": "Reply with only the last word of this text.",
}

_SITE_MIX = (
    {"sentiment": 0.70, "last_word": 0.20, "topic": 0.05, "larger_number": 0.05},
    {"topic": 0.70, "last_word": 0.20, "sentiment": 0.05, "larger_number": 0.05},
    {"larger_number": 0.70, "last_word": 0.20, "sentiment": 0.05, "topic": 0.05},
)

_NOUNS = ("movie", "meal", "service", "hotel", "concert", "book", "game", "trip",
          "phone", "coffee", "show", "room", "staff", "music", "ride")
_MOOD = {
    "positive": ("great", "wonderful", "excellent", "delightful", "amazing",
                 "lovely", "fantastic", "superb", "pleasant", "brilliant"),
    "negative": ("terrible", "awful", "dreadful", "horrible", "disappointing",
                 "boring", "poor", "miserable", "annoying", "bland"),
}
_HEADLINES = {
    "sports": (
        ("The Lakers", "Real Madrid", "Serena Williams", "The Yankees", "Manchester United",
         "The Patriots", "Roger Federer", "The Red Sox"),
        ("won the final", "beat the champions", "signed a new coach", "clinched the title",
         "lost in overtime", "set a scoring record"),
    ),
    "business": (
        ("Apple shares", "Oil prices", "The central bank", "Wall Street", "Toyota",
         "Amazon profits", "The dollar", "Retail sales"),
        ("rose after the earnings report", "fell on weak demand", "cut interest rates",
         "beat forecasts", "announced a merger", "slumped as investors sold"),
    ),
    "science": (
        ("NASA", "Researchers", "A new telescope", "Biologists", "Physicists", "A Mars rover",
         "Chemists", "Astronomers"),
        ("discovered a new planet", "sequenced an ancient genome", "found water on the moon",
         "observed a distant galaxy", "developed a new vaccine", "measured a rare particle"),
    ),
    "world": (
        ("The UN", "Leaders in Europe", "Protesters in Cairo", "The prime minister",
         "Rebels in Sudan", "Diplomats in Geneva", "Voters in Brazil", "The Kremlin"),
        ("signed a peace deal", "called for a ceasefire", "held elections", "imposed sanctions",
         "met for summit talks", "rejected the treaty"),
    ),
}
_WHEN = ("", " on Monday", " this week", " again", " after a long delay", " amid surprise")
_WORDS = ("river", "lamp", "orange", "quiet", "stone", "window", "garden", "silver", "cloud",
          "pencil", "forest", "candle", "bridge", "yellow", "mirror", "tiger", "paper", "honey",
          "basket", "rocket", "violet", "castle", "pepper", "wagon", "marble", "feather",
          "planet", "button", "meadow", "copper")


def _sentiment(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(("positive", "negative"))
    first, second = rng.sample(_NOUNS, 2)
    a, b = rng.sample(_MOOD[label], 2)
    return f"The {first} was {a} and the {second} was {b}.", label


def _topic(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(tuple(_HEADLINES))
    subjects, verbs = _HEADLINES[label]
    return f"{rng.choice(subjects)} {rng.choice(verbs)}{rng.choice(_WHEN)}", label


def _larger_number(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 100), 2)
    return f"{a} {b}", str(max(a, b))


def _last_word(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 6))
    return " ".join(words), words[-1]


_GENERATORS = {
    "sentiment": _sentiment,
    "topic": _topic,
    "larger_number": _larger_number,
    "last_word": _last_word,
}


def _is_eval_input(task: str, text: str) -> bool:
    """A fixed quarter of each task's inputs is reserved for evaluation."""
    return zlib.crc32(f"{task}\n{text}".encode()) % 4 == 0


def _task_counts(mix: dict[str, float], n: int) -> dict[str, int]:
    """Exact per-task counts summing to n (largest remainder), so small sets keep the mix."""
    raw = {task: share * n for task, share in mix.items()}
    counts = {task: int(value) for task, value in raw.items()}
    by_remainder = sorted(mix, key=lambda task: (counts[task] - raw[task], task))
    for task in by_remainder[: n - sum(counts.values())]:
        counts[task] += 1
    return counts


def _sample(task: str, count: int, for_eval: bool, rng: random.Random) -> list[dict]:
    """``count`` distinct records of one task, drawn from its train or its eval inputs."""
    seen: set[str] = set()
    records = []
    for _ in range(100 * count + 1000):
        if len(records) == count:
            break
        text, answer = _GENERATORS[task](rng)
        if text in seen or _is_eval_input(task, text) != for_eval:
            continue
        seen.add(text)
        records.append({"instruction": _INSTRUCTIONS[task], "input": text, "output": answer,
                        "category": task})
    if len(records) < count:
        raise ValueError(f"task {task!r} cannot supply {count} distinct records; ask for fewer")
    return records


def default_site_data(
    site_index: int, n_train: int = 64, n_eval: int = 16, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, eval) instruction records for one site, with its own task mix."""
    if site_index < 0:
        raise ValueError(f"site_index must be >= 0, got {site_index}")
    mix = _SITE_MIX[site_index % len(_SITE_MIX)]
    splits = []
    for split, n, for_eval in (("train", n_train, False), ("eval", n_eval, True)):
        rng = random.Random(f"flare-lora-default:{seed}:{site_index}:{split}")
        records = [record for task, count in _task_counts(mix, n).items()
                   for record in _sample(task, count, for_eval, rng)]
        rng.shuffle(records)
        splits.append(records)
    return splits[0], splits[1]
