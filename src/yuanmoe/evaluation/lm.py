"""A model and its tokenizer, seen the way an evaluation sees them: log-likelihoods of
continuations, rolling log-likelihoods of whole texts, and greedy generation until a stop.

Everything here works on token ids; the text methods tokenise a context and its continuation
together and split them afterwards, so a continuation's first token is the one the model would
really see after that context (lm-evaluation-harness does the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (end token or stop string) or "length"


class EvalModel:
    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_position_embeddings

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, batch_size: int = 8) -> "EvalModel":
        """A checkpoint folder that carries its tokenizer (ours or the official one); device and
        dtype as from_pretrained takes them (auto, cuda:1, bfloat16, ...)."""
        from ..checkpoint import from_pretrained
        from ..tokenizer import load_tokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {path} does not exist")
        model = from_pretrained(path, dtype=dtype, device=device)
        return cls(model, load_tokenizer(path), batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- log-likelihood ---------------------------------------------------------------------------

    def split_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation as they come out of tokenising them together."""
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context) if context else []
        if whole[: len(ctx)] != ctx or len(ctx) == len(whole):  # the boundary merged into one token
            return ctx, self.tokenizer.encode(continuation)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: bool = False) -> list[tuple[float, bool]]:
        return self.loglikelihood_ids([self.split_pair(c, x) for c, x in pairs], progress)

    @torch.inference_mode()
    def loglikelihood_ids(self, pairs: list[tuple[list[int], list[int]]],
                          progress: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding would produce the continuation)
        for each pair. An empty context is read as the start of a document (`<eod>` before it)."""
        if any(not cont for _, cont in pairs):
            raise ValueError("a continuation to score is empty")
        # Longest first: batches of similar length waste less padding.
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="log-likelihood", disable=not progress, leave=False):
            rows = [self._window(*pairs[i]) for i in batch]
            for i, scored in zip(batch, self._score_rows(rows)):
                results[i] = scored
        return results

    def _window(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """The model input (at most max_length tokens) and how many of its last targets to score."""
        tokens = ([self.tokenizer.eod_id] if not context else list(context)) + list(continuation)
        tokens = tokens[-(self.max_length + 1):]  # keep the end: the continuation and what is nearest it
        return tokens, min(len(continuation), len(tokens) - 1)

    def _score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        width = max(len(tokens) - 1 for tokens, _ in rows)
        # Right padding: causal attention and the causal LFA filter never look ahead, so pads after a
        # row's last token change none of its logits.
        inputs = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        for r, (tokens, _) in enumerate(rows):
            inputs[r, : len(tokens) - 1] = torch.tensor(tokens[:-1])
        logits = self.model(inputs.to(self.device)).logits
        out = []
        for r, (tokens, n) in enumerate(rows):
            end = len(tokens) - 1
            step_logits = logits[r, end - n: end].float()  # [n, vocab]: only these rows get a softmax
            targets = torch.tensor(tokens[-n:], device=step_logits.device)
            logprobs = F.log_softmax(step_logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
            greedy = bool((step_logits.argmax(dim=-1) == targets).all())
            out.append((float(logprobs.sum()), greedy))
        return out

    def rolling_loglikelihood(self, text: str) -> tuple[float, int]:
        """(log p(text) from a document start, number of tokens scored)."""
        ids = self.tokenizer.encode(text)
        return sum(lp for lp, _ in self.score_windows(self.rolling_windows(ids))), len(ids)

    def rolling_windows(self, ids: list[int]) -> list[tuple[list[int], int]]:
        """Windows that score every token of `ids` exactly once given only a document start
        (`<eod>`): at most max_length predictions each, each read with as much preceding text as
        fits (so the last window has a full context even when it scores only a few tokens).
        Each window is (tokens, how many of its last tokens are scored)."""
        tokens = [self.tokenizer.eod_id] + list(ids)
        windows = []
        for start in range(1, len(tokens), self.max_length):
            end = min(start + self.max_length, len(tokens))  # score tokens[start:end]
            windows.append((tokens[max(0, end - 1 - self.max_length): end], end - start))
        return windows

    @torch.inference_mode()
    def score_windows(self, windows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(summed log-probability, all greedy) of the scored tokens of each window, in batches."""
        out = []
        for i in range(0, len(windows), self.batch_size):
            out += self._score_rows(windows[i: i + self.batch_size])
        return out

    # ---- generation -------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop: tuple[str, ...] = (),
                 temperature: float = 0.0, progress: bool = False) -> list[Generation]:
        """Continuations of the prompts (greedy unless a temperature is given), in batches, each
        ending at `<eod>`, at the first of the stop strings (not included), or after max_new_tokens.
        A prompt longer than the context leaves keeps its end."""
        from ..inference import Request, SamplingParams, run_requests

        max_new_tokens = min(max_new_tokens, self.max_length - 1)
        keep = self.max_length - max_new_tokens
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop=tuple(stop))
        # Similar lengths together: a batch is left-padded to its longest prompt.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Generation | None] = [None] * len(prompts)
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="generate", disable=not progress, leave=False):
            # An empty prompt starts a new document.
            requests = [Request(list(prompts[i])[-keep:] or [self.tokenizer.eod_id], params) for i in batch]
            for _ in run_requests(self.model, self.tokenizer, requests):
                pass
            for i, r in zip(batch, requests):
                results[i] = Generation(r.text, r.finish_reason)
        return results
