"""Cached autoregressive decoding of a batch of prompts of different lengths.

The prompts are left-padded and prefilled in one forward: each pad gets position 0 (a document of
its own) and each prompt positions 0..n-1, so the model keeps pads out of attention and out of the
LFA filter. Then one token per step goes through the preallocated cache; a sequence that finishes
is dropped from the batch (`DecodeCache.reorder`), so the others never wait on dead rows. More
sequences can join a running batch (`BatchDecoder.add`, continuous batching): they are prefilled on
their own and their cache rows appended, right-aligned, at the next step.

The values the model does not check in a decode step are checked here, from Python lists, before
the first forward: every prompt id is in the vocabulary, and the budgets keep every position
within the context and every token within the cache.
"""

from __future__ import annotations

import functools

import torch

from ..model import DecodeCache
from .prefix_cache import PrefixCache
from .sampling import BatchSampler, SamplingParams

# Decode slots a batch's cache starts with beyond its prompts; it doubles whenever they run out (up
# to what the budgets need). A decode step attends over every slot of the cache, so a cache sized
# for the longest possible answer would make every step pay for keys that may never be written.
FIRST_DECODE_SLOTS = 128


def decode_step(model, tokens: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
    """One token per running sequence (tokens [rows, 1]) through the cache: next-token logits
    [rows, vocab]. Nothing in it waits on a tensor's value, so it compiles to one graph."""
    return model(tokens, cache=cache, logits_to_keep=1).logits[:, -1]


@functools.cache
def compiled_decode_step():
    """`decode_step` through torch.compile (inductor), made on first use: importing the compiler
    takes seconds, and compiling happens at the first call. Recompiles once when the batch or the
    cache size first changes, after which those sizes are symbolic."""
    return torch.compile(decode_step, fullgraph=True)


class BatchDecoder:
    """Decodes sequences together, one token per running sequence per `step()`.

    A sequence stops at a stop token (reason "stop"), after its max_new_tokens or at the end of the
    model's context ("length"), or when the caller ends it with `finish()` (a stop string, a client
    that went away). Finished sequences leave the batch before the next forward; `add()` starts
    more, which join at the next step.

    `compile=True` runs the decode steps through `compiled_decode_step()` (the first one compiles);
    the prefill stays eager.
    """

    def __init__(self, model, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 stop_token_ids: tuple[int, ...] | None = None, compile: bool = False,
                 prefix_cache: PrefixCache | None = None, prefix: tuple[dict, int] | None = None):
        if not prompts:
            raise ValueError("no prompts to decode")
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling settings")
        config = model.config
        context = config.max_position_embeddings
        for ids in prompts:
            check_prompt_length(len(ids), context)
            check_token_ids(ids, config.vocab_size)
        self.model = model
        self._decode_step = compiled_decode_step() if compile else decode_step
        # With a prefix cache, finished sequences leave their state to it; `prefix` (state, n) from its
        # lookup starts a single prompt from its first n tokens' state.
        self.prefix_cache = prefix_cache
        self.prompts = [list(ids) for ids in prompts]
        if prefix is not None and len(prompts) != 1:
            raise ValueError("a reused prefix starts a single prompt")
        prefix, reused = prefix if prefix is not None else (None, 0)
        self.stop_token_ids = (set(stop_token_ids) if stop_token_ids is not None
                               else {config.eod_token_id})
        self.budgets = [min(p.max_new_tokens, context - len(ids)) for p, ids in zip(params, prompts)]
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.finish_reasons: list[str | None] = [None] * len(prompts)
        self.rows = list(range(len(prompts)))  # the sequence held in each cache row
        device = model.device
        self.sampler = BatchSampler(params, prompts, config.vocab_size, device)

        width = max(len(ids) for ids in prompts)
        self.slots_needed = width + max(self.budgets)
        # Slots count left padding too, so a batch may need more slots than the context has positions;
        # the positions themselves stay within the context (checked above), so size the cache by slots.
        cache_config = (config if self.slots_needed <= context
                        else config.replace(max_position_embeddings=self.slots_needed))
        self.cache = DecodeCache(cache_config, len(prompts), min(self.slots_needed, width + FIRST_DECODE_SLOTS),
                                 model.dtype, device, keep_inputs=prefix_cache is not None)
        self.slots_written = width
        if reused:
            self.cache.load_prefix(prefix, reused)
            prompts = [prompts[0][reused:]]
            width -= reused
        input_ids = torch.full((len(prompts), width), config.pad_token_id, dtype=torch.long)
        positions = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            positions[row, width - len(ids):] = torch.arange(reused, reused + len(ids))
        with torch.inference_mode():
            self._logits = model(input_ids.to(device), position_ids=positions.to(device),
                                 cache=self.cache, logits_to_keep=1).logits[:, -1]
        self._last_tokens: torch.Tensor | None = None  # [rows, 1] the tokens chosen at the last step
        self._joining: list[BatchDecoder] = []  # prefilled sequences that join at the next step
        self._joined = False  # whether any have joined: only then can slots lose all their rows

    def add(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[int]:
        """Start more sequences while the batch runs: checked and prefilled now, in a forward of their
        own (a bad prompt raises here and changes nothing), they join the batch at the next `step()`.
        Returns their sequence numbers."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling settings")
        # With a prefix cache, each prompt that reuses a prefix is prefilled on its own (from its own
        # prefix length), the others together; all join at the next step.
        found = [self.prefix_cache.lookup(ids) if self.prefix_cache is not None else (None, 0) for ids in prompts]
        hits = [i for i, (_, n) in enumerate(found) if n]
        groups = [([i], found[i]) for i in hits] + [([i for i in range(len(prompts)) if i not in hits], None)]
        joiners = [(g, BatchDecoder(self.model, [prompts[i] for i in g], [params[i] for i in g],
                                    tuple(self.stop_token_ids), prefix_cache=self.prefix_cache, prefix=prefix))
                   for g, prefix in groups if g]  # all prefilled before any is added: a bad prompt changes nothing
        first = len(self.finish_reasons)
        self.budgets += [0] * len(prompts)
        self.generated += [[] for _ in prompts]
        self.finish_reasons += [None] * len(prompts)
        self.prompts += [list(ids) for ids in prompts]
        for group, joining in joiners:
            joining.rows = [first + i for i in group]
            for i, seq in zip(group, joining.rows):
                self.budgets[seq] = joining.budgets[group.index(i)]
            self._joining.append(joining)
        return list(range(first, first + len(prompts)))

    def forget(self, seq: int) -> None:
        """Drop the tokens kept for a finished sequence; a batch that others keep joining lives long."""
        if self.finish_reasons[seq] is not None:
            self.generated[seq] = []
            self.prompts[seq] = []

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)

    def finish(self, seq: int, reason: str = "stop") -> None:
        """End sequence `seq` now; its row leaves the batch before the next forward."""
        if self.finish_reasons[seq] is None:
            self.finish_reasons[seq] = reason
            if self.prefix_cache is not None and seq in self.rows:
                self._remember(self.rows.index(seq), seq)

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int]]:
        """Choose the next token of every running sequence; returns (sequence, token) pairs."""
        self._drop_finished()
        if self._last_tokens is not None and self.rows:
            if self.slots_written == self.cache.max_len:
                self.cache.grow(min(2 * self.cache.max_len, self.slots_needed))
            self._logits = self._decode_step(self.model, self._last_tokens, self.cache)
            self.slots_written += 1
        self._last_tokens = None
        if self._joining:
            self._merge_joining()
            self._drop_finished()
        if not self.rows:
            return []
        chosen = self.sampler(self._logits)
        tokens = chosen.tolist()
        for seq, token in zip(self.rows, tokens):
            self.generated[seq].append(token)
            if token in self.stop_token_ids:
                self.finish(seq, "stop")
            elif len(self.generated[seq]) >= self.budgets[seq]:
                self.finish(seq, "length")
        self._last_tokens = chosen.unsqueeze(1)
        return list(zip(self.rows, tokens))

    def _drop_finished(self) -> None:
        keep = [i for i, seq in enumerate(self.rows) if self.finish_reasons[seq] is None]
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.model.device)
        self.rows = [self.rows[i] for i in keep]
        self.sampler.keep(index)
        self._logits = self._logits[index]
        if self._last_tokens is not None:
            self._last_tokens = self._last_tokens[index]
        if keep:
            self.cache.reorder(index)
            if self._joined:  # slots only the rows that left attended to: drop them once they add up
                self.slots_written -= self.cache.trim(min_slots=self.cache.max_len // 4)
                self._update_slots_needed()

    def _remember(self, row: int, seq: int) -> None:
        """Give the prefix cache the state of a finished sequence: its prompt and the answer tokens
        fed back (all but the last), when they are one document and fit its budget."""
        fed = self.prompts[seq] + self.generated[seq][:-1]
        if any(t in self.stop_token_ids for t in fed) or len(fed) > int(self.cache.length):
            return  # several documents (or slots trimmed away): not a prefix another prompt can reuse
        if self.cache.row_bytes(len(fed)) <= self.prefix_cache.max_bytes:  # else not even copied
            self.prefix_cache.store(fed, self.cache.row_state(row, len(fed)))

    def _merge_joining(self) -> None:
        """Append the joining sequences' cache rows, sampler rows and next-token logits to the batch."""
        for joining in self._joining:
            if not self.rows:  # nothing left running: the joining batch takes over
                self.cache, self.sampler, self._logits = joining.cache, joining.sampler, joining._logits
                self.slots_written, self.rows = joining.slots_written, list(joining.rows)
                continue
            self.cache.append_rows(joining.cache)
            self.sampler.extend(joining.sampler)
            self._logits = torch.cat([self._logits, joining._logits])
            self.slots_written = max(self.slots_written, joining.slots_written)
            self.rows += joining.rows
            self._joined = True
        self._joining = []
        self._update_slots_needed()

    def _update_slots_needed(self) -> None:
        """Slots the running sequences may still fill: the written ones plus the longest budget left."""
        left = max((self.budgets[seq] - len(self.generated[seq]) for seq in self.rows), default=0)
        self.slots_needed = self.slots_written + left


def check_prompt_length(num_tokens: int, context: int) -> None:
    if num_tokens == 0:
        raise ValueError("the prompt is empty; give at least one token")
    if num_tokens >= context:
        raise ValueError(f"the prompt has {num_tokens} tokens but the model's context is {context}; "
                         f"shorten it to at most {context - 1} tokens to leave room for an answer")


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is out of range for a vocabulary of {vocab_size}; "
                         f"encode the prompt with the model's own tokenizer")


def decode_tokens(model, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                  stop_token_ids: tuple[int, ...] | None = None) -> tuple[list[list[int]], list[str]]:
    """Run a batch to the end: the generated ids of each prompt (stop token included) and why it ended."""
    decoder = BatchDecoder(model, prompts, params, stop_token_ids)
    while not decoder.done:
        decoder.step()
    return decoder.generated, decoder.finish_reasons


def generate(model, input_ids: torch.Tensor | list[list[int]], max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: int | None = None,
             stop_token_ids: tuple[int, ...] | None = None) -> torch.Tensor | list[list[int]]:
    """Prompts followed by their continuations, stopping at `<eod>` (or `stop_token_ids`).

    A tensor [batch, prompt] gives a tensor [batch, prompt + longest continuation], shorter ones
    padded with the pad token; a list of prompts of any lengths gives a list of full sequences.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        generated, _ = decode_tokens(model, input_ids.tolist(), params, stop_token_ids)
        longest = max(len(g) for g in generated)
        out = torch.full((input_ids.shape[0], input_ids.shape[1] + longest), model.config.pad_token_id,
                         dtype=torch.long, device=input_ids.device)
        out[:, : input_ids.shape[1]] = input_ids
        for row, ids in enumerate(generated):
            out[row, input_ids.shape[1]: input_ids.shape[1] + len(ids)] = torch.tensor(ids)
        return out
    generated, _ = decode_tokens(model, [list(p) for p in input_ids], params, stop_token_ids)
    return [list(p) + g for p, g in zip(input_ids, generated)]
