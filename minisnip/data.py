"""From GLUE examples to padded batches: tokenize once, bucket by length, pad per batch.

Length bucketing: shuffle the examples, cut them into pools of `pool` batches, sort each pool by length and
cut it into batches, then shuffle the batches. Batches hold sequences of similar length, so dynamic padding
wastes little compute, and the order still changes every epoch. All randomness comes from one seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from .tokenizer import Tokenizer


@dataclass
class Encoded:
    """A tokenized split: per example its token ids and token types (unpadded) and its label."""

    ids: list[list[int]]
    types: list[list[int]]
    labels: Tensor  # (N,) long for classification, float for regression

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    def batch(self, index: list[int], tokenizer: Tokenizer) -> dict[str, Tensor]:
        """Padded tensors for the examples at `index`, plus `labels`."""
        out = tokenizer.pad([(self.ids[i], self.types[i]) for i in index])
        out["labels"] = self.labels[index]
        return out


def encode_dataset(dataset, tokenizer: Tokenizer, max_length: int = 128, regression: bool = False) -> Encoded:
    """Tokenize a GLUE split (a `datasets.Dataset` with text_a, optional text_b, label) with `datasets.map`."""
    has_pair = "text_b" in dataset.column_names  # minisnip.glue adds it for sentence-pair tasks only

    def tok(batch: dict) -> dict:
        enc = tokenizer.encode(batch["text_a"], batch["text_b"] if has_pair else None, max_length)
        return {"input_ids": [e[0] for e in enc], "token_type_ids": [e[1] for e in enc]}

    mapped = dataset.map(tok, batched=True, batch_size=1000, desc="tokenize", load_from_cache_file=False)
    labels = torch.tensor(mapped["label"], dtype=torch.float32 if regression else torch.long)
    return Encoded(ids=list(mapped["input_ids"]), types=list(mapped["token_type_ids"]), labels=labels)


def length_bucketed_batches(lengths: list[int], batch_size: int, seed: int, pool: int = 50) -> list[list[int]]:
    """Training batches of similar-length examples, in an order fixed by `seed` (see module docstring)."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    span = batch_size * pool
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: examples sorted by length (least padding); results are put back in order by index."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def iterate(data: Encoded, batches: list[list[int]], tokenizer: Tokenizer) -> Iterator[tuple[list[int], dict[str, Tensor]]]:
    """(indices, padded batch) for each batch of indices."""
    for index in batches:
        yield index, data.batch(index, tokenizer)
