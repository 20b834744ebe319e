"""Deliberate breaks of the project, each of which some test must catch.

    .venv/bin/python tests/mutations.py              # every mutation
    .venv/bin/python tests/mutations.py temperature  # those whose name contains a word
    .venv/bin/python tests/mutations.py --list

Each mutation copies src/, tests/ and pyproject.toml to a temporary folder (with ../shared linked
next to it, as the tests expect), replaces one piece of source text in the copy (a mutation whose
text is no longer in the source is reported STALE, not skipped silently), runs the test files that
guard it with `python -m pytest -q -x -p no:logging` on the copy (PYTHONPATH = the copy's src), and
prints a table: the mutation, whether it was caught, and the tests that failed (with -x the first
one; `--all` runs every guarding test and lists all that fail). Exits 1 if any
mutation survives or is stale.

Not a test module (its name does not match test_*.py): pytest does not collect it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared").resolve()


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: files or node ids


MUTATIONS = [
    Mutation("router uses top-1 (weights forced to [1, 0])", "src/yuanmoe/routers/base.py",
             "        output = RouterOutput(weights, experts, probs, logits, logits.new_zeros(()))",
             "        weights = torch.cat([torch.ones_like(weights[:, :1]),"
             " torch.zeros_like(weights[:, 1:])], dim=-1)\n"
             "        output = RouterOutput(weights, experts, probs, logits, logits.new_zeros(()))",
             ("tests/test_routers.py",)),
    Mutation("LFA convolutions removed", "src/yuanmoe/model/attention.py",
             "        return self.norm(c2 + x), new_state",
             "        return self.norm(x), new_state",
             ("tests/test_model.py", "tests/test_golden.py")),
    Mutation("RoPE dropped", "src/yuanmoe/model/attention.py",
             "        q = apply_rope(self.q_proj(f).view(heads).transpose(1, 2), *rope)\n"
             "        k = apply_rope(self.k_proj(f).view(heads).transpose(1, 2), *rope)",
             "        q = self.q_proj(f).view(heads).transpose(1, 2)\n"
             "        k = self.k_proj(f).view(heads).transpose(1, 2)",
             ("tests/test_model.py", "tests/test_golden.py")),
    # The engine, server and HF tests must catch this on their own (the model cache tests did already).
    Mutation("LFA cache state lost between decode steps (engine)", "src/yuanmoe/model/attention.py",
             "            cache.update_lfa(self.layer_idx, new_state)",
             "            cache.update_lfa(self.layer_idx, torch.zeros_like(new_state))",
             ("tests/test_generation.py",)),
    Mutation("LFA cache state lost between decode steps (server)", "src/yuanmoe/model/attention.py",
             "            cache.update_lfa(self.layer_idx, new_state)",
             "            cache.update_lfa(self.layer_idx, torch.zeros_like(new_state))",
             ("tests/test_server.py",)),
    Mutation("LFA cache state lost between decode steps (HF)", "src/yuanmoe/model/attention.py",
             "            cache.update_lfa(self.layer_idx, new_state)",
             "            cache.update_lfa(self.layer_idx, torch.zeros_like(new_state))",
             ("tests/test_hf.py",)),
    Mutation("sampling ignores temperature", "src/yuanmoe/inference/sampling.py",
             "        logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature",
             "        logits = (logits - logits.amax(dim=-1, keepdim=True)) / 1.0",
             ("tests/test_sampling.py",)),
    Mutation("sampling ignores top_k", "src/yuanmoe/inference/sampling.py",
             "top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in params]",
             "top_k = torch.tensor([vocab for p in params]",
             ("tests/test_sampling.py",)),
    Mutation("sampling ignores top_p", "src/yuanmoe/inference/sampling.py",
             "        drop |= ((probs.cumsum(dim=-1) - probs) >= top_p)",
             "        drop |= ((probs.cumsum(dim=-1) - probs) > 1.0)",
             ("tests/test_sampling.py",)),
    Mutation("sampling ignores repetition_penalty", "src/yuanmoe/inference/sampling.py",
             "            logits = torch.where(self.seen, penalized, logits)",
             "            logits = logits",
             ("tests/test_sampling.py",)),
    Mutation("repetition penalty multiplies negative logits the wrong way", "src/yuanmoe/inference/sampling.py",
             "logits / self.penalty, logits * self.penalty)",
             "logits / self.penalty, logits / self.penalty)",
             ("tests/test_sampling.py",)),
    Mutation("data parallel does nothing (every rank takes the whole global batch)",
             "src/yuanmoe/distributed/parallel_model.py",
             "        return {k: v[first: first + rows].to(self.device) for k, v in batch.items()}",
             "        return {k: v.to(self.device) for k, v in batch.items()}",
             ("tests/test_distributed.py",)),
    Mutation("expert parallel: every rank holds the first E/ep experts", "src/yuanmoe/distributed/expert_parallel.py",
             "        self.first_expert = ep_rank * local",
             "        self.first_expert = 0",
             ("tests/test_distributed.py",)),
    Mutation("activation checkpointing does nothing", "src/yuanmoe/training/trainer.py",
             "        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)",
             "        pass",
             ("tests/test_training.py::test_activation_checkpointing_gives_the_same_losses",
              "tests/test_training.py::test_activation_checkpointing_recomputes_each_layer_in_the_backward_pass")),
    Mutation("GSM8K/MATH scoring inverted", "src/yuanmoe/evaluation/tasks.py",
             "records.append(_record(p, predicted, equal(predicted, p.answer), output=text))",
             "records.append(_record(p, predicted, not equal(predicted, p.answer), output=text))",
             ("tests/test_evaluation.py",)),
    Mutation("multiple choice by log-likelihood picks the least likely letter", "src/yuanmoe/evaluation/tasks.py",
             "predicted = max(option_scores, key=option_scores.get)",
             "predicted = min(option_scores, key=option_scores.get)",
             ("tests/test_evaluation.py",)),
    Mutation("the demo does not learn (learning rate zero)", "src/yuanmoe/training/demo.py",
             "seq_len=seq_len, lr=1e-3,", "seq_len=seq_len, lr=0.0,", ("tests/test_demo.py",)),
    Mutation("the sampler divides raw logits by the temperature (1e-300 overflows)", "src/yuanmoe/inference/sampling.py",
             "(logits - logits.amax(dim=-1, keepdim=True)) / temperature", "logits / temperature",
             ("tests/test_bad_input.py::test_bad_sampling_fields_get_400_and_extreme_ones_never_spoil_the_batch",)),
    Mutation("tokenizer fingerprints never compared", "src/yuanmoe/tokenizer.py",
             "    if first_fingerprint != second_fingerprint:", "    if False:",
             ("tests/test_bad_input.py::test_data_of_another_tokenizer_is_refused_naming_both",)),
    Mutation("resume takes a damaged newest checkpoint", "src/yuanmoe/distributed/checkpoint.py",
             "            if problem is None:", "            if True:",
             ("tests/test_bad_input.py::test_resume_skips_a_damaged_last_checkpoint",)),
    Mutation("stale save temporaries kept", "src/yuanmoe/distributed/checkpoint.py",
             'glob(".step-*.tmp*"):\n                shutil.rmtree(tmp, ignore_errors=True)',
             'glob(".step-*.tmp*"):\n                pass',
             ("tests/test_bad_input.py::test_stale_temporaries_are_removed_when_a_run_starts",)),
    Mutation("NaN weights load silently", "src/yuanmoe/checkpoint.py",
             "        check_finite(state, folder)\n", "",
             ("tests/test_bad_input.py::test_nan_weights_are_named_on_load",)),
    Mutation("joining sequences lose their LFA filter state", "src/yuanmoe/model/cache.py",
             "        self.lfa = [torch.cat([a, b]) for a, b in zip(self.lfa, other.lfa)]",
             "        self.lfa = [torch.cat([a, torch.zeros_like(b)]) for a, b in zip(self.lfa, other.lfa)]",
             ("tests/test_generation.py::test_sequences_joining_a_running_batch_decode_exactly_as_alone",)),
    Mutation("static admission in continuous mode", "src/yuanmoe/serving/scheduler.py",
             "            if self.continuous or not running:", "            if not running:",
             ("tests/test_server.py::test_a_request_arriving_mid_batch_joins_at_the_next_step_only_with_continuous_batching",)),
    Mutation("a request that fails to start fails its whole group", "src/yuanmoe/serving/scheduler.py",
             "                    running.update(zip(batch.add([job.request]), [job]))", "                    raise",
             ("tests/test_server.py::test_a_request_that_fails_to_start_fails_alone",)),
    Mutation("tokenizing on the event loop", "src/yuanmoe/serving/app.py",
             "await run_in_threadpool(build_requests, body, prompts, False, body.max_tokens or min(16, cap))",
             "build_requests(body, prompts, False, body.max_tokens or min(16, cap))",
             ("tests/test_bad_input.py::test_tokenizing_runs_off_the_event_loop",)),
    Mutation("lone surrogates reach the tokenizer", "src/yuanmoe/serving/app.py",
             "            _check_text(text, param)", "            pass",
             ("tests/test_properties.py", "tests/test_bad_input.py::test_malformed_requests_answer_in_the_openai_shape")),
    Mutation("the API key is not checked", "src/yuanmoe/serving/app.py",
             "        if api_key is not None and req.url.path", "        if False and req.url.path",
             ("tests/test_bad_input.py::test_api_key_is_required_except_for_health",)),
    Mutation("waiting requests start first come, first served", "src/yuanmoe/serving/scheduler.py",
             "            group = self._pending.popleft()\n            job = group.popleft()\n"
             "            if group:\n                self._pending.append(group)",
             "            group = self._pending[0]\n            job = group.popleft()\n"
             "            if not group:\n                self._pending.popleft()",
             ("tests/test_server.py::test_waiting_requests_start_round_robin_over_callers",)),
    Mutation("config field types unchecked", "src/yuanmoe/config.py",
             "            need(_has_type(value, hint), ", "            need(True, ",
             ("tests/test_properties.py", "tests/test_bad_input.py::test_nonsense_training_settings_are_refused")),
    Mutation("GPTQ zero point not stored minus one", "src/yuanmoe/quant/packing.py",
             "    return _unpack_int32(qzeros, bits, dim=1).to(torch.int32) + 1",
             "    return _unpack_int32(qzeros, bits, dim=1).to(torch.int32)",
             ("tests/test_quantize.py",)),
    Mutation("GPTQ zero applied with the wrong sign", "src/yuanmoe/quant/formats.py",
             "torch.stack([scale, scale * (mid - zero_point)], dim=-1)",
             "torch.stack([scale, scale * (zero_point - mid)], dim=-1)",
             ("tests/test_quantize.py",)),
    Mutation("int4 packing swaps the two nibbles", "src/yuanmoe/quant/packing.py",
             "        packed = c[..., 0, :] | (c[..., 1, :] << 4)",
             "        packed = c[..., 1, :] | (c[..., 0, :] << 4)",
             ("tests/test_quantize.py",)),
    Mutation("AVX-512 int4 kernel forgets the codes' midpoint", "src/yuanmoe/quant/csrc/qkernels.c",
             "_mm512_sub_epi32(_mm512_add_epi32(ia[r], ib[r]), _mm512_set1_epi32(8 * xs[r][b]))",
             "_mm512_add_epi32(ia[r], ib[r])", ("tests/test_quantize.py",)),
    Mutation("AVX-512 int8 kernel drops the weights' signs", "src/yuanmoe/quant/csrc/qkernels.c",
             "const __m512i sx = _mm512_mask_sub_epi8(x, neg, zero, x);", "const __m512i sx = x;",
             ("tests/test_quantize.py",)),
    Mutation("AVX2 int8 kernel drops the weights' signs", "src/yuanmoe/quant/csrc/qkernels.c",
             "const __m256i x = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xq[r] + b * QBLOCK + c * 4)), v);",
             "const __m256i x = _mm256_set1_epi32(load_i32(xq[r] + b * QBLOCK + c * 4));", ("tests/test_quantize.py",)),
    Mutation("AVX2 int4 kernel reads the high nibbles as the low ones", "src/yuanmoe/quant/csrc/qkernels.c",
             "const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);",
             "const __m256i hi = _mm256_and_si256(v, m4);", ("tests/test_quantize.py",)),
    Mutation("AVX2 kernel leaves out the zeros of asymmetric weights", "src/yuanmoe/quant/csrc/qkernels.c",
             "acc[h][r] = _mm256_fmadd_ps(zr[h], _mm256_set1_ps(zs[r]), acc[h][r]);", ";",
             ("tests/test_quantize.py",)),
    Mutation("scalar kernel leaves out the zeros of asymmetric weights", "src/yuanmoe/quant/csrc/qkernels.c",
             "                for (int o = 0; o < TILE; o++) acc[o] += sz_at(W, g, t * TILE + o, 1) * zs;",
             "                ;", ("tests/test_quantize.py",)),
    Mutation("AVX-512 float kernel forgets the codes' midpoint", "src/yuanmoe/quant/csrc/qkernels.c",
             "                if (W->bits == 4) sum = _mm512_sub_ps(sum, _mm512_set1_ps(8.f * xs[r][g]));",
             "                ;", ("tests/test_quantize.py",)),
    Mutation("kernels read every 4-row block's rows as its first", "src/yuanmoe/quant/csrc/qkernels.c",
             "            f(W, t, X, rows + i, (int)(n - i < MAX_NR ? n - i : MAX_NR), y + i * ldy, ldy);",
             "            f(W, t, X, rows, (int)(n - i < MAX_NR ? n - i : MAX_NR), y + i * ldy, ldy);",
             ("tests/test_quantize.py",)),
    Mutation("activations quantized with the wrong step", "src/yuanmoe/quant/csrc/qkernels.c",
             "const float scale = amax / 127.f,", "const float scale = amax / 120.f,", ("tests/test_quantize.py",)),
    Mutation("experts kernel without the SiLU", "src/yuanmoe/quant/csrc/qkernels.c",
             "g[i * f + j] = u / (1.f + expf(-u)) * h[i * f2 + f + j];", "g[i * f + j] = u * h[i * f2 + f + j];",
             ("tests/test_quantize.py",)),
    Mutation("a forced kernel is ignored", "src/yuanmoe/quant/kernels.py",
             "    if not forced:\n        return have[-1]", "    return have[-1]", ("tests/test_quantize.py",)),
    Mutation("dtype auto takes bf16 on every CPU", "src/yuanmoe/device.py",
             "    if torch.device(device).type == \"cuda\" or cpu_has_native_bf16():",
             "    if True:", ("tests/test_quantize.py",)),
    Mutation("YaRN divides the high-frequency dims instead of the low ones", "src/yuanmoe/model/attention.py",
             "    mask = 1 - ramp", "    mask = ramp", ("tests/test_rope.py",)),
    Mutation("official rope_theta wins over rotary_base", "src/yuanmoe/convert/official.py",
             'data.get("rotary_base", data.get("rope_theta", 10000.0))',
             'data.get("rope_theta", data.get("rotary_base", 10000.0))', ("tests/test_rope.py",)),
    Mutation("a re-laid-out AutoGPTQ folder quantizes its float tensors as well", "src/yuanmoe/quant/formats.py",
             "    if q.from_gptq:\n", "    if False:\n", ("tests/test_quantize.py",)),
    Mutation("quantized folders copied into memory instead of computed from the mapped files",
             "src/yuanmoe/quant/formats.py",
             "        qweight, sz = _to(plain.pop(name), dtype, device), _to(",
             "        qweight, sz = _to(plain.pop(name), dtype, device).clone(), _to(", ("tests/test_quantize.py",)),
    Mutation("maskless prefill also into a cache that is not empty", "src/yuanmoe/model/transformer.py",
             ".all() & (written == 0)", ".all()", ("tests/test_long_context.py",)),
    Mutation("router learning-rate multiplier ignored", "src/yuanmoe/training/trainer.py",
             'group["lr"] = lr * group.get("lr_scale", 1.0)', 'group["lr"] = lr', ("tests/test_training.py",)),
    Mutation("router init scale ignored", "src/yuanmoe/model/transformer.py",
             "std * self.config.router_init_scale", "std", ("tests/test_routers.py",)),
    Mutation("attention router temperature ignored", "src/yuanmoe/routers/attention_router.py",
             "q = q / self.temperature", "q = q", ("tests/test_routers.py",)),
    Mutation("router scores always in fp32", "src/yuanmoe/routers/base.py",
             " if self.fp32 else contextlib.nullcontext()", "", ("tests/test_routers.py",)),
    Mutation("sweep ignores the token budget", "src/yuanmoe/experiments/sweep.py",
             "steps = max(1, round(tokens / tokens_per_step))", "steps = 3", ("tests/test_experiments.py",)),
    Mutation("routing not recorded during training", "src/yuanmoe/experiments/runner.py",
             "observe=observe if config.is_moe else None", "observe=None", ("tests/test_experiments.py",)),
    Mutation("prefix cache rebuilds the filter state from the wrong token", "src/yuanmoe/model/cache.py",
             "            self.lfa[layer][:, 1] = x[n - 1]", "            self.lfa[layer][:, 1] = x[n - 2]",
             ("tests/test_prefix_cache.py",)),
    Mutation("prefix cache keeps no token inputs", "src/yuanmoe/model/cache.py",
             "            self.inputs[layer].index_copy_(2, self.slots(x.shape[1]), x.unsqueeze(1))", "            pass",
             ("tests/test_prefix_cache.py",)),
    Mutation("prefix cache reuses a prompt's last token too", "src/yuanmoe/inference/prefix_cache.py",
             "        n = len(ids) - 1\n", "        n = len(ids)\n", ("tests/test_prefix_cache.py",)),
    Mutation("prefix cache reuses across a document boundary", "src/yuanmoe/inference/prefix_cache.py",
             "            if stop in ids[:n]:", "            if False:", ("tests/test_prefix_cache.py",)),
    Mutation("prefix cache evicts the most recent entry", "src/yuanmoe/inference/prefix_cache.py",
             "                self._drop(next(iter(self._entries)))", "                self._drop(next(reversed(self._entries)))",
             ("tests/test_prefix_cache.py",)),
    Mutation("server batches do not use the prefix cache", "src/yuanmoe/serving/scheduler.py",
             "        self.prefix_cache = prefix_cache  #", "        self.prefix_cache = None  #",
             ("tests/test_prefix_cache.py",)),
    Mutation("a batch with a bad prompt leaves its first prompt running", "src/yuanmoe/inference/engine.py",
             "                decoder = BatchDecoder(self.model, prompts[:1],",
             "                decoder = self.decoder = BatchDecoder(self.model, prompts[:1],",
             ("tests/test_prefix_cache.py",)),
    Mutation("ablation comparison unpaired", "src/yuanmoe/experiments/compare.py",
             "diffs = np.asarray([a[s] - b[s] for s in seeds]", "diffs = np.asarray([a[s] - b[seeds[0]] for s in seeds]",
             ("tests/test_experiments.py",)),
    # Empty and degenerate work (tests/test_bad_degenerate.py): each guard removed.
    Mutation("degenerate: eval scores zero problems", "src/yuanmoe/evaluation/tasks.py",
             "    if not problems:\n", "    if False:\n",
             ("tests/test_bad_degenerate.py::test_eval_over_nothing_is_refused_and_writes_no_results",)),
    Mutation("degenerate: eval --limit below 1 reaches the harness", "src/yuanmoe/evaluation/cli.py",
             '(("--batch-size", args.batch_size), ("--limit", args.limit))', '(("--batch-size", args.batch_size),)',
             ("tests/test_bad_degenerate.py::test_eval_over_nothing_is_refused_and_writes_no_results",)),
    Mutation("degenerate: harness runs an empty --tasks", "src/yuanmoe/evaluation/cli.py",
             "    if not tasks:\n", "    if False:\n",
             ("tests/test_bad_degenerate.py::test_eval_over_nothing_is_refused_and_writes_no_results",)),
    Mutation("degenerate: harness runs a task twice", "src/yuanmoe/evaluation/cli.py",
             "    repeated = next((name for i, name in enumerate(tasks) if name in tasks[:i]), None)",
             "    repeated = None",
             ("tests/test_bad_degenerate.py::test_eval_over_nothing_is_refused_and_writes_no_results",)),
    Mutation("degenerate: harness takes a negative --num-fewshot", "src/yuanmoe/evaluation/cli.py",
             "    if args.num_fewshot is not None and args.num_fewshot < 0:", "    if False:",
             ("tests/test_bad_degenerate.py::test_eval_over_nothing_is_refused_and_writes_no_results",)),
    Mutation("degenerate: experiment lists may be empty", "src/yuanmoe/experiments/__init__.py",
             "        if not values:\n", "        if False:\n",
             ("tests/test_bad_degenerate.py::test_experiments_over_nothing_are_refused_before_their_folder_is_made",)),
    Mutation("degenerate: experiment lists may repeat a value", "src/yuanmoe/experiments/__init__.py",
             "        repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)",
             "        repeated = None",
             ("tests/test_bad_degenerate.py::test_experiments_over_nothing_are_refused_before_their_folder_is_made",)),
    Mutation("degenerate: sweep widths and expert counts of 0 or below", "src/yuanmoe/experiments/__init__.py",
             "    if value < 1:\n        raise ValueError(f\"{value} is not positive\")", "    pass",
             ("tests/test_bad_degenerate.py::test_experiments_over_nothing_are_refused_before_their_folder_is_made",)),
    Mutation("degenerate: unknown router variants pass parsing", "src/yuanmoe/experiments/__init__.py",
             "    if name not in ROUTER_VARIANTS:\n        raise ValueError(f\"unknown router variant {name!r}\")",
             "    pass",
             ("tests/test_bad_degenerate.py::test_experiments_over_nothing_are_refused_before_their_folder_is_made",)),
    Mutation("degenerate: token budgets below 1 token or infinite", "src/yuanmoe/experiments/sweep.py",
             "    if not 1 <= tokens < math.inf:", "    if not tokens > 0:",
             ("tests/test_bad_degenerate.py::test_experiments_over_nothing_are_refused_before_their_folder_is_made",)),
    Mutation("degenerate: experiment scale NaN or infinite", "src/yuanmoe/experiments/__init__.py",
             "        if not 0 < value < math.inf:\n            raise ValueError(f\"--{name.replace('_', '-')} must be "
             "positive and finite, got {value}\")\n    return",
             "        if value <= 0:\n            raise ValueError(f\"--{name.replace('_', '-')} must be "
             "positive and finite, got {value}\")\n    return",
             ("tests/test_bad_degenerate.py::test_experiments_over_nothing_are_refused_before_their_folder_is_made",)),
    Mutation("degenerate: router recipe rates infinite", "src/yuanmoe/experiments/__init__.py",
             "        if value is not None and not 0 < value < math.inf:", "        if value is not None and not value > 0:",
             ("tests/test_bad_degenerate.py::test_experiments_over_nothing_are_refused_before_their_folder_is_made",)),
    Mutation("degenerate: aux-loss-coef NaN or infinite", "src/yuanmoe/experiments/__init__.py",
             "    if args.aux_loss_coef is not None and not 0 <= args.aux_loss_coef < math.inf:",
             "    if args.aux_loss_coef is not None and args.aux_loss_coef < 0:",
             ("tests/test_bad_degenerate.py::test_experiments_over_nothing_are_refused_before_their_folder_is_made",)),
    Mutation("degenerate: routers with top-k above the expert count", "src/yuanmoe/experiments/__init__.py",
             "    if scale.top_k > scale.num_experts:", "    if False:",
             ("tests/test_bad_degenerate.py::test_experiments_over_nothing_are_refused_before_their_folder_is_made",)),
    Mutation("degenerate: expert counts below top-k", "src/yuanmoe/experiments/__init__.py",
             "    if min(args.expert_counts) < scale.top_k:", "    if False:",
             ("tests/test_bad_degenerate.py::test_experiments_over_nothing_are_refused_before_their_folder_is_made",)),
    Mutation("degenerate: compare of suites without runs", "src/yuanmoe/experiments/compare.py",
             "    if not losses or empty is not None:", "    if False:",
             ("tests/test_bad_degenerate.py::test_compare_of_suites_without_runs_is_refused",)),
    Mutation("degenerate: info at a sequence length of 0 or below", "src/yuanmoe/info.py",
             "    if args.seq_len is not None and args.seq_len < 1:", "    if False:",
             ("tests/test_bad_degenerate.py::test_info_at_a_sequence_length_of_zero_or_below_is_refused",)),
    Mutation("degenerate: plan with NaN or infinite sizes", "src/yuanmoe/plan.py",
             "        if not 0 < getattr(args, name) < math.inf:", "        if getattr(args, name) <= 0:",
             ("tests/test_bad_degenerate.py::test_plan_with_sizes_of_zero_or_below_or_not_finite_is_refused",)),
    Mutation("degenerate: plan --lora-rank 0 plans full fine-tuning", "src/yuanmoe/plan.py",
             "args.lora_targets) if args.lora_rank is not None else None", "args.lora_targets) if args.lora_rank else None",
             ("tests/test_bad_degenerate.py::test_plan_with_sizes_of_zero_or_below_or_not_finite_is_refused",)),
    # The OpenAI API surface (tests/test_bad_openai.py): each guard removed.
    Mutation("openai: unsupported fields silently accepted", "src/yuanmoe/serving/app.py",
             "        if not any(type(value) is type(n) and value == n for n in (None, *neutral)):", "        if False:",
             ("tests/test_bad_openai.py",)),
    Mutation("openai: neutral values of unsupported fields refused", "src/yuanmoe/serving/app.py",
             "type(value) is type(n) and value == n for n in (None, *neutral)", "value is n for n in (None,)",
             ("tests/test_bad_openai.py",)),
    Mutation("openai: unknown fields silently ignored", "src/yuanmoe/serving/app.py",
             'model_config = ConfigDict(extra="forbid", allow_inf_nan=False)',
             'model_config = ConfigDict(extra="ignore", allow_inf_nan=False)', ("tests/test_bad_openai.py",)),
    Mutation("openai: unknown message fields silently ignored", "src/yuanmoe/serving/app.py",
             'class ChatMessage(BaseModel):\n    model_config = ConfigDict(extra="forbid")',
             'class ChatMessage(BaseModel):\n    model_config = ConfigDict(extra="ignore")', ("tests/test_bad_openai.py",)),
    Mutation("openai: top_k unbounded", "src/yuanmoe/serving/app.py",
             "top_k: _number(int, 0, 2**31 - 1, default=0)", "top_k: _number(int, 0, default=0)",
             ("tests/test_bad_openai.py",)),
    Mutation("openai: range errors do not state the range", "src/yuanmoe/serving/app.py",
             'f"must be {what} {span}, got {{value}}"', '"is invalid, got {value}"', ("tests/test_bad_openai.py",)),
    Mutation("openai: stream_options taken without stream", "src/yuanmoe/serving/app.py",
             "        if body.stream_options is not None and not body.stream:", "        if False:",
             ("tests/test_bad_openai.py",)),
    Mutation("openai: token-id prompts not checked against the vocabulary", "src/yuanmoe/serving/app.py",
             "                    check_token_ids(text, model.config.vocab_size)", "                    pass",
             ("tests/test_bad_openai.py",)),
    Mutation("openai: frequency penalty ignored", "src/yuanmoe/inference/sampling.py",
             "logits - self.counts * self.frequency - (self.counts > 0)", "logits - (self.counts > 0)",
             ("tests/test_bad_openai.py",)),
    Mutation("openai: presence penalty ignored", "src/yuanmoe/inference/sampling.py",
             " - (self.counts > 0) * self.presence", "", ("tests/test_bad_openai.py",)),
    Mutation("openai: penalties never counted", "src/yuanmoe/inference/sampling.py",
             "            self.counts[torch.arange(len(tokens), device=tokens.device), tokens] += 1", "            pass",
             ("tests/test_bad_openai.py",)),
    Mutation("signals: SIGTERM taken for Ctrl-C (exit 130)", "src/yuanmoe/utils.py",
             "    raise Terminated()", "    raise KeyboardInterrupt()", ("tests/test_bad_signals.py",)),
    Mutation("signals: prepare writes straight into --out", "src/yuanmoe/data/prepare.py",
             '    with writing_folder(out, "meta.json", "prepared data") as folder:',
             '    out.mkdir(parents=True, exist_ok=True)\n    for folder in [out]:', ("tests/test_bad_signals.py",)),
    Mutation("signals: a training run signalled during setup stops without a checkpoint",
             "src/yuanmoe/training/trainer.py",
             "    with StopOnSignal() as stop:\n        return _train(",
             "    with StopOnSignal() as stop:\n        stop.__exit__()\n        return _train(",
             ("tests/test_bad_signals.py",)),
    Mutation("data files: deep nesting reaches the caller as RecursionError", "src/yuanmoe/data/sources.py",
             "    except RecursionError:", "    except MemoryError:", ("tests/test_bad_data_files.py",)),
    Mutation("data files: records that are not objects are read as text", "src/yuanmoe/data/sources.py",
             "    if not isinstance(record, dict):", "    if not isinstance(record, (dict, list, str, int, float)):",
             ("tests/test_bad_data_files.py",)),
    Mutation("data files: fields of other types are not refused", "src/yuanmoe/data/sources.py",
             "    if not isinstance(value, str):\n        raise", "    if not value:\n        raise",
             ("tests/test_bad_data_files.py",)),
    Mutation("data files: a prepared folder is silently replaced", "src/yuanmoe/data/prepare.py",
             '    if (out / "meta.json").is_file() and not overwrite:', "    if False:",
             ("tests/test_bad_data_files.py",)),
    Mutation("identity: special ids of an attached tokenizer not checked", "src/yuanmoe/checkpoint.py",
             "(\"pad\", tokenizer.pad_id, config.pad_token_id)) if ours != theirs]",
             "(\"pad\", tokenizer.pad_id, config.pad_token_id)) if False]", ("tests/test_bad_identity.py",)),
    Mutation("identity: an attached tokenizer larger than the vocabulary accepted", "src/yuanmoe/checkpoint.py",
             "    if tokenizer.vocab_size > config.vocab_size:", "    if False:", ("tests/test_bad_identity.py",)),
    Mutation("identity: convert --tokenizer not compared with SRC's own", "src/yuanmoe/convert/cli.py",
             "        if own is not None:  #", "        if False:  #", ("tests/test_bad_identity.py",)),
    Mutation("identity: merge does not compare the base's tokenizer", "src/yuanmoe/checkpoint.py",
             '    check_same_tokenizer(f"the adapters in {folder}"', '    (lambda *a: None)(f"the adapters in {folder}"',
             ("tests/test_bad_identity.py",)),
    Mutation("gptq folders: a shorter last group read as even groups", "src/yuanmoe/quant/formats.py",
             "    if regular != group_size:", "    if False:", ("tests/test_bad_quant_folders.py",)),
    Mutation("gptq folders: zero points AutoGPTQ dropped are not filled in", "src/yuanmoe/quant/formats.py",
             "        if not q.symmetric:\n            raise CheckpointError(f\"{stem}qzeros",
             "        if True:\n            raise CheckpointError(f\"{stem}qzeros", ("tests/test_bad_quant_folders.py",)),
    Mutation("gptq folders: columns AutoGPTQ dropped are not noticed", "src/yuanmoe/quant/formats.py",
             "    if codes.shape[1] != cols:", "    if False:", ("tests/test_bad_quant_folders.py",)),
]


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # caught, SURVIVED, STALE, ERROR
    failed: list[str]
    seconds: float
    tail: str = ""


def copy_repository(dest: Path) -> Path:
    """dest/repo with src/, tests/ and pyproject.toml, and dest/shared -> the real ../shared."""
    repo = dest / "repo"
    repo.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(ROOT / "src", repo / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", repo / "tests", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", repo)
    (dest / "shared").symlink_to(SHARED, target_is_directory=True)
    return repo


def build_kernels(repo: Path) -> str:
    """Compile the copy's C kernels over its copy of the extension, as setup.py does; '' when built."""
    import sysconfig

    source = repo / "src/yuanmoe/quant/csrc/qkernels.c"
    target = next((repo / "src/yuanmoe/quant").glob("_qkernels*.so"), None)
    if target is None:
        return "no built extension to replace (run `pip install -e .` first)"
    proc = subprocess.run(["cc", "-O3", "-fopenmp", "-std=gnu11", "-shared", "-fPIC", "-DYK_PYTHON_MODULE",
                           f"-I{sysconfig.get_paths()['include']}", "-o", str(target), str(source)],
                          capture_output=True, text=True)
    return proc.stderr[-500:] if proc.returncode else ""


def run_mutation(m: Mutation, timeout: int, first_failure_only: bool = True) -> Outcome:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="yuanmoe-mutation-") as tmp:
        repo = copy_repository(Path(tmp))
        target = repo / m.file
        text = target.read_text()
        count = text.count(m.old)
        if count != 1:
            return Outcome(m, "STALE", [f"target text found {count} times in {m.file}"], time.monotonic() - start)
        target.write_text(text.replace(m.old, m.new))
        if m.file.endswith(".c"):
            built = build_kernels(repo)
            if built:
                return Outcome(m, "ERROR", [f"the mutated kernels do not compile: {built}"], time.monotonic() - start)
        env = dict(os.environ, PYTHONPATH=str(repo / "src"), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        check = subprocess.run([sys.executable, "-c", "import yuanmoe; print(yuanmoe.__file__)"], cwd=repo, env=env,
                               capture_output=True, text=True)
        if not check.stdout.strip().startswith(str(repo)):
            return Outcome(m, "ERROR", [f"the copy's yuanmoe is not the one imported: {check.stdout.strip()}"],
                           time.monotonic() - start)
        command = [sys.executable, "-m", "pytest", "-q", *(["-x"] if first_failure_only else []),
                   "-p", "no:logging", "-p", "no:cacheprovider", "-o", "addopts=-rfE", *m.tests]
        try:
            proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(m, "ERROR", [f"timed out after {timeout} s"], time.monotonic() - start)
        out = proc.stdout + proc.stderr
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.MULTILINE)
        if proc.returncode == 0:
            status = "SURVIVED"
        elif proc.returncode == 1 and failed:
            status = "caught"
        else:
            status = "ERROR"
        return Outcome(m, status, failed, time.monotonic() - start, out[-2000:])


def print_table(outcomes: list[Outcome]) -> None:
    rows = [("mutation", "result", "failed tests", "s")]
    for o in outcomes:
        failed = f"{len(o.failed)}: " + ", ".join(f.split("::", 1)[-1] for f in o.failed) if o.failed else "-"
        rows.append((o.mutation.name, o.status, failed, f"{o.seconds:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, r in enumerate(rows):
        print(f"| {r[0]:<{widths[0]}} | {r[1]:<{widths[1]}} | {r[2]:<{widths[2]}} | {r[3]:>3} |")
        if i == 0:
            print(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|{'-' * (widths[2] + 2)}|-----|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("words", nargs="*", help="run only mutations whose name contains one of these words")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for one mutation's tests")
    parser.add_argument("--all", action="store_true", help="run every guarding test (no -x): list all that fail")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the pytest output of each mutation")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.words or any(w.lower() in m.name.lower() for w in args.words)]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.file} -> {' '.join(m.tests)}")
        return 0
    outcomes = []
    for m in chosen:
        outcome = run_mutation(m, args.timeout, first_failure_only=not args.all)
        print(f"{outcome.status:8} {m.name} ({outcome.seconds:.0f} s)", flush=True)
        if args.verbose or outcome.status == "ERROR":
            print(outcome.tail)
        outcomes.append(outcome)
    print()
    print_table(outcomes)
    return 0 if all(o.status == "caught" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
