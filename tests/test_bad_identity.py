"""Class 4 of the bad-input classes: the identity of what is written. Every command that writes a
checkpoint with a tokenizer (`convert`, `quantize`, `convert --merge-lora`) checks that the tokenizer
belongs to the model: its ids inside the model's vocabulary, the same special ids, and, where the
source holds a tokenizer of its own, the same fingerprint. A mismatch is one sentence, exit 2, and
nothing written."""

from __future__ import annotations

import shutil

import pytest

from conftest import CORPUS, TOKENIZER_DIR
from yuanmoe import YuanForCausalLM, preset, save_pretrained
from yuanmoe.cli import main
from yuanmoe.tokenizer import BPETokenizer


@pytest.fixture(scope="module")
def tokenizers():
    """Two BPEs of the same size trained on other text (same special ids, other vocabularies)."""
    text = (CORPUS / "tinyshakespeare.txt").read_text()
    return [BPETokenizer.train(text[a:a + 20000].split("\n\n"), vocab_size=400) for a in (0, 40000)]


@pytest.fixture(scope="module")
def source(tokenizers, tmp_path_factory):
    tok = tokenizers[0]
    config = preset("tiny", vocab_size=tok.vocab_size, eod_token_id=tok.eod_id, sep_token_id=tok.sep_id,
                    pad_token_id=tok.pad_id)
    folder = tmp_path_factory.mktemp("identity") / "model"
    save_pretrained(YuanForCausalLM(config), folder, tokenizer=tok)
    return folder


def refused(capsys, tmp_path, *args) -> str:
    code = main(list(args))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err[-2000:])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    return errors[0]


def test_convert_refuses_another_tokenizer_by_fingerprint(source, tokenizers, tmp_path, capsys):
    tokenizers[1].save(tmp_path / "other")
    line = refused(capsys, tmp_path, "convert", str(source), str(tmp_path / "out"), "--to", "native",
                   "--tokenizer", str(tmp_path / "other"))
    assert tokenizers[0].fingerprint() in line and tokenizers[1].fingerprint() in line
    assert main(["convert", str(source), str(tmp_path / "out"), "--to", "official", "--tokenizer",
                 str(source)]) == 0  # its own tokenizer, named explicitly


@pytest.mark.parametrize("command", ["convert", "quantize"])
@pytest.mark.parametrize("mismatch, words", [
    ("official", "has 134958 tokens but the model's vocabulary holds 400"),
    ("eod", "<eod> is token"),
    ("sep", "<sep> is token"),
    ("pad", "<pad> is token"),
])
def test_a_tokenizer_that_cannot_be_the_models_is_refused(source, tokenizers, tmp_path, capsys, command, mismatch,
                                                         words):
    """A source folder without a tokenizer of its own, given one that does not fit its config."""
    bare = tmp_path / "bare"
    shutil.copytree(source, bare)
    (bare / "tokenizer.json").unlink()
    tok = tokenizers[0]
    if mismatch == "official":
        given = str(TOKENIZER_DIR)
    else:
        config = (bare / "config.json").read_text()
        field = f'"{mismatch}_token_id": {getattr(tok, mismatch + "_id")}'
        assert field in config
        (bare / "config.json").write_text(config.replace(field, f'"{mismatch}_token_id": 399'))
        tok.save(tmp_path / "tok")
        given = str(tmp_path / "tok")
    if command == "quantize":  # quantize takes the tokenizer inside SRC
        shutil.copytree(given, bare, dirs_exist_ok=True)
        args = ["quantize", str(bare), str(tmp_path / "out")]
    else:
        args = ["convert", str(bare), str(tmp_path / "out"), "--to", "native", "--tokenizer", given]
    line = refused(capsys, tmp_path, *args)
    assert words in line, line


def test_merge_refuses_a_base_of_another_tokenizer(source, tokenizers, tmp_path, capsys):
    """The adapters of a LoRA run, merged into a --base that was moved and replaced by another model."""
    data = tmp_path / "data"
    (tmp_path / "a.txt").write_text((CORPUS / "tinyshakespeare.txt").read_text()[:8000])
    assert main(["data", "prepare", str(tmp_path / "a.txt"), "--out", str(data), "--tokenizer", str(source),
                 "--workers", "1", "--heldout", "0.1"]) == 0
    run = tmp_path / "lora"
    assert main(["train", "--data", str(data), "--out", str(run), "--init", str(source), "--lora-rank", "2",
                 "--max-steps", "1", "--batch-size", "2", "--seq-len", "16", "--no-tensorboard", "--dtype", "float32",
                 "--device", "cpu"]) == 0
    other = tmp_path / "other-base"
    shutil.copytree(source, other)
    (other / "tokenizer.json").unlink()
    tokenizers[1].save(other)
    capsys.readouterr()
    line = refused(capsys, tmp_path, "convert", str(run / "checkpoints" / "step-0000001"), str(tmp_path / "out"),
                   "--to", "native", "--merge-lora", "--base", str(other))
    assert "the adapters in" in line and tokenizers[1].fingerprint() in line and "--base" in line
