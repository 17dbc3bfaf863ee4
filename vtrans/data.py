"""Task data: read a CSV / TSV / JSONL / text file (optionally .gz) or a `datasets` name, check it, tokenize,
batch.

A classification table has a `text` column, an optional `text_pair` column and a `label` column. Plain text for
language modelling is a .txt file (paragraphs separated by blank lines), or rows with a `text` field.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from vtrans import distributed
from vtrans.errors import UsageError

DEMO_TRAIN = "rotten_tomatoes_train.csv.gz"
DEMO_TEST = "rotten_tomatoes_test.csv.gz"
DEFAULT_HOLDOUT = 0.1


def demo_path(name: str) -> str:
    return str(resources.files("vtrans") / "demo_data" / name)


@dataclass
class Table:
    text: list[str]
    labels: list
    source: str
    text_pair: list[str] | None = None

    def __len__(self):
        return len(self.text)

    def subset(self, rows: list[int]) -> "Table":
        pair = [self.text_pair[i] for i in rows] if self.text_pair is not None else None
        return Table([self.text[i] for i in rows], [self.labels[i] for i in rows], self.source, pair)

    def identity(self) -> list:
        """What the data is, for a cache key."""
        return [self.text, self.text_pair, self.labels]


def _open_text(path: Path):
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")  # -sig: spreadsheets write a BOM


def _read_rows(path: Path) -> list[dict]:
    name = path.name[:-3] if path.suffix == ".gz" else path.name
    try:
        with _open_text(path) as f:
            if name.endswith((".jsonl", ".json")):
                rows = []
                for number, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise ValueError(f"line {number} is not a JSON object")
                        rows.append(row)
                return rows
            if name.endswith((".csv", ".tsv")):
                return list(csv.DictReader(f, delimiter="\t" if name.endswith(".tsv") else ","))
    except (ValueError, UnicodeDecodeError, OSError, csv.Error, EOFError) as e:
        raise UsageError(f"--data {path}: cannot be read ({e}); give a UTF-8 CSV, TSV or JSONL file") from None
    raise UsageError(f"--data {path}: unknown file type; use .csv, .tsv, .jsonl or .json (optionally .gz)")


def read_dataset(name: str, split: str) -> list[dict]:
    import datasets  # imported here: slow to import, and only needed for names

    dataset_name, _, config = name.partition(":")
    try:
        return list(datasets.load_dataset(dataset_name, config or None, split=split))
    except Exception as e:  # noqa: BLE001 - any failure to fetch is the same user error
        raise UsageError(f"--data {name}: not a file here and `datasets.load_dataset` failed ({e}); "
                         "give a local CSV/JSONL path or a dataset name reachable from this machine") from None


def load_table(spec: str, split: str = "train") -> Table:
    """Read `spec` (a file, or a `datasets` name, optionally `name:config`) and check its columns."""
    path = Path(spec)
    rows = _read_rows(path) if path.exists() else read_dataset(spec, split)
    if not rows:
        raise UsageError(f"--data {spec}: no rows; give a file with a header and at least one example")
    columns = set(rows[0])
    for needed in ("text", "label"):
        if needed not in columns:
            raise UsageError(f"--data {spec}: no '{needed}' column (found: {', '.join(sorted(map(str, columns)))}); "
                             "rename the columns to text[, text_pair], label")
    missing = [i for i, row in enumerate(rows) if row.get("label") in (None, "") or row.get("text") is None]
    if missing:
        raise UsageError(f"--data {spec}: row {missing[0] + 1} has no text or label; "
                         f"{len(missing)} such rows in all: fill or drop them")
    pair = [str(r.get("text_pair") or "") for r in rows] if "text_pair" in columns else None
    return Table([str(r["text"]) for r in rows], [r["label"] for r in rows], spec, pair)


def label_ids(tables: list[Table], label2id: dict[str, int] | None, num_labels: int | None) -> dict:
    """Map the labels seen in `tables` to class ids, agreeing with a trained head when there is one.

    Integer labels (or their strings) are class ids. Other strings, for a trained head (label2id given),
    must match its label names (case aside), or this raises; without a head they take their sorted order.
    """
    values = sorted({str(v) for t in tables for v in t.labels})
    if all(v.lstrip("-").isdigit() for v in values):
        mapping = {v: int(v) for v in values}
    elif label2id is not None:
        names = {str(k).lower(): int(i) for k, i in label2id.items()}
        unknown = [v for v in values if v.lower() not in names]
        if unknown:
            raise UsageError(f"--data {tables[0].source}: label {unknown[0]!r} is not one of the head's labels "
                             f"({', '.join(map(str, label2id))}); use those names or class ids")
        mapping = {v: names[v.lower()] for v in values}
    else:
        mapping = {v: i for i, v in enumerate(values)}
    bad = [v for v, i in mapping.items() if i < 0 or (num_labels is not None and i >= num_labels)]
    if bad:
        raise UsageError(f"--data {tables[0].source}: label {bad[0]!r} does not fit the model's "
                         f"{num_labels}-class head; use labels 0..{(num_labels or 1) - 1} or the head's label names")
    return mapping


def stratified_indices(labels: list, fraction: float, seed: int) -> list[int]:
    """A reproducible, label-stratified sample of about `fraction` of the rows (at least one per label)."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(str(label), []).append(i)
    chosen = []
    for rows in by_label.values():
        rng.shuffle(rows)
        chosen += rows[: max(1, round(fraction * len(rows)))]
    return sorted(chosen)


def holdout_split(table: Table, fraction: float, seed: int) -> tuple[Table, Table]:
    """A reproducible, label-stratified held-out part of `table`."""
    held = set(stratified_indices(table.labels, fraction, seed))
    if len(held) >= len(table) or len(table) - len(held) < 2:
        raise UsageError(f"--data {table.source}: too few rows ({len(table)}) to hold out an evaluation part; "
                         "add rows or pass --eval-data")
    return table.subset([i for i in range(len(table)) if i not in held]), table.subset(sorted(held))


def example_count(batch: dict) -> int:
    """Examples in a batch: the rows of its model input (input_ids for text, pixel_values for images)."""
    inputs = batch.get("input_ids", batch.get("pixel_values"))
    return inputs.shape[0]


def token_mask(batch: dict, shape: tuple[int, int]) -> torch.Tensor:
    """(B, S) 1 on the real tokens of hidden states of `shape` (B, S): the batch's attention mask, or all ones
    where inputs are never padded (an image's patches)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask
    return torch.ones(tuple(shape), dtype=torch.long, device=next(iter(batch.values())).device)


class Examples(torch.utils.data.Dataset):
    """A dataset that batches itself. `strata` label each example for stratified samples (one stratum when
    there are no labels). Where `augments`, `augment` makes varied copies of its batches (see Augmented)."""

    strata: list
    augments: bool = False

    def collate(self, items) -> dict:
        raise NotImplementedError

    def augment(self, batch: dict, share: float, generator: torch.Generator) -> dict:
        """A varied copy of `batch`, without labels: the teacher's outputs are its targets."""
        raise NotImplementedError

    def loader(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        indices: list[int] | None = None,
        shard: bool = False,
        device: torch.device | None = None,
    ):
        """Batches of all examples, or of the examples at `indices`, on `device`. With `shard`, each
        data-parallel rank gets its rows of every batch (`batch_size` is the global batch; see distributed.py)."""
        data = self if indices is None else torch.utils.data.Subset(self, indices)
        generator = torch.Generator().manual_seed(seed)
        # a last batch with fewer rows than ranks would leave a rank nothing to compute: it is dropped
        too_small = shard and 0 < len(data) % batch_size < distributed.world_size()
        return torch.utils.data.DataLoader(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=Placed(self.collate, shard, device),
            generator=generator,
            drop_last=too_small,
        )


class Augmented:
    """A loader whose every batch is replaced by a varied copy (Examples.augment), for weights that learn from a
    small sample: on the sample itself they overfit it. The copies come from a seeded generator, so a run resumed
    while pruning, which draws again the batches it already saw, sees the same ones (one resumed while
    recovering starts from the state `order_state` saved where recovery began). Each data-parallel rank varies
    its own rows with a generator of its own. Anything else (the dataset, batch size, collate function) is the
    loader's: what scores units reads the data as it is."""

    def __init__(self, loader, examples: Examples, share: float, seed: int):
        self.loader = loader
        self.examples = examples
        self.share = share
        self.generator = torch.Generator().manual_seed(seed + 1_000_003 * distributed.rank())

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield self.examples.augment(batch, self.share, self.generator)

    def __getattr__(self, name):
        if name == "loader":  # not set yet (a copy being made): no loader to ask
            raise AttributeError(name)
        return getattr(self.loader, name)


def order_state(loader) -> dict[str, torch.Tensor]:
    """What decides the batches `loader` gives from now on: its shuffle's generator and, for varied copies,
    every rank's generator of the copies (one checkpoint, written by rank 0, serves every rank). A run resumed
    mid-phase draws and drops the batches it already saw (training.batches), so with this state, taken where the
    phase began, it sees the batches an uninterrupted run does."""
    if isinstance(loader, Augmented):
        copies = torch.stack(distributed.every_rank(loader.generator.get_state()))
        return {"copies": copies, **order_state(loader.loader)}
    return {"shuffle": loader.generator.get_state()}


def restore_order(loader, state: dict[str, torch.Tensor]) -> None:
    """Put `loader` back where `order_state` found it. Varied copies are restored where the number of processes
    is the one that saved them (with another, each rank's rows differ anyway)."""
    if isinstance(loader, Augmented):
        copies = distributed.own_row(state["copies"])
        if copies is not None:
            loader.generator.set_state(copies)
        loader = loader.loader
    loader.generator.set_state(state["shuffle"])


@dataclass
class Placed:
    """A collate function whose batches are cut to this rank's rows (`shard`) and moved to `device`."""

    collate: object
    shard: bool = False
    device: torch.device | None = None

    def __call__(self, items) -> dict:
        batch = self.collate(items)
        if self.shard:
            batch = distributed.shard(batch)
        if self.device is not None:
            batch = {name: value.to(self.device) for name, value in batch.items()}
        return batch


class Encoded(Examples):
    """Tokenized labelled examples; batches are padded to their longest member."""

    augments = True

    def __init__(self, table: Table, tokenizer, label_map: dict, max_length: int):
        pair = table.text_pair
        enc = tokenizer(table.text, pair, truncation=True, max_length=max_length)
        self.features = [{k: enc[k][i] for k in enc} for i in range(len(table))]
        self.labels = [label_map[str(v)] for v in table.labels]
        self.pad = tokenizer.pad
        self.max_length = max_length
        self.special_ids = torch.tensor(sorted(tokenizer.all_special_ids), dtype=torch.long)

    @property
    def strata(self) -> list:
        return self.labels

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return self.features[i], self.labels[i]

    def collate(self, items):
        batch = self.pad([f for f, _ in items], return_tensors="pt")
        batch["labels"] = torch.tensor([label for _, label in items])
        return dict(batch)

    def augment(self, batch, share, generator):
        """`share` of the real tokens (special tokens aside) replaced by real tokens drawn from the batch (this
        rank's rows of it).
        TinyBERT distils on task data varied likewise (it replaces words by similar ones; this needs no other
        model). The label goes: a replaced word may flip it."""
        ids = batch["input_ids"]
        real = batch["attention_mask"].bool() & ~torch.isin(ids, self.special_ids.to(ids.device))
        pool = ids[real]  # (real tokens in the batch,)
        replaced = real & (torch.rand(ids.shape, generator=generator) < share).to(ids.device)
        varied = ids.clone()
        if pool.numel():
            draws = torch.randint(pool.numel(), (int(replaced.sum()),), generator=generator)
            varied[replaced] = pool[draws.to(ids.device)]
        return {name: value for name, value in batch.items() if name != "labels"} | {"input_ids": varied}


@dataclass
class Text:
    """Plain text, as documents (paragraphs of a .txt file, or rows' `text`)."""

    documents: list[str]
    source: str

    def __len__(self):
        return len(self.documents)


def load_text(spec: str, split: str = "train") -> Text:
    """Read plain text: a .txt file (paragraphs separated by blank lines), rows with a `text` field (JSONL,
    CSV), or a `datasets` name with a `text` column."""
    path = Path(spec)
    name = path.name[:-3] if path.suffix == ".gz" else path.name
    if path.exists() and name.endswith(".txt"):
        try:
            with _open_text(path) as f:
                content = f.read()
        except (UnicodeDecodeError, OSError, EOFError) as e:
            raise UsageError(f"--data {path}: cannot be read ({e}); give UTF-8 text") from None
        documents = [p.strip() for p in content.replace("\r\n", "\n").split("\n\n")]
    else:
        rows = _read_rows(path) if path.exists() else read_dataset(spec, split)
        if rows and "text" not in rows[0]:
            raise UsageError(f"--data {spec}: no 'text' field (found: {', '.join(sorted(map(str, rows[0])))}); "
                             "give plain text (.txt) or rows with a text field")
        documents = [str(row["text"]).strip() for row in rows]
    documents = [d for d in documents if d]
    if not documents:
        raise UsageError(f"--data {spec}: no text; give a file with some")
    return Text(documents, spec)


def holdout_text(text: Text, fraction: float) -> tuple[Text, Text]:
    """The last `fraction` of the documents held out: text that follows, as a language model meets it, and
    no document split between the two."""
    held = max(1, round(fraction * len(text)))
    if held >= len(text):
        raise UsageError(f"--data {text.source}: too few documents ({len(text)}) to hold out an evaluation part; "
                         "add text or pass --eval-data")
    return Text(text.documents[:-held], text.source), Text(text.documents[-held:], text.source)


class TextBlocks(Examples):
    """Plain text as consecutive blocks of `max_length` tokens (documents joined by a blank line, the last
    partial block dropped). The labels are the tokens themselves: the model's loss is next-token prediction."""

    def __init__(self, text: Text, tokenizer, max_length: int):
        separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        stream = []
        # verbose=False: a document longer than the model's context is fine here, it is cut into blocks
        for ids in tokenizer(text.documents, add_special_tokens=False, verbose=False)["input_ids"]:
            stream += ids + separator
        self.blocks = torch.tensor(stream[: len(stream) // max_length * max_length]).view(-1, max_length)
        if len(self.blocks) == 0:
            raise UsageError(f"--data {text.source}: {len(stream)} tokens, fewer than one block of --max-length "
                             f"{max_length}; give more text or a shorter length")
        self.max_length = max_length
        self.strata = [0] * len(self.blocks)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return self.blocks[i]

    def collate(self, items):
        input_ids = torch.stack(items)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


class Sentences(Examples):
    """Plain text as one example per document (truncated to `max_length` tokens, special tokens added, as an
    encoder reads a sentence); batches are padded to their longest member. No labels."""

    def __init__(self, text: Text, tokenizer, max_length: int):
        enc = tokenizer(text.documents, truncation=True, max_length=max_length)
        self.features = [{k: enc[k][i] for k in enc} for i in range(len(text))]
        self.pad = tokenizer.pad
        self.strata = [0] * len(self.features)

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return self.features[i]

    def collate(self, items):
        return dict(self.pad(items, return_tensors="pt"))
