"""One site's train and eval records: the user's JSONL files, or the embedded default data."""

from __future__ import annotations

import random
from pathlib import Path

from flare_lora.components.data.records import DataError, load_jsonl
from flare_lora.components.data.synthetic import default_site_data


def load_site_data(
    data_dir: str | None,
    site_name: str,
    site_index: int,
    *,
    eval_fraction: float = 0.2,
    n_train: int = 64,
    n_eval: int = 16,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """(train, eval) records for ``site_name``.

    With no data_dir: the embedded default data for ``site_index`` (n_train, n_eval, seed).
    Otherwise ``<data_dir>/<site_name>.jsonl``, plus ``<site_name>.eval.jsonl`` when it exists (or,
    where a site maps a dataset to its own file, that ``<name>.jsonl`` and ``<name>.eval.jsonl``);
    without that file a seeded shuffle holds out ``eval_fraction`` of the records, so every run
    (and every round) evaluates on the same records.
    """
    if data_dir is None:
        return default_site_data(site_index, n_train=n_train, n_eval=n_eval, seed=seed)
    directory, stem = Path(data_dir), site_name
    if directory.is_file():  # this site's own records file
        directory, stem = directory.parent, directory.name.removesuffix(".jsonl")
    train_path = directory / f"{stem}.jsonl"
    if not train_path.is_file():
        if not directory.is_dir():
            there = f"{directory} does not exist"
        else:
            there = f"{directory} has {sorted(p.name for p in directory.glob('*.jsonl'))}"
        raise DataError(f"no data for site {site_name!r}: expected {train_path}; {there}")
    train = load_jsonl(train_path)
    if not train:
        raise DataError(f"site {site_name!r} has 0 training records: {train_path} is empty")
    eval_path = directory / f"{stem}.eval.jsonl"
    if eval_path.is_file():
        evaluation = load_jsonl(eval_path)
    else:
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_held = round(eval_fraction * len(train))
        if n_held == len(train):
            raise DataError(
                f"site {site_name!r}: eval_fraction={eval_fraction} holds out all "
                f"{len(train)} records of {train_path}, leaving 0 for training"
            )
        evaluation = [train[i] for i in sorted(order[:n_held])]
        train = [train[i] for i in sorted(order[n_held:])]
    return train, evaluation
