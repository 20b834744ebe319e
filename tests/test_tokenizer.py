import json

import pytest

from conftest import CORPUS, GOLDEN, TOKENIZER_DIR
from yuanmoe import BPETokenizer, YuanTokenizer, load_tokenizer
from yuanmoe.tokenizer import ADDED_SPECIAL_TOKENS, SPECIAL_TOKENS, newlines_from_official, newlines_to_official

CASES = json.loads((GOLDEN.parent / "tokenizer_cases.json").read_text())


@pytest.fixture(scope="module")
def yuan():
    return YuanTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def bpe():
    records = json.loads((CORPUS / "zh-alpaca-part-00.json").read_text())[:300]
    texts = [r["instruction"] + r["output"] for r in records]
    texts += (CORPUS / "tinyshakespeare.txt").read_text()[:100_000].split("\n\n")
    return BPETokenizer.train(texts, vocab_size=1000)


def test_official_tokenizer_ids_match_golden_cases(yuan):
    for case in CASES["cases"]:
        assert yuan.encode(case["text"]) == case["ids"], case["text"]
    assert yuan.encode_batch([c["text"] for c in CASES["cases"]]) == [c["ids"] for c in CASES["cases"]]


def test_official_special_tokens_have_official_ids(yuan):
    assert CASES["added_special_tokens"] == list(ADDED_SPECIAL_TOKENS)
    assert (yuan.eod_id, yuan.sep_id, yuan.pad_id) == (77185, 77187, 77188)
    assert yuan.vocab_size == len(yuan) == CASES["len_tokenizer"]
    assert [yuan.token_to_id(t) for t in ("<mask>", "<predict>", "<FIM_SUFFIX>", "<FIM_PREFIX>", "<FIM_MIDDLE>")] \
        == list(range(134953, 134958))
    assert yuan.encode("问<sep>答<eod>")[-1] == yuan.eod_id and yuan.sep_id in yuan.encode("问<sep>答")
    assert yuan.encode("<s>x<unk>") == [1, yuan.token_to_id("▁x"), 0]


def test_official_decode_round_trips_text(yuan):
    for case in CASES["cases"]:
        assert yuan.decode(case["ids"]) == case["text"]
    text = "注意力路由器<sep>考虑了专家之间的相关性。\n第二行<eod>"
    assert yuan.decode(yuan.encode(text)) == text
    assert yuan.decode(yuan.encode(text), skip_special_tokens=True) == "注意力路由器考虑了专家之间的相关性。\n第二行"


def test_newline_marker_is_data_convention_not_a_token(yuan):
    record = "第一行<n>第二行"
    assert newlines_from_official(record) == "第一行\n第二行"
    assert newlines_to_official(newlines_from_official(record)) == record
    assert 13 in yuan.encode(newlines_from_official(record))  # <0x0A>, the newline byte
    assert yuan.token_to_id("<n>") not in yuan.encode(record)


def test_load_tokenizer_accepts_folder_model_file_and_saved_copy(yuan, tmp_path):
    text = "你好，世界！Hello<sep>"
    assert load_tokenizer(TOKENIZER_DIR / "tokenizer.model").encode(text) == yuan.encode(text)
    yuan.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), YuanTokenizer)
    assert load_tokenizer(tmp_path).encode(text) == yuan.encode(text)


def test_bpe_reserves_special_tokens_at_low_ids(bpe):
    assert [bpe.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (bpe.eod_id, bpe.sep_id, bpe.pad_id) == (0, 1, 2)
    assert bpe.vocab_size == 1000
    ids = bpe.encode("question<sep>answer<eod>")
    assert ids[-1] == 0 and 1 in ids


def test_bpe_round_trips_chinese_and_survives_save(bpe, tmp_path):
    texts = ["机器学习算法有哪些？<sep>深度学习。", "  odd   spacing\ttabs\n", "emoji 😀 ∑∫√ Ünïcödé"]
    for text in texts:
        assert bpe.decode(bpe.encode(text)) == text
    bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.encode_batch(texts) == [bpe.encode(t) for t in texts]


def test_tokenizer_errors_name_the_problem(yuan, bpe, tmp_path):
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        yuan.decode([yuan.vocab_size])
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        bpe.decode([5, 10_000])
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="too small"):
        BPETokenizer.train(["abc"], vocab_size=100)
