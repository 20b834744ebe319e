"""Data pipeline: reading inputs, token shards, packed windows, position reset, FIM, answer-only loss."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import CORPUS, TOKENIZER_DIR
from yuanmoe.data import IGNORE_INDEX, TokenDataset, apply_fim, fim_permute, fim_restore, position_ids, prepare_dataset
from yuanmoe.cli import main as cli_main
from yuanmoe.tokenizer import load_tokenizer

FIM_IDS = {"prefix": 5, "suffix": 4, "middle": 6}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A slice of tinyshakespeare as text files and of the Chinese Alpaca set as JSON."""
    root = tmp_path_factory.mktemp("corpus")
    text = (CORPUS / "tinyshakespeare.txt").read_text()
    for i in range(12):
        (root / f"play{i:02d}.txt").write_text(text[i * 2000: (i + 1) * 2000])
    records = json.loads((CORPUS / "zh-alpaca-part-00.json").read_text())[:80]
    (root / "alpaca.json").write_text(json.dumps(records, ensure_ascii=False))
    return root


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    text_files = sorted(corpus_dir.glob("play*.txt"))
    from yuanmoe.data import Source

    meta = prepare_dataset([Source(text_files, weight=3.0, name="plays"), f"{corpus_dir / 'alpaca.json'}:1"], out,
                           train_tokenizer_vocab=400, heldout_fraction=0.1, workers=1, progress=False)
    return out, meta


def test_position_ids_restart_after_each_eod():
    tokens = np.array([7, 8, 0, 9, 9, 9, 0, 0, 5])
    assert position_ids(tokens, eod_id=0).tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 0]


def test_prepared_shards_hold_every_document_once_with_one_eod(prepared, corpus_dir):
    out, meta = prepared
    tok = load_tokenizer(out / "tokenizer")
    plays, alpaca = meta["sources"]
    assert plays["weight"] == 3.0 and alpaca["weight"] == 1.0
    assert plays["valid"] and alpaca["valid"], "every input gets held-out documents"
    docs = []
    for split in ("train", "valid"):
        for shard in plays[split]:
            tokens = np.fromfile(out / shard["file"], dtype=np.uint32)
            starts = np.load(out / shard["index"])
            assert int((tokens == tok.eod_id).sum()) == shard["docs"] == len(starts)
            ends = list(starts[1:]) + [len(tokens)]
            docs += [tok.decode(tokens[s: e - 1].tolist()) for s, e in zip(starts, ends)]
    originals = [p.read_text() for p in sorted(corpus_dir.glob("play*.txt"))]
    assert sorted(docs) == sorted(originals)


def test_alpaca_records_become_prompt_sep_answer(prepared, corpus_dir):
    out, meta = prepared
    tok = load_tokenizer(out / "tokenizer")
    shard = meta["sources"][1]["train"][0]
    tokens = np.fromfile(out / shard["file"], dtype=np.uint32)
    first_doc = tokens[: int(np.flatnonzero(tokens == tok.eod_id)[0])].tolist()
    record = json.loads((corpus_dir / "alpaca.json").read_text())[0]
    sep = first_doc.index(tok.sep_id)
    prompt = record["instruction"] + ("\n" + record["input"] if record["input"] else "")
    assert (tok.decode(first_doc[:sep]), tok.decode(first_doc[sep + 1:])) == (prompt, record["output"])


def test_packed_samples_are_consecutive_windows_with_position_reset(prepared):
    out, meta = prepared
    ds = TokenDataset(out, seq_len=128, seed=0)
    windows = ds.train[0]
    first, _, _ = windows.window(0)
    second, _, _ = windows.window(1)
    assert first[-1] == second[0], "a window's last target is the next window's first input"
    batch = ds.batch(range(16))
    ids, pos, targets = batch["input_ids"], batch["position_ids"], batch["targets"]
    assert ids.shape == pos.shape == targets.shape == (16, 128)
    assert (ids[:, 1:] == targets[:, :-1]).all()
    after_eod = ids[:, :-1] == meta["eod_id"]
    assert (pos[:, 1:][after_eod] == 0).all() and (pos[:, 0] == 0).all()
    assert (pos[:, 1:][~after_eod] == pos[:, :-1][~after_eod] + 1).all()
    assert after_eod.any()


def test_blend_follows_weights_and_is_a_pure_function_of_the_sample_index(prepared):
    out, _ = prepared
    ds = TokenDataset(out, seq_len=32, seed=0)
    sources = [ds.locate(i)[0] for i in range(2000)]
    assert 0.70 < sources.count(0) / 2000 < 0.80  # weights 3 : 1
    fresh = TokenDataset(out, seq_len=32, seed=0)
    assert (fresh.batch([1999, 7])["input_ids"] == ds.batch([1999, 7])["input_ids"]).all()


def test_answer_only_trains_on_answers_and_eod(prepared):
    out, meta = prepared
    ds = TokenDataset(out, seq_len=64, seed=0, answer_only=True)
    tok = load_tokenizer(out / "tokenizer")
    alpaca = ds.train[1]
    for w in range(len(alpaca)):
        tokens, shard, start = alpaca.window(w)
        _, _, targets = ds._sample(tokens, alpaca.answer_mask(shard, start, len(tokens), ds.sep_id))
        full = tokens[1:]
        # A target is trained exactly when an <sep> of the same document came before it.
        stream = np.asarray(alpaca.tokens[shard][: start + len(tokens)], dtype=np.int64)
        in_answer = np.zeros(len(stream), dtype=bool)
        answer = False
        for i, t in enumerate(stream):
            in_answer[i] = answer
            answer = (answer or t == tok.sep_id) and t != tok.eod_id
        assert ((targets != IGNORE_INDEX) == in_answer[start + 1:]).all()
        assert (targets[targets != IGNORE_INDEX] == full[targets != IGNORE_INDEX]).all()
    # Plain text documents (no <sep>) keep every target.
    tokens, shard, start = ds.train[0].window(0)
    assert ds.train[0].answer_mask(shard, start, len(tokens), ds.sep_id).all()


@pytest.mark.parametrize("seed", range(6))
def test_fim_round_trip_restores_the_document(seed):
    rng = np.random.default_rng(seed)
    doc = rng.integers(10, 100, size=int(rng.integers(0, 40)))
    for spm_rate in (0.0, 1.0):
        permuted = fim_permute(doc, rng, FIM_IDS, spm_rate=spm_rate)
        assert len(permuted) == len(doc) + 3 and permuted[0] == FIM_IDS["prefix"]
        assert (fim_restore(permuted, FIM_IDS) == doc).all()
    spm = fim_permute(doc, np.random.default_rng(seed), FIM_IDS, spm_rate=1.0)
    assert spm[1] == FIM_IDS["suffix"], "SPM puts the suffix sentinel right after the prefix sentinel"


def test_fim_keeps_window_length_and_document_boundaries():
    rng = np.random.default_rng(0)
    window = np.array([11, 12, 13, 0, 21, 22, 23, 24, 0, 31, 32])
    out = apply_fim(window, rng, FIM_IDS, eod_id=0, rate=1.0)
    assert len(out) == len(window)
    first = out[: int(np.flatnonzero(out == 0)[0])]
    assert (fim_restore(first, FIM_IDS) == [11, 12, 13]).all()
    assert (apply_fim(window, rng, FIM_IDS, eod_id=0, rate=0.0) == window).all()


def test_prepare_with_the_official_tokenizer_uses_its_special_ids(corpus_dir, tmp_path):
    meta = prepare_dataset([str(corpus_dir / "alpaca.json")], tmp_path, tokenizer=TOKENIZER_DIR / "tokenizer.model",
                           workers=1, progress=False)
    assert (meta["eod_id"], meta["sep_id"]) == (77185, 77187)
    assert meta["fim_ids"] is not None and meta["vocab_size"] <= 135040
    assert (tmp_path / "tokenizer" / "tokenizer.model").is_file()


def test_bad_inputs_fail_with_one_clear_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_dataset([str(tmp_path / "missing.txt")], tmp_path / "out", train_tokenizer_vocab=300, workers=1)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(ValueError, match="no documents"):
        prepare_dataset([str(empty)], tmp_path / "out", tokenizer=TOKENIZER_DIR, workers=1, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match="record 2 has neither"):
        prepare_dataset([str(bad)], tmp_path / "out", tokenizer=TOKENIZER_DIR, workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="not a prepared data folder"):
        TokenDataset(tmp_path, seq_len=8)


def test_worker_processes_write_the_same_shards_as_one_process(prepared, corpus_dir, tmp_path):
    out, meta = prepared
    parallel = prepare_dataset([str(corpus_dir / "alpaca.json")], tmp_path, tokenizer=out / "tokenizer", workers=2,
                               heldout_fraction=0.1, progress=False)
    [shard] = parallel["sources"][0]["train"]
    assert (tmp_path / shard["file"]).read_bytes() == (out / meta["sources"][1]["train"][0]["file"]).read_bytes()


def test_official_layout_lines_become_documents_with_newlines_and_sep(tmp_path):
    (tmp_path / "official.txt").write_text("第一行<n>第二行\n\n问题是什么<sep>答案<n>在这里\n")
    out = tmp_path / "data"
    assert cli_main(["data", "prepare", str(tmp_path / "official.txt"), "--out", str(out), "--official-lines",
                     "--tokenizer", str(TOKENIZER_DIR / "tokenizer.model"), "--heldout", "0",
                     "--workers", "1"]) == 0
    tok = load_tokenizer(out / "tokenizer")
    shard = json.loads((out / "meta.json").read_text())["sources"][0]["train"][0]
    tokens = np.fromfile(out / shard["file"], dtype=np.uint32).tolist()
    assert shard["docs"] == 2 and tokens.count(tok.eod_id) == 2
    first, second = tokens[: tokens.index(tok.eod_id)], tokens[tokens.index(tok.eod_id) + 1: -1]
    assert tok.decode(first) == "第一行\n第二行"
    sep = second.index(tok.sep_id)
    assert (tok.decode(second[:sep]), tok.decode(second[sep + 1:])) == ("问题是什么", "答案\n在这里")
