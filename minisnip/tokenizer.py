"""BERT's WordPiece tokenizer, through the `tokenizers` library.

A checkpoint's `tokenizer.json` is used as it is. A folder with only `vocab.txt` gets the BERT pipeline
built step by step: normalise (clean text, split CJK characters, lower-case and strip accents when the
checkpoint is uncased), split on whitespace and punctuation, WordPiece, then `[CLS] A [SEP] B [SEP]`
with token types 0 for segment A and 1 for segment B.

Sequences are truncated `longest_first` (one token at a time from the longer segment) and padded to the
longest sequence of the batch only (dynamic padding).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from torch import Tensor

from .checkpoint import resolve_folder


class Tokenizer:
    """Text (or text pairs) -> `input_ids`, `token_type_ids`, `attention_mask`, padded per batch."""

    def __init__(self, tokenizer: HFTokenizer, max_length: int = 512):
        self.backend = tokenizer
        self.backend.no_padding()
        self.backend.no_truncation()
        self.max_length = max_length
        self.pad_id = self._token_id("[PAD]")
        self.cls_id = self._token_id("[CLS]")
        self.sep_id = self._token_id("[SEP]")

    def _token_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"the vocabulary has no {token} token; is this a BERT tokenizer?")
        return i

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @classmethod
    def from_vocab(cls, vocab_file: str | Path, lowercase: bool = True, strip_accents: bool | None = None,
                   max_length: int = 512) -> Tokenizer:
        """BERT's pipeline built from a `vocab.txt` (one WordPiece token per line)."""
        vocab_file = Path(vocab_file)
        lines = vocab_file.read_text(encoding="utf-8").splitlines()
        vocab = {tok: i for i, tok in enumerate(lines)}
        if "[UNK]" not in vocab:
            raise ValueError(f"{vocab_file}: no [UNK] token in the vocabulary")
        tk = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                   strip_accents=strip_accents, lowercase=lowercase)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls_id, sep_id = vocab.get("[CLS]"), vocab.get("[SEP]")
        if cls_id is None or sep_id is None:
            raise ValueError(f"{vocab_file}: the vocabulary needs [CLS] and [SEP] tokens")
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        tk.decoder = decoders.WordPiece(prefix="##")
        return cls(tk, max_length=max_length)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        settings: dict = {}
        if (folder / "tokenizer_config.json").is_file():
            settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        max_length = settings.get("model_max_length", 512)
        max_length = max_length if isinstance(max_length, int) and 0 < max_length <= 100_000 else 512
        if (folder / "tokenizer.json").is_file():
            try:
                return cls(HFTokenizer.from_file(str(folder / "tokenizer.json")), max_length=max_length)
            except Exception as e:  # noqa: BLE001 - the library raises plain Exception on bad JSON
                raise ValueError(f"{folder / 'tokenizer.json'}: cannot read tokenizer ({e})") from None
        if (folder / "vocab.txt").is_file():
            return cls.from_vocab(folder / "vocab.txt", lowercase=settings.get("do_lower_case", True),
                                  strip_accents=settings.get("strip_accents"), max_length=max_length)
        raise FileNotFoundError(f"{folder}: no tokenizer.json or vocab.txt")

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
               max_length: int = 128) -> list[tuple[list[int], list[int]]]:
        """Token ids and token types per example, truncated `longest_first` to max_length, not padded."""
        if isinstance(texts, str) or isinstance(pairs, str):
            raise TypeError("encode takes a list of texts (and of pair texts); wrap a single text in a list")
        texts = _text_list(texts, "texts")
        if pairs is not None:
            pairs = _text_list(pairs, "pairs")
            if len(pairs) != len(texts):
                first = (f"texts[{len(pairs)}] has no pair text" if len(texts) > len(pairs)
                         else f"pairs[{len(texts)}] has no text")
                raise ValueError(f"{len(texts)} texts but {len(pairs)} pair texts: {first}; "
                                 "texts and pairs must have the same length")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 2 < max_length <= self.max_length:
            raise ValueError(f"max_length must be an integer in [3, {self.max_length}], got {max_length!r}")
        self.backend.enable_truncation(max_length, strategy="longest_first")
        batch = texts if pairs is None else list(zip(texts, pairs))
        encodings = self.backend.encode_batch(batch)
        return [(e.ids, e.type_ids) for e in encodings]

    def pad(self, encoded: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict[str, Tensor]:
        """Pad a batch to its longest sequence: input_ids, token_type_ids, attention_mask as (batch, seq)."""
        if len(encoded) == 0:
            raise ValueError("cannot pad an empty batch")
        longest = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), longest), self.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(encoded), longest), dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)
        for i, (ids, types) in enumerate(encoded):
            n = len(ids)
            input_ids[i, :n] = torch.as_tensor(ids)
            token_type_ids[i, :n] = torch.as_tensor(types)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}

    def __call__(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                 max_length: int = 128) -> dict[str, Tensor]:
        """Tokenize and pad a batch in one call."""
        return self.pad(self.encode(texts, pairs, max_length))

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids))

    def tokens(self, text: str, pair: str | None = None) -> list[str]:
        """The WordPiece tokens of one example, special tokens included (for teaching and debugging)."""
        for name, t in (("text", text), ("pair", pair)):
            if not isinstance(t, str) and (t is not None or name == "text"):
                raise ValueError(f"{name} is {_describe(t)}; it must be a str")
        self.backend.no_truncation()
        return self.backend.encode(text, pair).tokens

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json (the whole pipeline) and tokenizer_config.json into `folder`."""
        folder = Path(folder)
        self.backend.no_truncation()
        self.backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": self.max_length}) + "\n")


def _text_list(values: Sequence[str], name: str) -> list[str]:
    """`values` as a list, each checked to be a str; ValueError names the first position that is not."""
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"{name} must be a list of str, got {type(values).__name__}") from None
    for i, t in enumerate(values):
        if not isinstance(t, str):
            raise ValueError(f"{name}[{i}] is {_describe(t)}; every text must be a str")
    return values


def _describe(v: object, n: int = 40) -> str:
    """`None`, or the type and (clipped) repr of a value: `a float (nan)`."""
    if v is None:
        return "None"
    r, kind = repr(v), type(v).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({r if len(r) <= n else r[:n] + '...'})"


def load_tokenizer(path_or_name: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder (or hub name, when online)."""
    return Tokenizer.from_folder(resolve_folder(path_or_name))
