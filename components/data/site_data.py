"""One site's train and eval records: the user's JSONL files, or the embedded default data."""

from __future__ import annotations

import random
from pathlib import Path

from flare_lora.components.data.records import DataError, load_jsonl, normalized, record_problem
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
    A folder ``datasets.save_to_disk`` wrote (``data_dir`` itself, a site's own mapping, or
    ``<data_dir>/<site_name>/``) is read with its eval/validation/test split when it has one.
    Otherwise ``<data_dir>/<site_name>.jsonl``, plus ``<site_name>.eval.jsonl`` when it exists (or,
    where a site maps a dataset to its own file, that ``<name>.jsonl`` and ``<name>.eval.jsonl``);
    without that file a seeded shuffle holds out ``eval_fraction`` of the records, so every run
    (and every round) evaluates on the same records.
    """
    if data_dir is None:
        return default_site_data(site_index, n_train=n_train, n_eval=n_eval, seed=seed)
    saved = next((p for p in (Path(data_dir), Path(data_dir) / site_name) if is_saved_dataset(p)), None)
    if saved is not None:
        train, evaluation = load_saved_dataset(saved)
        return (train, evaluation) if evaluation is not None else hold_out(train, eval_fraction, seed, site_name, saved)
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
        return train, load_jsonl(eval_path)
    return hold_out(train, eval_fraction, seed, site_name, train_path)


def hold_out(train: list[dict], eval_fraction: float, seed: int, site_name: str, path) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle holds out ``eval_fraction`` of the records: the same ones every run and round."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_held = round(eval_fraction * len(train))
    if n_held == len(train):
        raise DataError(f"site {site_name!r}: eval_fraction={eval_fraction} holds out all "
                        f"{len(train)} records of {path}, leaving 0 for training")
    return [train[i] for i in sorted(order[n_held:])], [train[i] for i in sorted(order[:n_held])]


SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # what datasets.save_to_disk writes
EVAL_SPLITS = ("eval", "validation", "test")


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in SAVED_MARKERS)


def load_saved_dataset(path: Path) -> tuple[list[dict], list[dict] | None]:
    """(train, eval or None) of a ``datasets.save_to_disk`` folder: a Dataset, or a DatasetDict with
    a "train" split and optionally an eval/validation/test split."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a saved Hugging Face dataset; reading it needs `pip install flare-lora[data]`") from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: expected a \"train\" split, got splits {sorted(loaded)}")
        held = next((name for name in EVAL_SPLITS if name in loaded), None)
        return (_rows(loaded["train"], f"{path} split train"),
                _rows(loaded[held], f"{path} split {held}") if held else None)
    return _rows(loaded, str(path)), None


def _rows(dataset, where: str) -> list[dict]:
    rows = []
    for number, row in enumerate(dataset, start=1):
        row = {k: v for k, v in row.items() if v is not None}  # a column some rows lack reads None
        problem = record_problem(row)
        if problem:
            raise DataError(f"{where}: row {number}: {problem}")
        rows.append(normalized(row))
    if not rows:
        raise DataError(f"{where}: 0 records")
    return rows
