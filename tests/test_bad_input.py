"""Bad input and faults, as a new user meets them: every case ends in one sentence (`error: ...`,
exit 2, no traceback) and writes nothing; a damaged checkpoint or a killed save leaves a run that
resumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CORPUS
from yuanmoe.cli import main
from yuanmoe.data import prepare_dataset

TRAIN = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--eval-every", "100", "--no-tensorboard",
         "--dtype", "float32", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two prepared folders of the same vocabulary size, tokenized by two BPEs trained on other text."""
    root = tmp_path_factory.mktemp("bad-input")
    text = (CORPUS / "tinyshakespeare.txt").read_text()
    (root / "a.txt").write_text(text[:8000])
    (root / "b.txt").write_text(text[20000:28000])
    for name in ("a", "b"):
        prepare_dataset([str(root / f"{name}.txt")], root / name, train_tokenizer_vocab=320, heldout_fraction=0.1,
                        workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def run(data):
    """A run on data `a` with checkpoints at steps 1 and 2."""
    assert main(["train", "--data", str(data / "a"), "--out", str(data / "run"), "--max-steps", "2",
                 "--save-every", "1", *TRAIN]) == 0
    return data / "run"


def one_sentence_error(capsys, *args: str) -> str:
    """Run the command; it must fail with exit 2 and one `error:` line, no traceback; returns the line."""
    code = main(list(args))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err)
    return errors[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# ----------------------------------------------------------------------------------- tokenizer identity
def test_data_of_another_tokenizer_is_refused_naming_both(data, run, capsys):
    fingerprints = [json.loads((data / n / "meta.json").read_text())["tokenizer_fingerprint"] for n in ("a", "b")]
    assert fingerprints[0] != fingerprints[1]
    before = snapshot(run)
    for args in (["--out", str(run), "--resume", "--max-steps", "4"],
                 ["--out", str(data / "fresh"), "--init", str(run / "checkpoints" / "step-0000002"),
                  "--max-steps", "4"]):
        line = one_sentence_error(capsys, "train", "--data", str(data / "b"), *args, *TRAIN[2:])
        assert fingerprints[0] in line and fingerprints[1] in line and "--tokenizer" in line
    line = one_sentence_error(capsys, "eval", "perplexity", str(run / "checkpoints" / "step-0000002"),
                              str(data / "b"), "--device", "cpu")
    assert fingerprints[0] in line and fingerprints[1] in line
    assert snapshot(run) == before and not (data / "fresh").exists()


def test_data_prepared_before_fingerprints_is_checked_by_its_tokenizer_folder(data, run, tmp_path, capsys):
    old = tmp_path / "old-b"
    shutil.copytree(data / "b", old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["tokenizer_fingerprint"]
    (old / "meta.json").write_text(json.dumps(meta))
    line = one_sentence_error(capsys, "eval", "perplexity", str(run / "checkpoints" / "step-0000002"), str(old),
                              "--device", "cpu")
    assert "uses tokenizer" in line
    # A checkpoint without a tokenizer cannot be checked: accepted, with a warning that says so.
    bare = tmp_path / "bare"
    shutil.copytree(run / "checkpoints" / "step-0000002", bare)
    (bare / "tokenizer.json").unlink()
    assert main(["train", "--data", str(data / "a"), "--out", str(tmp_path / "from-bare"), "--init", str(bare),
                 "--max-steps", "1", *TRAIN[2:]]) == 0
    assert "has no tokenizer fingerprint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- training nonsense
@pytest.mark.parametrize("args, message", [
    (["--grad-clip", "0"], "grad-clip must be positive"),
    (["--grad-clip", "-1"], "grad-clip must be positive"),
    (["--warmup-steps", "-1"], "warmup-steps must not be negative"),
    (["--time-limit", "-5"], "--time-limit must be a number of seconds, at least 0"),
    (["--lr", "nan"], "--lr must be at least 0, got nan"),
    (["--set", "no_such_field=1"], "unknown field(s) no_such_field"),
    (["--set", "num_layers=null"], "num_layers must be an integer, got None"),
    (["--set", "num_layers=2.5"], "num_layers must be an integer, got 2.5"),
    (["--set", "rope_base=null"], "rope_base must be a finite number, got None"),
    (["--set", "tie_word_embeddings=1"], "tie_word_embeddings must be true or false"),
])
def test_nonsense_training_settings_are_refused(data, tmp_path, capsys, args, message):
    line = one_sentence_error(capsys, "train", "--data", str(data / "a"), "--out", str(tmp_path / "run"), *TRAIN,
                              *args)
    assert message in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "must hold a JSON object"),
    ('{"num_layers": null}', "num_layers must be an integer, got None"),
    ('{"model_type": "yuan", "vocab_size": 320}', "lacks the field 'hidden_size'"),
])
def test_config_files_that_are_not_configs_are_refused(data, tmp_path, capsys, content, message):
    (tmp_path / "config.json").write_text(content)
    line = one_sentence_error(capsys, "train", "--data", str(data / "a"), "--out", str(tmp_path / "run"),
                              "--config", str(tmp_path / "config.json"), *TRAIN[2:])
    assert message in line and not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_sentence(data, tmp_path, capsys):
    line = one_sentence_error(capsys, "train", "--data", str(data / "a"), "--out", str(tmp_path / "run"),
                              *TRAIN[:-2], "--device", "cuda")
    assert "no usable CUDA GPU" in line


def test_resume_refuses_settings_that_break_exactness_and_steps_already_done(data, run, capsys):
    before = snapshot(run)
    resume = ["train", "--data", str(data / "a"), "--out", str(run), "--resume", *TRAIN[2:]]
    line = one_sentence_error(capsys, *resume, "--max-steps", "1")
    assert "--max-steps 1 is below step 2" in line
    line = one_sentence_error(capsys, *resume, "--max-steps", "4", "--seq-len", "16")
    assert "--seq-len 32 (now 16)" in line and "--init" in line
    line = one_sentence_error(capsys, *resume, "--max-steps", "4", "--resume-from", "7")
    assert "cannot resume from step 7" in line and "steps saved: 1, 2" in line
    assert snapshot(run) == before


@pytest.mark.parametrize("args, message", [
    (["generate", "CKPT", "hi", "--temperature", "nan"], "temperature must be a finite number"),
    (["generate", "CKPT", "hi", "--temperature", "1", "--seed", str(2**70)], "seed must be between"),
    (["generate", "CKPT", "hi", "--repetition-penalty", "inf"], "repetition_penalty must be a finite number"),
    (["serve", "CKPT", "--port", "99999"], "--port must be between 0 and 65535"),
    (["serve", "CKPT", "--max-tokens-cap", "-5"], "--max-tokens-cap must be at least 1"),
    (["serve", "CKPT", "--max-batch-size", "0"], "--max-batch-size must be at least 1"),
    (["eval", "humaneval", "CKPT", "--timeout", "-1"], "--timeout must be a positive number of seconds"),
    (["eval", "humaneval", "CKPT", "--workers", "0"], "--workers must be at least 1"),
])
def test_nonsense_command_numbers_are_refused(run, capsys, args, message):
    checkpoint = str(run / "checkpoints" / "step-0000002")
    line = one_sentence_error(capsys, *[checkpoint if a == "CKPT" else a for a in args], "--device", "cpu")
    assert message in line


def test_nan_weights_are_named_on_load(run, tmp_path, capsys):
    from yuanmoe import from_pretrained, save_pretrained

    model = from_pretrained(run / "checkpoints" / "step-0000002")
    with torch.no_grad():
        model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    save_pretrained(model, tmp_path / "nan")
    line = one_sentence_error(capsys, "generate", str(tmp_path / "nan"), "hi", "--device", "cpu")
    assert "layers.1.self_attn.o_proj.weight holds NaN or infinite values" in line



@pytest.mark.parametrize("suffix, message", [(":0", "must be positive, got 0.0"), (":-1", "must be positive"),
                                             (":abc", "the blend weight after ':' must be a number, got 'abc'"),
                                             (":nan", "must be positive, got nan")])
def test_bad_blend_weights_are_named_and_leave_no_folder(data, tmp_path, capsys, suffix, message):
    line = one_sentence_error(capsys, "data", "prepare", str(data / "a.txt") + suffix, "--out", str(tmp_path / "d"),
                              "--train-tokenizer", "300", "--workers", "1")
    assert message in line and not (tmp_path / "d").exists()


def test_a_failed_prepare_removes_the_folder_it_made_and_results_are_readable_by_all(data, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    line = one_sentence_error(capsys, "data", "prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "d"),
                              "--tokenizer", str(data / "a" / "tokenizer"), "--workers", "1")
    assert "no documents" in line and not (tmp_path / "d").exists()
    old = os.umask(0o022)
    try:
        assert main(["data", "prepare", str(data / "a.txt"), "--out", str(tmp_path / "d"), "--tokenizer",
                     str(data / "a" / "tokenizer"), "--workers", "1"]) == 0
    finally:
        os.umask(old)
    for name in ("meta.json", "tokenizer/tokenizer.json"):
        assert (tmp_path / "d" / name).stat().st_mode & 0o777 == 0o644, name


def test_info_prints_small_models_in_millions(capsys):
    assert main(["info", "--preset", "tiny"]) == 0
    assert "0.413 M" in capsys.readouterr().out

# ----------------------------------------------------------------------------------- damaged runs
def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("damage, why", [
    (lambda step: (step / "__0_0.distcp").write_bytes(b"cut"), "shard __0_0.distcp is missing or truncated"),
    (lambda step: (step / "trainer_state.json").write_text('{"step": '), "trainer_state.json"),
    (lambda step: (step / "rng" / "rank-0.pt").write_bytes(b"PK\x03"), "rng/rank-0.pt cannot be read"),
    (lambda step: (step / ".metadata").write_bytes(b"\x80"), ".metadata cannot be read"),
])
def test_resume_skips_a_damaged_last_checkpoint(data, run, tmp_path, capsys, damage, why):
    run = copy_run(run, tmp_path)
    damage(run / "checkpoints" / "step-0000002")
    assert main(["train", "--data", str(data / "a"), "--out", str(run), "--resume", "--max-steps", "3",
                 *TRAIN[2:]]) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and why in err and "resuming from step-0000001" in err
    line = one_sentence_error(capsys, "train", "--data", str(data / "a"), "--out", str(run),
                              "--resume-from", "2", "--max-steps", "3", *TRAIN[2:])
    assert "cannot resume from step 2" in line and why in line



# Run in a child process: `yuan train` that kills itself with SIGKILL at one stage of the save of
# step 2: "shards" (DCP shards written, nothing else) or "publish" (the folder complete under its
# temporary name). A checkpoint damaged after its publication is test_resume_skips_a_damaged_last_checkpoint.
CRASH = """
import os, shutil, signal, sys
from pathlib import Path
import torch
import yuanmoe.distributed.checkpoint as ckpt
from yuanmoe.cli import main

torch.set_num_threads(1)  # as the tests run, so the losses match to the bit

stage = sys.argv[1]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
dcp, write = ckpt._dcp, ckpt.atomic_write_text

def dcp_then_die(operation, state, path, single_process):
    dcp(operation, state, path, single_process)
    if stage == "shards" and "step-0000002" in str(path):
        die()

def write_then_die(path, text):
    write(path, text)
    if stage == "publish" and "step-0000002" in str(path):
        die()

ckpt._dcp, ckpt.atomic_write_text = dcp_then_die, write_then_die
sys.exit(main(sys.argv[2:]))
"""
STAGES = ("shards", "publish")


@pytest.fixture(scope="module")
def crashed(data, tmp_path_factory):
    """One run folder per stage, each left by a training process killed there (all run at once)."""
    root = tmp_path_factory.mktemp("crashed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    children = {stage: subprocess.Popen(
        [sys.executable, "-c", CRASH, stage, "train", "--data", str(data / "a"), "--out", str(root / stage),
         "--max-steps", "2", "--save-every", "1", "--keep-last", "1", *TRAIN], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for stage in STAGES}
    for stage, child in children.items():
        _, err = child.communicate(timeout=300)
        assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_kill_during_a_save_then_resume_gives_the_uninterrupted_run(data, run, crashed, stage):
    from yuanmoe import from_pretrained

    out = crashed / stage
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".step-0000002.tmp", "step-0000001"]
    assert main(["train", "--data", str(data / "a"), "--out", str(out), "--resume", "--max-steps", "2",
                 "--keep-last", "1", *TRAIN[2:]]) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    resumed = from_pretrained(out / "checkpoints" / "step-0000002").state_dict()
    uninterrupted = from_pretrained(run / "checkpoints" / "step-0000002").state_dict()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_stale_temporaries_are_removed_when_a_run_starts(run, data, tmp_path):
    out = copy_run(run, tmp_path)
    stale = out / "checkpoints" / ".step-0000003.tmp.tmp-x1y2"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    assert main(["train", "--data", str(data / "a"), "--out", str(out), "--resume", "--max-steps", "2",
                 *TRAIN[2:]]) == 0
    assert not stale.exists()

# ----------------------------------------------------------------------------------- the server
MODEL = "tiny-test"
KEY = "sekret-key"


@pytest.fixture(scope="module")
def server(model, bpe):
    from conftest import running_server
    from yuanmoe.serving import create_app

    app = create_app(model, bpe, MODEL, max_tokens_cap=64, max_batch_size=4, api_key=KEY, max_prompts=4,
                     max_queued_tokens=2000)
    with running_server(app) as url:
        yield url, app


def post(server, path: str, body, key: str | None = KEY, **kwargs):
    import httpx

    headers = {"authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        headers["content-type"] = "application/json"
        return httpx.post(server[0] + path, content=body, headers=headers, timeout=30, **kwargs)
    return httpx.post(server[0] + path, json=body, headers=headers, timeout=30, **kwargs)


def openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def test_bad_sampling_fields_get_400_and_extreme_ones_never_spoil_the_batch(server, model, bpe):
    from concurrent.futures import ThreadPoolExecutor

    from yuanmoe.inference import SamplingParams, complete

    good = {"model": MODEL, "prompt": "To be", "max_tokens": 8, "temperature": 0}
    extreme = [{"temperature": 1e-300, "seed": 1}, {"temperature": 1.5, "top_k": 2**31 - 1, "seed": 2**63 - 1},
               {"repetition_penalty": 1e-300, "temperature": 1, "seed": -2**63}]
    invalid = [({"seed": 2**70}, "seed"), ('"temperature": NaN', "temperature"), ({"top_p": 0}, "top_p"),
               ('"repetition_penalty": Infinity', "repetition_penalty"), ({"n": 9}, "n"), ({"top_k": 2**70}, "top_k")]

    def send(extra):
        if isinstance(extra, str):  # a JSON body Python's reader accepts but JSON does not define
            return post(server, "/v1/completions", json.dumps(good)[:-1] + ", " + extra + "}")
        return post(server, "/v1/completions", {**good, **extra})

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(send, [{}] * 3 + extreme + [e for e, _ in invalid]))
    expected = complete(model, bpe, ["To be"], SamplingParams(max_new_tokens=8, temperature=0))[0].text
    assert [r.json()["choices"][0]["text"] for r in replies[:3]] == [expected] * 3
    assert all(r.status_code == 200 for r in replies[3:6]), [r.text for r in replies[3:6]]
    for reply, (_, param) in zip(replies[6:], invalid):
        assert openai_error(reply, 400)["param"] == param


def test_malformed_requests_answer_in_the_openai_shape(server):
    import httpx
    import openai

    error = openai_error(post(server, "/v1/completions", '{"model": "tiny-test", "prompt": "a\\ud800b"}'), 400)
    assert "lone UTF-16 surrogate" in error["message"] and error["param"] == "prompt"
    error = openai_error(post(server, "/v1/chat/completions", b'{"model": "tiny-test", "messages": "\xff\xfe"}'), 400)
    assert "UTF-8" in error["message"]
    error = openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": ""}), 400)
    assert error["message"].startswith("the prompt is empty") and error["code"] is None
    wrong_method = httpx.get(server[0] + "/v1/completions", headers={"authorization": f"Bearer {KEY}"})
    assert "does not take GET" in openai_error(wrong_method, 405)["message"]
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="there is no /v1/embeddings"):
        client.embeddings.create(model=MODEL, input="hi")


def test_api_key_is_required_except_for_health(server):
    import httpx
    import openai

    for key in (None, "wrong"):
        error = openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": "hi"}, key=key), 401)
        assert error["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server[0] + "/health").status_code == 200
    assert post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_limits_answer_400_for_oversized_requests_and_429_when_busy(server):
    error = openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": ["a"] * 5}), 400)
    assert "5 prompts in one request, but this server takes at most 4" in error["message"]
    error = openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": ["a"] * 4, "n": 8,
                                                          "max_tokens": 64}), 400)
    assert "takes at most 2000 at a time" in error["message"]
    scheduler = server[1].state.scheduler
    scheduler.queued_tokens += 1990  # as if other requests held the queue
    try:
        busy = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 16})
        assert openai_error(busy, 429)["code"] == "server_busy" and busy.headers["retry-after"] == "1"
    finally:
        scheduler.queued_tokens -= 1990
    assert scheduler.queued_tokens == 0


def test_metrics_count_requests_tokens_and_latencies(server):
    import httpx

    post(server, "/v1/completions", {"model": MODEL, "prompt": "To be", "max_tokens": 4, "temperature": 0})
    text = httpx.get(server[0] + "/metrics", headers={"authorization": f"Bearer {KEY}"}).text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if not line.startswith("#")}
    assert values['yuan_http_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert values["yuan_generation_tokens_total"] >= 4 and values["yuan_prompt_tokens_total"] >= 1
    assert values["yuan_time_to_first_token_seconds_count"] >= 1
    assert values['yuan_time_to_first_token_seconds_bucket{le="+Inf"}'] == values[
        "yuan_time_to_first_token_seconds_count"]
    assert values["yuan_requests_waiting"] == 0 and values["yuan_queued_tokens"] == 0
    assert "# TYPE yuan_request_duration_seconds histogram" in text


def test_tokenizing_runs_off_the_event_loop(model, bpe):
    """A prompt that takes a second to tokenize must not stall /health meanwhile."""
    import threading
    import time

    import httpx

    from conftest import running_server
    from yuanmoe.serving import create_app

    class SlowTokenizer:
        def __getattr__(self, name):
            return getattr(bpe, name)

        def encode(self, text):
            time.sleep(1.0)
            return bpe.encode(text)

    with running_server(create_app(model, SlowTokenizer(), MODEL, max_tokens_cap=4)) as url:
        slow = threading.Thread(target=httpx.post, args=(url + "/v1/completions",),
                                kwargs={"json": {"model": MODEL, "prompt": "hi", "max_tokens": 1}, "timeout": 30})
        slow.start()
        time.sleep(0.2)
        start = time.monotonic()
        assert httpx.get(url + "/health").status_code == 200
        waited = time.monotonic() - start
        slow.join()
    assert waited < 0.5, f"/health waited {waited:.2f} s behind the tokenizer"
