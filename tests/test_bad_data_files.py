"""Class 2 of the bad-input classes: data files of every shape. Whatever structure a JSON, JSONL or
text input has, `yuan data prepare` (and the benchmark readers, which share the record reader) ends
in one sentence naming the file and the record, exit 2, and writes nothing; never a RecursionError,
a StopIteration or a traceback."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import CORPUS
from yuanmoe.cli import main
from yuanmoe.evaluation import readers

DEEP = 100_000
CASES = [  # (file name, content, words the one sentence must hold)
    ("deep.jsonl", '{"text": ' + "[" * DEEP + "]" * DEEP + "}\n", "nests arrays or objects too deeply"),
    ("deep-array.json", "[" * DEEP + "]" * DEEP, "nests arrays or objects too deeply"),
    ("deep-later.jsonl", '{"text": "ok"}\n' + '{"text": ' + "[" * DEEP + "]" * DEEP + "}\n", "line 2 nests"),
    ("lists.json", json.dumps([[1, 2], [3]]), "record 1 is an array, not an object"),
    ("scalars.json", json.dumps([{"text": "ok"}, 7]), "record 2 is the number 7, not an object"),
    ("string.json", '"just a string"', "record 1 is a string, not an object"),
    ("null.jsonl", "null\n", "record 1 is null, not an object"),
    ("number-text.jsonl", '{"text": 5}\n', "record 1: 'text' must be a string, got the number 5"),
    ("list-output.jsonl", '{"instruction": "a", "output": ["x"]}\n', "'output' must be a string, got an array"),
    ("object-input.jsonl", '{"instruction": "a", "input": {"b": 1}, "output": "x"}\n', "'input' must be a string"),
    ("surrogate.jsonl", '{"text": "a\\ud800b"}\n', "lone UTF-16 surrogate"),
    ("latin-1.jsonl", b'{"text": "caf\xe9"}\n', "is not UTF-8 text"),
    ("latin-1.txt", b"caf\xe9\n", "is not UTF-8 text"),
    ("nested-messages.jsonl", json.dumps({"messages": [[["x"]]]}) + "\n", "a chat message must be an object"),
    ("deep-messages.jsonl", '{"messages": ' + "[" * 5000 + "]" * 5000 + "}\n", "nests arrays or objects too deeply"),
    ("messages-string.jsonl", json.dumps({"messages": "hi"}) + "\n", "messages must be a list"),
    ("bad-role.jsonl", json.dumps({"messages": [{"role": ["x"] * 10000, "content": "a"}]}) + "\n", "unknown chat role"),
    ("no-fields.jsonl", '{"foo": 1}\n', "has neither a 'text' field"),
    ("broken.jsonl", '{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
    ("trailing.json", '[{"text": "a"}] [', "is not valid JSON"),
    ("empty.json", "", "holds no documents to train on"),
]


def prepare_error(capsys, path, out) -> str:
    code = main(["data", "prepare", str(path), "--out", str(out), "--train-tokenizer", "300", "--workers", "1"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err[-2000:])
    assert not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())
    return errors[0]


@pytest.mark.parametrize("name, content, words", CASES, ids=[c[0] for c in CASES])
def test_a_data_file_of_odd_structure_is_named_in_one_sentence(tmp_path, capsys, name, content, words):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    line = prepare_error(capsys, path, tmp_path / "out")
    assert str(path) in line and words in line, line
    if len(line) > 600:
        pytest.fail(f"the sentence is {len(line)} characters long: {line[:300]}")


def test_a_pretty_printed_record_is_one_document(tmp_path, capsys):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"text": "hello world " * 20}, indent=2))
    assert main(["data", "prepare", str(path), "--out", str(tmp_path / "out"), "--train-tokenizer", "300",
                 "--workers", "1"]) == 0


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["text", "instruction", "input", "output", "messages", "role", "content"]),
                        inner, max_size=4), max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(JSON, min_size=1, max_size=4), array=st.booleans())
def test_any_json_records_end_in_documents_or_one_sentence(tmp_path_factory, capsys, records, array):
    folder = tmp_path_factory.mktemp("drawn")
    path = folder / ("drawn.json" if array else "drawn.jsonl")
    path.write_text(json.dumps(records) if array else "".join(json.dumps(r) + "\n" for r in records))
    code = main(["data", "prepare", str(path), "--out", str(folder / "out"), "--train-tokenizer", "300",
                 "--workers", "1"])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err, err[-2000:]
    if code == 2:
        assert str(path) in err.splitlines()[-1] or "no documents" in err, err[-1000:]
        assert not (folder / "out").exists()


def test_appending_to_a_prepared_folder_is_refused_and_overwrite_replaces_it_whole(tmp_path, capsys):
    text = (CORPUS / "tinyshakespeare.txt").read_text()
    (tmp_path / "a.txt").write_text(text[:6000])
    (tmp_path / "b.txt").write_text(text[9000:15000])
    out = tmp_path / "out"
    prepare = ["data", "prepare", "--out", str(out), "--train-tokenizer", "300", "--workers", "1", "--heldout", "0"]
    assert main([*prepare, str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]) == 0
    first = sorted(p.name for p in out.iterdir())
    code = main([*prepare, str(tmp_path / "b.txt")])
    err = capsys.readouterr().err
    assert code == 2 and "already holds prepared data" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == first
    assert main([*prepare, str(tmp_path / "b.txt"), "--overwrite"]) == 0
    assert not any(name.startswith("01-") for name in (p.name for p in out.iterdir())), "stale shards of input 2"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code = main([*prepare[:2], "--out", str(tmp_path / "other"), *prepare[4:], str(tmp_path / "a.txt")])
    assert code == 2 and "is not a prepared data folder" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("row, words", [
    ([1, 2], "must be an object with the fields task_id, prompt, test, entry_point"),
    ({"task_id": "t", "prompt": 5, "test": "", "entry_point": "f"}, "'prompt' must be a string"),
    ({"task_id": "t"}, "(task_id)"),
])
def test_benchmark_rows_of_odd_structure_are_named(tmp_path, row, words):
    folder = tmp_path / "HUMANEVAL"
    folder.mkdir()
    (folder / "HumanEval.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="HumanEval.jsonl record 1") as error:
        readers.load_humaneval(tmp_path, "plain")
    assert words in str(error.value)
