"""Readers for the benchmark files the official evaluation uses (``../shared/yuan/datasets``).

ARC, MMLU, GSM8K and MATH are text files with one problem a line: the question (newlines written
``<n>``; for multiple choice, the options follow as ``<n>A.text<n>B.text...``), then ``[SEP]``, then
the answer. HumanEval is the usual JSONL(.gz) of problems, plus JSONL files of alternative prompts
keyed by task_id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_OPTION_LINE = re.compile(r"^\s*([A-K])\s*[.．):：]\s*(.*)$")


@dataclass
class Problem:
    id: str
    question: str  # with real newlines; for multiple choice, options included as in the file
    answer: str  # the reference: a letter, a number, a LaTeX expression, or "" for HumanEval
    choices: dict[str, str] = field(default_factory=dict)  # letter -> option text (multiple choice)
    subject: str = ""  # MMLU subject
    code: dict = field(default_factory=dict)  # HumanEval: prompt, test, entry_point (and text prompts)


def read_sep_file(path: str | Path) -> list[tuple[str, str]]:
    """(question, answer) per non-empty line of an official ``question[SEP]answer`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist; point --data at the datasets folder")
    pairs = []
    # Split on "\n" only: questions contain characters str.splitlines() would also break at.
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        question, sep, answer = line.partition("[SEP]")
        if not sep:
            raise ValueError(f"{path}:{number} has no [SEP] between the question and the answer")
        pairs.append((question.replace("<n>", "\n").strip(), answer.strip()))
    return pairs


def parse_choices(question: str) -> dict[str, str]:
    """Letter -> text for the option lines ("A.text") that end a multiple-choice question."""
    choices = {}
    for line in question.split("\n")[1:]:
        m = _OPTION_LINE.match(line)
        if m and m.group(1) not in choices:
            choices[m.group(1)] = m.group(2).strip()
    return choices


def _multiple_choice(path: Path, prefix: str, subject: str = "") -> list[Problem]:
    problems = []
    for i, (question, answer) in enumerate(read_sep_file(path)):
        choices = parse_choices(question)
        if len(choices) < 2 or answer not in choices:
            raise ValueError(f"{path}: problem {i + 1} does not list its options as 'A.text' lines "
                             f"including the answer {answer!r}")
        problems.append(Problem(f"{prefix}/{i}", question, answer, choices, subject))
    return problems


def load_arc(data_dir: str | Path) -> list[Problem]:
    return _multiple_choice(Path(data_dir) / "ARC" / "ARC_challenge.txt", "arc")


def load_mmlu(data_dir: str | Path) -> list[Problem]:
    """All subjects, in file-name order, each question tagged with its subject."""
    folder = Path(data_dir) / "MMLU"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no MMLU subject files (*.txt) in {folder}")
    return [p for f in files for p in _multiple_choice(f, f"mmlu/{f.stem}", subject=f.stem)]


def load_gsm8k(data_dir: str | Path) -> list[Problem]:
    return [Problem(f"gsm8k/{i}", q, a) for i, (q, a) in enumerate(read_sep_file(Path(data_dir) / "GSM8K" / "gsm8k.txt"))]


def load_math(data_dir: str | Path) -> list[Problem]:
    return [Problem(f"math/{i}", q, a) for i, (q, a) in enumerate(read_sep_file(Path(data_dir) / "MATH" / "math.txt"))]


def read_jsonl(path: str | Path) -> list[tuple[int, object]]:
    """(line number, record) of a benchmark's JSON-lines file (data/sources.json_records)."""
    from ..data.sources import json_records

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist; point --data at the datasets folder")
    return list(json_records(path))


def _code_fields(path: Path, where: int, row, fields: tuple[str, ...]) -> dict[str, str]:
    from ..data.sources import record_text

    if not isinstance(row, dict) or not set(fields) <= set(row):
        have = ", ".join(sorted(map(str, row))) if isinstance(row, dict) else "it is not an object"
        raise ValueError(f"{path} record {where} must be an object with the fields {', '.join(fields)} ({have})")
    return {name: record_text(row, name, path, where) for name in fields}


# The prompt variants next to HumanEval.jsonl.gz: the official run used the Chinese text prompts.
HUMANEVAL_PROMPT_FILES = {
    "textprompts": "HumanEval-textprompts.jsonl",
    "instructions": "HumanEval-instructions.jsonl",
    "fewshot": "HumanEval-instructions-fewshot.jsonl",
}
HUMANEVAL_PROMPT_STYLES = ("plain", *HUMANEVAL_PROMPT_FILES)


def load_humaneval(data_dir: str | Path, prompt_style: str = "textprompts") -> list[Problem]:
    """HumanEval problems; `question` is the text given to the model: the code prompt itself
    ("plain") or the instruction-style prompt of the chosen variant, which ends in a code fence."""
    if prompt_style not in HUMANEVAL_PROMPT_STYLES:
        raise ValueError(f"unknown HumanEval prompt style {prompt_style!r}; choose one of "
                         f"{', '.join(HUMANEVAL_PROMPT_STYLES)}")
    folder = Path(data_dir) / "HUMANEVAL"
    problems_path = folder / "HumanEval.jsonl.gz"
    if not problems_path.is_file():
        problems_path = folder / "HumanEval.jsonl"
    rows = [_code_fields(problems_path, where, row, ("task_id", "prompt", "test", "entry_point"))
            for where, row in read_jsonl(problems_path)]
    prompts = {}
    if prompt_style != "plain":
        prompts_path = folder / HUMANEVAL_PROMPT_FILES[prompt_style]
        for where, row in read_jsonl(prompts_path):
            fields = _code_fields(prompts_path, where, row, ("task_id", "prompt"))
            prompts[fields["task_id"]] = fields["prompt"]
    problems = []
    for row in rows:
        if prompt_style != "plain" and row["task_id"] not in prompts:
            raise ValueError(f"{HUMANEVAL_PROMPT_FILES[prompt_style]} has no prompt for {row['task_id']}")
        question = prompts.get(row["task_id"], row["prompt"])
        code = {"prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]}
        problems.append(Problem(row["task_id"], question, "", code=code))
    return problems
