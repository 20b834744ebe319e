"""Reading training inputs: plain text, code, JSONL/JSON records and Alpaca instruction sets.

A document is plain text, a (prompt, answer) pair, or a conversation: the list of (prompt, answer)
pairs of its assistant turns in the official chat layout (inference/chat.py), kept together so
that they land in the same split. Pairs are tokenized as prompt `<sep>` answer so supervised
fine-tuning can train on the answer only.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

from ..tokenizer import newlines_from_official

RECORD_SUFFIXES = (".json", ".jsonl")
# Files taken from a folder: prose, code and records; anything else there (binaries, caches) is skipped.
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js",
                 ".ts", ".go", ".rs", ".sh", ".html", ".css", ".tex", ".toml", ".yaml", ".yml")
# Plain text longer than this is cut at a line break into several documents, so that one big
# file (a novel, a dump) still gives a held-out split and windows do not all come from one place.
MAX_DOC_CHARS = 50_000

Document = Union[str, tuple[str, str], list[tuple[str, str]]]


@dataclass
class Source:
    """One named input of a blend: files (or folders) and the share of training samples it gets."""

    paths: list[Path]
    weight: float = 1.0
    name: str = ""
    files: list[Path] = field(default_factory=list)
    # Text files in the official Yuan data layout: a document per line, `<n>` for newlines.
    official_lines: bool = False

    def __post_init__(self) -> None:
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"the weight of input {self.name or self.paths[0]} must be positive, got {self.weight}")
        self.files = list_files(self.paths)
        if not self.name:
            self.name = Path(self.paths[0]).stem or "input"

    def documents(self) -> Iterator[Document]:
        for path in self.files:
            yield from read_documents(path, self.official_lines)


def parse_input(spec: str) -> Source:
    """`PATH` or `PATH:WEIGHT` (the Megatron-style blend weight of that input)."""
    path, sep, weight = spec.rpartition(":")
    if not sep or Path(spec).exists():
        return Source([Path(spec)])
    try:
        value = float(weight)
    except ValueError:
        raise ValueError(f"input {spec!r}: the blend weight after ':' must be a number, got {weight!r} "
                         f"(write PATH or PATH:WEIGHT)") from None
    return Source([Path(path)], value)


def list_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + RECORD_SUFFIXES
                           and not any(part.startswith(".") or part == "__pycache__"
                                       for part in p.relative_to(path).parts))
            if not found:
                raise ValueError(f"folder {path} holds no text, code, JSON or JSONL files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return files


def read_documents(path: Path, official_lines: bool = False) -> Iterator[Document]:
    if path.suffix.lower() in RECORD_SUFFIXES:
        yield from read_records(path)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    yield from read_official_lines(text) if official_lines else split_long_text(text)


def read_official_lines(text: str) -> Iterator[Document]:
    """The official data layout: one document per line, newlines inside it written `<n>`, and a
    supervised sample written prompt `<sep>` answer."""
    for line in text.splitlines():
        if not line.strip():
            continue
        line = newlines_from_official(line)
        prompt, sep, answer = line.partition("<sep>")
        yield (prompt, answer) if sep else line


def split_long_text(text: str, max_chars: int = MAX_DOC_CHARS) -> Iterator[str]:
    while len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars) + 1 or max_chars
        yield text[:cut]
        text = text[cut:]
    if text.strip():
        yield text


def read_records(path: Path) -> Iterator[Document]:
    """A JSON array or JSONL lines of records with `text`, `instruction` [+ `input`] + `output`, or
    `messages` (a chat: [{"role", "content"}, ...])."""
    for where, record in json_records(path):
        yield record_document(record, path, where)


def json_records(path: Path) -> Iterator[tuple[int, object]]:
    """(record number, value) for each record of a JSON file holding an array of records or one record,
    or of a JSON-lines file (one record per line, numbered by line; gzipped when the name ends in .gz).
    Whatever the file holds, a fault is one sentence naming the file and the record."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            head = f.read(1)
            while head.isspace():
                head = f.read(1)
            f.seek(0)
            if head == "[":
                yield from enumerate(_parse_json(f.read(), path, ""), 1)
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = _parse_json(line, path, f" line {lineno}")
                except ValueError:
                    if lineno == 1 and head == "{":  # one pretty-printed record spanning lines
                        f.seek(0)
                        yield 1, _parse_json(f.read(), path, "")
                        return
                    raise
                yield lineno, value
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start} of a block cannot be decoded)") from None
    except (OSError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path} cannot be read ({exc})") from None


def _parse_json(text: str, path: Path, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}{where} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}{where} nests arrays or objects too deeply to read (thousands of levels); "
                         f"records are objects of strings") from None


def record_text(record: dict, key: str, path: Path, where: int) -> str:
    """Field `key` of a record, which must be text (a string that UTF-8 can encode)."""
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{path} record {where}: {key!r} must be a string, got {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{path} record {where}: {key!r} holds a lone UTF-16 surrogate "
                         f"({value[exc.start]!r} at character {exc.start}), which is not text") from None
    return value


def _kind(value) -> str:
    """A JSON value described in a few words (never its whole text, which may be huge or deep)."""
    return {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), f"the number {value!r}" if isinstance(value, (int, float)) else type(value).__name__)


def record_document(record, path: Path, where: int) -> Document:
    if not isinstance(record, dict):
        raise ValueError(f"{path} record {where} is {_kind(record)}, not an object; each record is an object with "
                         f"a 'text' field, 'instruction' and 'output' fields, or chat 'messages'")
    if "text" in record:
        return record_text(record, "text", path, where)
    if "instruction" in record and "output" in record:
        prompt = record_text(record, "instruction", path, where)
        if record.get("input"):
            prompt += "\n" + record_text(record, "input", path, where)
        return prompt, record_text(record, "output", path, where)
    if "messages" in record:
        from ..inference.chat import chat_samples

        try:
            samples = chat_samples(record["messages"])
            for prompt, answer in samples:
                (prompt + answer).encode("utf-8")
        except ValueError as exc:  # UnicodeEncodeError included
            why = "a message holds a lone UTF-16 surrogate, which is not text" if isinstance(
                exc, UnicodeEncodeError) else str(exc)
            raise ValueError(f"{path} record {where}: {why}") from None
        return samples
    raise ValueError(f"{path} record {where} has neither a 'text' field nor 'instruction' and 'output' fields "
                     f"nor chat 'messages' (its fields: {', '.join(repr(k[:40]) for k in list(record)[:8]) or 'none'})")


def document_text(doc: Document) -> str:
    """The text of a document as the tokenizer trainer sees it."""
    if isinstance(doc, list):  # a conversation: its last sample holds every turn
        doc = doc[-1]
    return doc if isinstance(doc, str) else doc[0] + "\n" + doc[1]
