"""Tokenizers: the official Yuan SentencePiece model, and a byte-level BPE for models trained here.

Both expose the same interface: `encode(text) -> list[int]`, `decode(ids) -> str`,
`encode_batch(texts)`, `eod_id`, `sep_id`, `pad_id`, `vocab_size`, `token_to_id(token)`, `save(dir)`,
`fingerprint()`. Special tokens written in the text (`<sep>`, `<eod>`, `<FIM_PREFIX>`, ...) encode to
their own ids.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from .utils import atomic_write_bytes, atomic_write_text

# The official code adds these after loading tokenizer.model, in this order (spec section 6).
ADDED_SPECIAL_TOKENS = (
    "<sep>", "<pad>", "<mask>", "<predict>", "<FIM_SUFFIX>", "<FIM_PREFIX>", "<FIM_MIDDLE>",
    "<commit_before>", "<commit_msg>", "<commit_after>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<empty_output>",
)
EOD_TOKEN, SEP_TOKEN, PAD_TOKEN = "<eod>", "<sep>", "<pad>"
# Every special token, <eod> first; BPETokenizer gives them ids 0, 1, 2, ... in this order.
SPECIAL_TOKENS = (EOD_TOKEN,) + ADDED_SPECIAL_TOKENS

SENTENCEPIECE_FILE = "tokenizer.model"
BPE_FILE = "tokenizer.json"


def newlines_from_official(text: str) -> str:
    """The official data files write newlines inside a record as `<n>`; turn them back into
    newlines before tokenising (`<n>` is not a special token: it would encode as `<`, `n`, `>`)."""
    return text.replace("<n>", "\n")


def newlines_to_official(text: str) -> str:
    """Inverse of newlines_from_official: one record per line, as the official data files store it."""
    return text.replace("\n", "<n>")


class _SpecialTokenMixin:
    """Shared handling of the special-token table: ids, lookup and range checks."""

    special_ids: dict[str, int]

    @property
    def eod_id(self) -> int:
        return self.special_ids[EOD_TOKEN]

    @property
    def sep_id(self) -> int:
        return self.special_ids[SEP_TOKEN]

    @property
    def pad_id(self) -> int:
        return self.special_ids[PAD_TOKEN]

    def __len__(self) -> int:
        return self.vocab_size

    def fingerprint(self) -> str:
        """A short hash of the whole vocabulary (every token, in id order) and of the special-token ids.
        Token ids only mean something with the tokenizer that made them: two BPEs trained on different
        text differ here even when their vocabulary sizes are equal."""
        vocabulary = [self.id_to_token(i) for i in range(self.vocab_size)]
        text = json.dumps([vocabulary, sorted(self.special_ids.items())], ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]

    def _check_ids(self, ids: list[int]) -> None:
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the tokenizer's vocabulary (size {self.vocab_size})")


class YuanTokenizer(_SpecialTokenMixin):
    """The official Yuan tokenizer, loaded as the official code loads it: SentencePiece without
    BOS/EOS, `<eod>` as the end token, then the added special tokens in the official order (those
    already in the SentencePiece vocabulary keep their id, the others get the next free ids).

    Text is split at special tokens first and each piece between them is encoded by SentencePiece
    on its own (with its dummy-prefix space), which is what the official Hugging Face tokenizer does.
    """

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {self.model_file}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (RuntimeError, OSError) as exc:
            raise ValueError(f"{self.model_file} is not a valid SentencePiece model ({exc})") from None
        next_free = self.sp.get_piece_size()
        # The official (Llama) tokenizer also keeps SentencePiece's unknown and BOS pieces special.
        self.special_ids = {self.sp.id_to_piece(i): i for i in (self.sp.unk_id(), self.sp.bos_id()) if i >= 0}
        for token in SPECIAL_TOKENS:
            known = self.sp.piece_to_id(token)
            if self.sp.id_to_piece(known) == token:
                self.special_ids[token] = known
            else:
                self.special_ids[token] = next_free
                next_free += 1
        self.vocab_size = next_free
        self._special_by_id = {i: t for t, i in self.special_ids.items()}
        longest_first = sorted(self.special_ids, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "YuanTokenizer":
        """A tokenizer.model file, or a folder holding one."""
        path = Path(path)
        return cls(path / SENTENCEPIECE_FILE if path.is_dir() else path)

    def _pieces(self, text: str) -> list[str]:
        return [p for p in self._split.split(text) if p]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._pieces(text):
            special = self.special_ids.get(piece)
            ids += [special] if special is not None else self.sp.encode(piece)
        return ids

    def encode_batch(self, texts: Iterable[str], num_threads: int = -1) -> list[list[int]]:
        """Like encode on each text; SentencePiece runs the pieces of all texts on num_threads
        threads (-1: all cores)."""
        pieces = [self._pieces(t) for t in texts]
        plain = [p for ps in pieces for p in ps if p not in self.special_ids]
        encoded = iter(self.sp.encode(plain, num_threads=num_threads))
        return [[i for p in ps for i in ([self.special_ids[p]] if p in self.special_ids else next(encoded))]
                for ps in pieces]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        out, run = [], []
        for i in ids:
            if i in self._special_by_id:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self._special_by_id[i])
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_ids:
            return self.special_ids[token]
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str:
        self._check_ids([i])
        return self._special_by_id.get(i) or self.sp.id_to_piece(i)

    def save(self, directory: str | Path) -> None:
        atomic_write_bytes(Path(directory) / SENTENCEPIECE_FILE, self.sp.serialized_model_proto())


class BPETokenizer(_SpecialTokenMixin):
    """Byte-level BPE (the `tokenizers` library) for small models trained here. The special tokens
    take ids 0..15 in SPECIAL_TOKENS order (<eod> 0, <sep> 1, <pad> 2, ...); any text, Chinese
    included, round-trips exactly because every byte has a token."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.special_ids = {}
        for token in SPECIAL_TOKENS:
            i = tokenizer.token_to_id(token)
            if i is None:
                raise ValueError(f"BPE tokenizer lacks the special token {token}; train it with BPETokenizer.train")
            self.special_ids[token] = i
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              show_progress: bool = False) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
            raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                             f"{len(SPECIAL_TOKENS) + len(alphabet)} (special tokens plus 256 bytes)")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                      show_progress=show_progress)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "BPETokenizer":
        """A tokenizer.json file, or a folder holding one."""
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / BPE_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no BPE tokenizer at {file}")
        try:
            return cls(Tokenizer.from_file(str(file)))
        except Exception as exc:  # the Rust library raises a bare Exception for malformed files
            if isinstance(exc, ValueError):
                raise
            raise ValueError(f"{file} is not a valid tokenizer.json ({exc})") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        self._check_ids([i])
        return self.tok.id_to_token(i)

    def save(self, directory: str | Path) -> None:
        atomic_write_text(Path(directory) / BPE_FILE, self.tok.to_str())


Tokenizer = YuanTokenizer | BPETokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A checkpoint or tokenizer folder (tokenizer.model or tokenizer.json inside), a tokenizer.model
    file or a tokenizer.json file."""
    path = Path(path)
    if path.is_dir():
        if (path / SENTENCEPIECE_FILE).is_file():
            return YuanTokenizer(path / SENTENCEPIECE_FILE)
        if (path / BPE_FILE).is_file():
            return BPETokenizer.from_pretrained(path / BPE_FILE)
        raise FileNotFoundError(f"{path} holds no tokenizer ({SENTENCEPIECE_FILE} or {BPE_FILE})")
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}")
    return BPETokenizer.from_pretrained(path) if path.suffix == ".json" else YuanTokenizer(path)


def folder_fingerprint(path: str | Path) -> str | None:
    """The fingerprint of the tokenizer saved in a checkpoint or tokenizer folder, None if it holds none."""
    try:
        return load_tokenizer(path).fingerprint()
    except FileNotFoundError:
        return None


def check_same_tokenizer(first: str, first_fingerprint: str | None, second: str, second_fingerprint: str | None,
                         fix: str) -> None:
    """Refuse to mix token ids of two different tokenizers, in one sentence naming both; a side with no
    fingerprint (a folder from before fingerprints, or one without a tokenizer) is accepted with a warning."""
    if first_fingerprint is None or second_fingerprint is None:
        missing = first if first_fingerprint is None else second
        other = second if first_fingerprint is None else first
        print(f"warning: {missing} has no tokenizer fingerprint (it holds no tokenizer or predates fingerprints), "
              f"so it cannot be checked against {other}; make sure they share one tokenizer", file=sys.stderr)
        return
    if first_fingerprint != second_fingerprint:
        raise ValueError(f"{first} uses tokenizer {first_fingerprint} but {second} uses tokenizer "
                         f"{second_fingerprint}, whose token ids mean other things; {fix}")
