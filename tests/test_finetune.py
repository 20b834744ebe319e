"""Fine-tuning: chat SFT data rendered as `yuan chat` renders it, LoRA adapters (attention, experts,
router, LFA) that train, merge and load on top of their base."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint

from conftest import CORPUS, TOKENIZER_DIR
from yuanmoe.checkpoint import from_pretrained
from yuanmoe.cli import main as cli_main
from yuanmoe.data import TokenDataset, prepare_dataset
from yuanmoe.data.packed import IGNORE_INDEX
from yuanmoe.inference import encode_prompt
from yuanmoe.inference.text import TextStream
from yuanmoe.distributed.checkpoint import load_weights
from yuanmoe.evaluation.lm import EvalModel
from yuanmoe.tokenizer import load_tokenizer
from yuanmoe.training import TrainConfig, train
from yuanmoe.training.lora import LoraSpec, adapter_record, apply_lora

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


# ------------------------------------------------------------------ LoRA
def sft_conversations() -> list[dict]:
    """Short question-answer turns from a play: the model learns to continue a line with the next."""
    lines = [line.strip() for line in (CORPUS / "tinyshakespeare.txt").read_text()[:4000].splitlines()
             if len(line.strip()) > 12]
    return [{"messages": [{"role": "user", "content": "Next line: " + a}, {"role": "assistant", "content": b}]}
            for a, b in zip(lines[:40], lines[1:41])]


@pytest.fixture(scope="module")
def lora_run(golden_with_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    (root / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in sft_conversations()))
    prepare_dataset([str(root / "sft.jsonl")], root / "data", tokenizer=golden_with_tokenizer,
                    heldout_fraction=0.0, workers=1, progress=False)
    cfg = TrainConfig(data=str(root / "data"), out=str(root / "run"), init_from=str(golden_with_tokenizer),
                      lora_rank=4, lora_targets="attention,experts,router,lfa", answer_only=True, max_steps=30,
                      batch_size=4, seq_len=64, lr=2e-2, warmup_steps=1, weight_decay=0.0, dtype="float32",
                      save_every=30, eval_every=1000, tensorboard=False, progress=False, device="cpu")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        result = train(None, cfg)
    return root, printed.getvalue(), result


def answer_loss(model, data_dir) -> float:
    ds = TokenDataset(data_dir, seq_len=64, seed=0, answer_only=True)
    batch = ds.batch(range(16))
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"]).logits
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                                   ignore_index=IGNORE_INDEX))


def test_lora_lowers_the_sft_loss_training_only_adapters(lora_run, golden_with_tokenizer):
    root, _, result = lora_run
    base = from_pretrained(golden_with_tokenizer)
    tuned = from_pretrained(result.checkpoint)  # the adapters on top of their base, folded in
    before, after = answer_loss(base, root / "data"), answer_loss(tuned, root / "data")
    assert after < before - 0.7, (before, after)  # nats per answer token: 6.54 -> 5.42 measured
    # Only adapters were trained and saved: the frozen base is unchanged in the trained model...
    trained = result.model
    frozen = {n: p for n, p in trained.named_parameters() if not p.requires_grad}
    assert frozen and all(n.endswith(".original") or "lora_" not in n for n in frozen)
    assert torch.equal(trained.embed_tokens.weight, base.embed_tokens.weight)
    # ... and the checkpoint holds the adapters alone, with their base named beside them.
    saved = torch.distributed.checkpoint.FileSystemReader(result.checkpoint).read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    adapters = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert model_keys == adapters and all(".lora_A" in k or ".lora_B" in k for k in adapters)
    assert any(".experts.parametrizations.w1.0.lora_A" in k for k in adapters)
    assert adapter_record(result.checkpoint)["base"] == str(golden_with_tokenizer.resolve())


def test_trainable_parameter_count_is_printed(lora_run, golden_with_tokenizer):
    _, printed, _ = lora_run
    assert "LoRA rank 4 (alpha 8) on attention,experts,router,lfa: 36,800 trainable parameters" in printed
    model = from_pretrained(golden_with_tokenizer)
    count = apply_lora(model, LoraSpec.parse(4, None, "attention,experts"))
    config, d, r = model.config, model.config.hidden_size, 4
    per_layer = 4 * r * (d + config.attention_projection_size)  # q, k, v: d -> proj; o: proj -> d
    per_layer += config.num_experts * r * ((d + 2 * config.ffn_hidden_size) + (config.ffn_hidden_size + d))
    assert count == config.num_layers * per_layer
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_merged_export_matches_base_plus_adapters(lora_run, golden_with_tokenizer, tmp_path):
    _, _, result = lora_run
    record = adapter_record(result.checkpoint)
    adapted = from_pretrained(golden_with_tokenizer)
    apply_lora(adapted, LoraSpec(record["rank"], record["alpha"], tuple(record["targets"])))
    load_weights(result.checkpoint, adapted)
    assert any(float(p.detach().abs().max()) > 0 for n, p in adapted.named_parameters() if "lora_B" in n)
    for fmt in ("official", "native"):
        assert cli_main(["convert", str(result.checkpoint), str(tmp_path / fmt), "--to", fmt, "--merge-lora"]) == 0
        merged = from_pretrained(tmp_path / fmt)
        ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected, got = adapted(ids).logits, merged(ids).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.equal(got, from_pretrained(golden_with_tokenizer)(ids).logits)
    # generate, serve and eval load a checkpoint with its tokenizer: the adapter checkpoint is one.
    lm = EvalModel.from_checkpoint(result.checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, expected, rtol=0, atol=1e-5)
