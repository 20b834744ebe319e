"""lm-evaluation-harness support: the `yuanmoe` model.

`HarnessModel` answers the harness's three request types from an `EvalModel`; it needs only
objects with an `.args` tuple (the harness's `Instance`), so it works and is tested without the
harness installed. `register()` makes it the harness model `yuanmoe` when lm_eval is importable
(`pip install 'yuanmoe[eval]'`). lm_eval finds models only among its own modules, so this module
registers it first and then runs the harness:

    yuan eval harness CKPT --tasks arc_easy,hellaswag --limit 50
    python -m yuanmoe.evaluation.harness --model_args pretrained=CKPT --tasks arc_easy   # lm_eval's CLI
"""

from __future__ import annotations

import sys
from collections import defaultdict

from .lm import EvalModel

MODEL_NAME = "yuanmoe"
DEFAULT_MAX_GEN_TOKS = 256


class HarnessModel:
    """loglikelihood, loglikelihood_rolling and generate_until, as lm-evaluation-harness calls them."""

    def __init__(self, pretrained: str | None = None, batch_size: int | str = 8, device: str | None = None,
                 dtype: str | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, lm: EvalModel | None = None,
                 **harness_options):
        # harness_options: settings lm_eval passes to every model (max_batch_size, ...), unused here.
        if lm is None:
            if pretrained is None:
                raise ValueError("give the checkpoint folder: --model_args pretrained=CKPT")
            # lm_eval's --device when given, else the commands' auto (CUDA when present).
            lm = EvalModel.from_checkpoint(pretrained, device=device or "auto", dtype=dtype,
                                           batch_size=_batch_size(batch_size))
        self.lm = lm
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Each request's args: (context, continuation)."""
        return self.lm.loglikelihood([tuple(r.args) for r in requests], progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each request's args: (text,); the log-likelihood of all of it from a document start."""
        per_request = [self.lm.rolling_windows(self.lm.tokenizer.encode(r.args[0])) for r in requests]
        scores = iter(self.lm.score_windows([w for windows in per_request for w in windows]))
        return [sum(next(scores)[0] for _ in windows) for windows in per_request]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's args: (context, gen_kwargs) with `until` (stop strings), `max_gen_toks`,
        and optionally `do_sample` / `temperature`. Requests with equal settings share batches."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[self._generation_settings(request.args[1])].append(i)
        outputs: list[str] = [""] * len(requests)
        for (stop, max_new_tokens, temperature), indices in groups.items():
            prompts = [self.lm.tokenizer.encode(requests[i].args[0]) for i in indices]
            for i, generation in zip(indices, self.lm.generate(prompts, max_new_tokens, stop, temperature,
                                                                progress=not disable_tqdm)):
                outputs[i] = generation.text
        return outputs

    def _generation_settings(self, gen_kwargs: dict) -> tuple[tuple[str, ...], int, float]:
        until = gen_kwargs.get("until") or ()
        stop = (until,) if isinstance(until, str) else tuple(until)
        temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
        return stop, int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), temperature


def _batch_size(value: int | str) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be a whole number, got {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    return size


def register():
    """Register `yuanmoe` with lm_eval (idempotent); returns the registered class."""
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model, model_registry, register_model

    if MODEL_NAME in model_registry:
        return get_model(MODEL_NAME)

    @register_model(MODEL_NAME)
    class YuanMoELM(HarnessModel, LM):
        def __init__(self, **kwargs):
            LM.__init__(self)
            HarnessModel.__init__(self, **kwargs)

    return YuanMoELM


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ValueError("lm-evaluation-harness is not installed; install it with pip install -e '.[eval]' in the repository (docs/evaluation.md)") from None
    return lm_eval


def evaluate_with_harness(lm: EvalModel, tasks: list[str], limit: int | None = None, num_fewshot: int | None = None,
                          include_path: str | None = None) -> dict:
    """Run lm_eval tasks on an already loaded model; prints lm_eval's table, returns its per-task metrics."""
    _import_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    model = register()(lm=lm)
    output = simple_evaluate(model=model, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                             task_manager=TaskManager(include_path=include_path))
    print(make_table(output))
    return output["results"]


def run_lm_eval(argv: list[str]) -> int:
    """lm_eval's own command line with `yuanmoe` registered (and chosen, unless --model says otherwise)."""
    _import_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    register()
    if "--model" not in argv:
        argv = ["--model", MODEL_NAME, *argv]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(run_lm_eval(sys.argv[1:]))
