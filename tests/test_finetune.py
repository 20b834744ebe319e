"""Fine-tuning: chat SFT data rendered as `yuan chat` renders it, LoRA adapters (attention, experts,
router, LFA) that train, merge and load on top of their base."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TOKENIZER_DIR
from yuanmoe.data import TokenDataset, prepare_dataset
from yuanmoe.data.packed import IGNORE_INDEX
from yuanmoe.inference import encode_prompt
from yuanmoe.inference.text import TextStream
from yuanmoe.tokenizer import load_tokenizer

CONVERSATIONS = [
    [{"role": "system", "content": "You are Yuan, a helpful assistant."},
     {"role": "user", "content": "Name two prime numbers."},
     {"role": "assistant", "content": "2 and 3.\nBoth are prime."},
     {"role": "user", "content": "请再说一个。"},
     {"role": "assistant", "content": "5 也是质数。"}],
    [{"role": "user", "content": "Write a haiku\nabout rain."},
     {"role": "assistant", "content": "Soft rain on the roof\nwhispers to the sleeping town\nmorning smells of earth"}],
]


def documents(folder, meta, split="train"):
    """The token documents of a prepared folder, in order, each ending in <eod>."""
    docs = []
    for shard in meta["sources"][0][split]:
        tokens = np.fromfile(folder / shard["file"], dtype=np.uint32)
        starts = list(np.load(folder / shard["index"])) + [len(tokens)]
        docs += [tokens[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]
    return docs


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n"
                                             for c in CONVERSATIONS))
    meta = prepare_dataset([str(root / "chat.jsonl")], root / "data", tokenizer=TOKENIZER_DIR,
                           heldout_fraction=0.0, workers=1, progress=False)
    return root / "data", meta


def test_chat_sft_renders_each_assistant_turn_as_yuan_chat_does(chat_data):
    folder, meta = chat_data
    tok = load_tokenizer(TOKENIZER_DIR)
    docs = documents(folder, meta)
    expected = [(c[:i], m["content"]) for c in CONVERSATIONS for i, m in enumerate(c) if m["role"] == "assistant"]
    assert len(docs) == len(expected) == 3
    for doc, (history, answer) in zip(docs, expected):
        prompt = encode_prompt(tok, history, chat=True)  # what `yuan chat` and the server feed the model
        assert doc[: len(prompt)] == prompt and prompt[-1] == tok.sep_id
        assert doc[-1] == tok.eod_id and doc.count(tok.sep_id) == 1
        # The answer is what the model must write, newlines as `<n>` as in the official layout (and in
        # the history `yuan chat` renders); streamed as in a chat, it reads as the reply.
        assert doc[len(prompt):-1] == tok.encode(answer.replace("\n", "<n>"))
        stream = TextStream(tok, prompt, chat=True)
        text = "".join(stream.push(i) for i in doc[len(prompt):-1]) + stream.flush()
        assert text == answer
    # The second turn's prompt holds the first answer, written as `yuan chat` keeps its history.
    assert tok.decode(docs[1]).startswith("You are Yuan, a helpful assistant.<n>Name two prime numbers.<n>"
                                          "2 and 3.<n>Both are prime.<n>请再说一个。<sep>")


def test_chat_sft_trains_on_answers_only(chat_data):
    """Loss on each turn's answer and <eod>; earlier answers inside a later prompt are context only."""
    folder, meta = chat_data
    tok = load_tokenizer(TOKENIZER_DIR)
    docs = documents(folder, meta)
    stream = [t for d in docs for t in d]
    ds = TokenDataset(folder, seq_len=len(stream) - 1, seed=0, answer_only=True)
    windows = ds.train[0]
    tokens, shard, start = windows.window(0)
    _, _, targets = ds._sample(tokens, windows.answer_mask(shard, start, len(tokens), ds.sep_id))
    assert tokens.tolist() == stream
    assert targets[targets != IGNORE_INDEX].tolist() == [t for d in docs for t in d[d.index(tok.sep_id) + 1:]]


@pytest.mark.parametrize("messages, error", [
    ([{"role": "assistant", "content": "hi"}], "does not follow a user message"),
    ([{"role": "user", "content": "hi"}], "at least one assistant message"),
    ([{"role": "bot", "content": "hi"}], "unknown chat role"),
])
def test_bad_conversation_names_its_record(tmp_path, messages, error):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ValueError, match=f"chat.jsonl record 1: .*{error}"):
        prepare_dataset([str(tmp_path / "chat.jsonl")], tmp_path / "data", tokenizer=TOKENIZER_DIR,
                        workers=1, progress=False)
