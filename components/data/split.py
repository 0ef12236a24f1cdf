"""Split one dataset into per-site JSONL files (``flare-lora split``).

Simulates federated sites from a single file, either by a field (each distinct value goes to one
site, round-robin) or by a label-skewed Dirichlet partition, the usual non-IID benchmark setup.
Writes ``site-1.jsonl`` and ``site-1.eval.jsonl`` (held-out), ... into ``--out``; the
``site-k`` names match FLARE's default site names so ``load_site_data`` finds them.

Example (AG News, 3 sites, topic-skewed)::

    flare-lora split test.csv --out data/ag3 --dirichlet 0.3 --label-field label --sites 3 \\
        --instruction "Classify the topic of this news: {title}. {description}" \\
        --output-field label --output-map 1=World,2=Sports,3=Business,4=Sci/Tech

A CSV or Parquet file without ``--instruction`` is read as records directly (columns
``prompt``/``completion``, ``instruction``/``input``/``output`` or ``text``; a Parquet file may also
hold a ``messages`` column of chat turns, which CSV cells, plain strings, cannot).
"""

from __future__ import annotations

import argparse
import csv
import random
import string
import sys
from collections import Counter
from pathlib import Path

from flare_lora.components.data.records import DataError, jsonl_lines, load_jsonl, normalized, record_problem, write_jsonl

RECORD_KEYS = ("instruction", "input", "output", "text")


def dirichlet_split(labels: list, n_sites: int, alpha: float, seed: int) -> list[list[int]]:
    """Label-skewed partition: each label's indices are spread over sites by Dirichlet(alpha).

    Small alpha gives each site few labels; large alpha approaches an IID split. Every index is
    assigned exactly once, and no site is left empty when there are at least n_sites items
    (an empty site takes one item from the largest).
    """
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = random.Random(seed)
    sites: list[list[int]] = [[] for _ in range(n_sites)]
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(str(label), []).append(index)
    for label in sorted(by_label):
        indices = by_label[label]
        rng.shuffle(indices)
        weights = [rng.gammavariate(alpha, 1.0) for _ in range(n_sites)]
        total = sum(weights)
        if total == 0.0:  # every draw underflowed (tiny alpha): give the label to one site
            weights, total = [0.0] * n_sites, 1.0
            weights[rng.randrange(n_sites)] = 1.0
        start, cumulative = 0, 0.0
        for site, weight in enumerate(weights):
            cumulative += weight
            end = len(indices) if site == n_sites - 1 else round(cumulative / total * len(indices))
            sites[site].extend(indices[start:end])
            start = end
    for site in sites:
        if not site and len(labels) >= n_sites:
            site.append(max(sites, key=len).pop())
    return [sorted(site) for site in sites]


def split_by_field(records: list[dict], field: str, n_sites: int) -> list[list[int]]:
    """Give each distinct value of ``field`` (sorted) to a site, round-robin over n_sites."""
    for number, record in enumerate(records, start=1):
        if field not in record:
            raise DataError(f"record {number} has no field {field!r}; it has {sorted(record)}")
    values = sorted({str(record[field]) for record in records})
    if n_sites < 1 or n_sites > len(values):
        raise DataError(
            f"field {field!r} has {len(values)} distinct values {values[:10]}, "
            f"cannot fill {n_sites} sites (expected 1..{len(values)})"
        )
    site_of = {value: i % n_sites for i, value in enumerate(values)}
    sites: list[list[int]] = [[] for _ in range(n_sites)]
    for index, record in enumerate(records):
        sites[site_of[str(record[field])]].append(index)
    return sites


def _template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _parse_map(text: str | None) -> dict[str, str] | None:
    if text is None:
        return None
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise DataError(f"--output-map: expected KEY=VALUE,KEY=VALUE..., got {text!r}")
    return {key.strip(): value.strip() for key, value in pairs}


def read_csv(path: Path, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """CSV rows as records (templated when --instruction is given) and each row's path:line."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # a clinical note may exceed csv's 128 KB cell default
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # Excel writes a BOM
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []

            def rows():
                for row in reader:
                    location = f"{path}:{reader.line_num}"
                    if None in row or None in row.values():
                        raise DataError(f"{location}: expected {len(columns)} columns like the header")
                    yield location, row

            return table_records(path, columns, rows(), args)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read CSV {path}: {exc}") from exc


def read_parquet(path: Path, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Parquet rows as records, like CSV rows; each row's path and row number."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (`pip install flare-lora[data]`)") from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"cannot read Parquet {path}: {exc}") from exc
    rows = ((f"{path} row {n}", {k: v for k, v in row.items() if v is not None})
            for n, row in enumerate(table.to_pylist(), start=1))
    return table_records(path, table.column_names, rows, args)


def table_records(path: Path, columns: list[str], rows, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """(records, locations) from a table's (location, row) pairs: templated when --instruction is
    given, else each row is a record itself (columns messages, prompt/completion, instruction/output or text)."""
    output_map = _parse_map(args.output_map)
    templates = [t for t in (args.instruction, args.input, args.output_template) if t]
    needed = set().union(*map(_template_fields, templates)) | ({args.output_field} if args.output_field else set())
    missing = sorted(needed - set(columns))
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the header has {columns}")
    records, where = [], []
    for location, row in rows:
        record = _row_record(row, args, output_map, location) if args.instruction else row
        problem = record_problem(record)
        if problem:
            raise DataError(f"{location}: {problem}")
        records.append(normalized(record))
        where.append(location)
    return records, where


def _row_record(row: dict, args, output_map: dict | None, location: str) -> dict:
    """Fill the templates from one row; other columns are kept (e.g. a label for splitting)."""
    if args.output_template:
        output = args.output_template.format_map(row)
    else:
        output = row[args.output_field]
        if output_map is not None:
            if output not in output_map:
                raise DataError(
                    f"{location}: {args.output_field}={output!r} is not in --output-map "
                    f"(keys {sorted(output_map)})"
                )
            output = output_map[output]
    used = _template_fields(args.instruction) | _template_fields(args.input or "")
    record = {k: v for k, v in row.items() if k not in used and k not in RECORD_KEYS}
    record["instruction"] = args.instruction.format_map(row)
    if args.input:
        record["input"] = args.input.format_map(row)
    record["output"] = output
    return record


def read_records(path: Path, args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Records from a .jsonl, .csv or .parquet file, with each record's location for error messages."""
    if path.suffix in (".csv", ".parquet"):
        return (read_csv if path.suffix == ".csv" else read_parquet)(path, args)
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: expected a .jsonl, .csv or .parquet file, got suffix {path.suffix!r}")
    if args.instruction or args.output_field or args.output_template:
        raise DataError("--instruction/--output-field/--output-template apply only to CSV and Parquet input")
    records = load_jsonl(path)
    lines = jsonl_lines(path)
    where = [f"{path}:{n}" for n, line in enumerate(lines, start=1) if line.strip()]
    return records, where


def _labels(records: list[dict], where: list[str], field: str) -> list[str]:
    for record, location in zip(records, where):
        if field not in record:
            raise DataError(f"{location}: record has no field {field!r}; it has {sorted(record)}")
    return [str(record[field]) for record in records]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flare-lora split", description="Split a JSONL, CSV or Parquet dataset into per-site files."
    )
    p.add_argument("path", type=Path, help="input .jsonl, .csv or .parquet")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--by-field", metavar="NAME", help="one site per distinct value (round-robin)")
    how.add_argument("--dirichlet", type=float, metavar="ALPHA", help="label-skewed split")
    p.add_argument("--label-field", metavar="NAME", help="label for --dirichlet")
    p.add_argument("--sites", type=int, help="number of sites (--by-field: one per value)")
    p.add_argument("--eval-fraction", type=float, default=0.2, help="held out per site (0.2)")
    p.add_argument("--max-per-site", type=int, help="cap on records per site (train + eval)")
    p.add_argument("--seed", type=int, default=0)
    csv_group = p.add_argument_group("CSV / Parquet columns to instruction records ({column} placeholders)")
    csv_group.add_argument("--instruction", metavar="TEMPLATE")
    csv_group.add_argument("--input", metavar="TEMPLATE", help="optional input template")
    out = csv_group.add_mutually_exclusive_group()
    out.add_argument("--output-field", metavar="COLUMN")
    out.add_argument("--output-template", metavar="TEMPLATE")
    csv_group.add_argument("--output-map", metavar="K=V,...", help="rename --output-field values")
    return p


def write_sites(records, labels, sites, args) -> None:
    """Shuffle, cap and hold out each site's records, write its files and print a summary."""
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for k, indices in enumerate(sites, start=1):
        indices = list(indices)
        rng.shuffle(indices)
        indices = indices[: args.max_per_site] if args.max_per_site else indices
        n_eval = min(round(args.eval_fraction * len(indices)), max(len(indices) - 1, 0))
        eval_part, train_part = indices[:n_eval], indices[n_eval:]
        write_jsonl(args.out / f"site-{k}.jsonl", [records[i] for i in train_part])
        write_jsonl(args.out / f"site-{k}.eval.jsonl", [records[i] for i in eval_part])
        counts = Counter(labels[i] for i in indices)
        summary = ", ".join(f"{label}: {n}" for label, n in sorted(counts.items()))
        print(f"site-{k}: {len(train_part)} train, {len(eval_part)} eval | {summary}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a bad input prints one ``error:`` line and returns 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.dirichlet is not None and (args.label_field is None or args.sites is None):
        parser.error("--dirichlet needs --label-field and --sites")
    if args.instruction and not (args.output_field or args.output_template):
        parser.error("--instruction needs --output-field or --output-template")
    if args.output_map and not args.output_field:
        parser.error("--output-map needs --output-field")
    if not 0 <= args.eval_fraction < 1:
        parser.error(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    if args.dirichlet is not None and args.dirichlet <= 0:
        parser.error(f"--dirichlet ALPHA must be > 0, got {args.dirichlet}")
    if args.sites is not None and args.sites < 1:
        parser.error(f"--sites must be >= 1, got {args.sites}")
    if args.max_per_site is not None and args.max_per_site < 2:
        parser.error(f"--max-per-site must be >= 2, got {args.max_per_site}")
    try:
        records, where = read_records(args.path, args)
        label_field = args.label_field or args.by_field
        labels = _labels(records, where, label_field)
        if args.by_field:
            n_sites = args.sites or len(set(labels))
            sites = split_by_field(records, args.by_field, n_sites)
        else:
            sites = dirichlet_split(labels, args.sites, args.dirichlet, args.seed)
        write_sites(records, labels, sites, args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
