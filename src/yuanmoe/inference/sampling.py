"""How the next token is chosen from the logits: greedy, or sampled after temperature, top-k,
top-p, a repetition penalty and OpenAI's frequency and presence penalties, each row of a batch with
its own settings and its own seed."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# torch.Generator.manual_seed takes any integer in this range.
SEED_RANGE = (-2**63, 2**64 - 1)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    # OpenAI's: the logit of a token the output holds c times drops by c * frequency_penalty + presence_penalty.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # a seeded row samples the same tokens whatever else is in its batch
    stop: tuple[str, ...] = ()  # text that ends the output (not included in it)

    def __post_init__(self) -> None:
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        for name in ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {self.seed}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class BatchSampler:
    """Chooses one token per row; rows can be dropped as their sequences finish (`keep`)."""

    def __init__(self, params: list[SamplingParams], prompts: list[list[int]], vocab_size: int,
                 device: torch.device):
        self.params = list(params)
        self.generators = []
        for p in self.params:
            gen = None
            if p.seed is not None and not p.greedy:
                gen = torch.Generator(device=device)
                gen.manual_seed(p.seed)
            self.generators.append(gen)
        self.penalty = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
        self.seen = None
        if any(p.repetition_penalty != 1.0 for p in params):
            self.seen = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)
            for row, ids in enumerate(prompts):
                self.seen[row, ids] = True
        self.frequency = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
        self.presence = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
        self.counts = None  # [rows, vocab] how often each token was sampled so far (not the prompt: OpenAI's c)
        if any(p.frequency_penalty or p.presence_penalty for p in params):
            self.counts = torch.zeros(len(params), vocab_size, device=device)

    def keep(self, rows: torch.Tensor) -> None:
        index = rows.tolist()
        self.params = [self.params[i] for i in index]
        self.generators = [self.generators[i] for i in index]
        self.penalty, self.frequency, self.presence = self.penalty[rows], self.frequency[rows], self.presence[rows]
        if self.seen is not None:
            self.seen = self.seen[rows]
        if self.counts is not None:
            self.counts = self.counts[rows]

    def extend(self, other: "BatchSampler") -> None:
        """Add the rows of another sampler (sequences joining a running batch) after these."""
        for name in ("seen", "counts"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is None and theirs is None:
                continue
            # Rows without that penalty ignore the tensor, so the side without one gets an empty one.
            mine = theirs.new_zeros(len(self.params), theirs.shape[1]) if mine is None else mine
            theirs = mine.new_zeros(len(other.params), mine.shape[1]) if theirs is None else theirs
            setattr(self, name, torch.cat([mine, theirs]))
        self.params += other.params
        self.generators += other.generators
        self.penalty = torch.cat([self.penalty, other.penalty])
        self.frequency = torch.cat([self.frequency, other.frequency])
        self.presence = torch.cat([self.presence, other.presence])

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [rows, vocab] -> token ids [rows]."""
        logits = logits.float()
        if self.seen is not None:
            # CTRL-style penalty: shrink the logit of every token seen so far, whatever its sign. A
            # tiny or huge penalty may overflow; clamping keeps every logit finite for what follows.
            penalized = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            big = torch.finfo(logits.dtype).max
            logits = torch.where(self.seen, penalized, logits).clamp(-big, big)
        if self.counts is not None:
            logits = logits - self.counts * self.frequency - (self.counts > 0) * self.presence
        tokens = logits.argmax(dim=-1)
        sampled = [row for row, p in enumerate(self.params) if not p.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            probs = self._filtered_probs(logits[rows], [self.params[r] for r in sampled])
            for i, row in enumerate(sampled):
                tokens[row] = torch.multinomial(probs[i], 1, generator=self.generators[row])[0]
        if self.seen is not None:
            self.seen[torch.arange(len(tokens), device=tokens.device), tokens] = True
        if self.counts is not None:
            self.counts[torch.arange(len(tokens), device=tokens.device), tokens] += 1
        return tokens

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        device = logits.device
        # A temperature below float32's smallest normal number would round to 0 in the tensor.
        tiny = torch.finfo(torch.float32).tiny
        temperature = torch.tensor([max(p.temperature, tiny) for p in params], device=device).unsqueeze(1)
        # Shift each row's largest logit to 0 first: then any positive temperature, however small,
        # divides into 0 and negative numbers (at worst -inf), never into inf - inf = nan.
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        rank = torch.arange(vocab, device=device)
        top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in params], device=device).unsqueeze(1)
        drop = rank >= top_k
        # Top-p keeps the smallest prefix whose mass reaches p: a token goes once the mass before it does.
        # The most likely token always stays (a p below float32's range rounds to 0 in the tensor).
        top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        drop |= ((probs.cumsum(dim=-1) - probs) >= top_p) & (rank > 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filtered = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        return torch.softmax(filtered, dim=-1)
