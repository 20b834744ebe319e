"""Evaluation: the official benchmark files (ARC, MMLU, GSM8K, MATH, HumanEval), perplexity, and
an lm-evaluation-harness model. `yuan eval TASK CKPT`, `yuan eval perplexity CKPT DATA`."""

from .answers import extract_choice, extract_math_answer, extract_number, math_equal, normalize_math, numbers_equal
from .lm import EvalModel
from .perplexity import perplexity
from .sandbox import ExecutionResult, run_python
from .tasks import TASKS, TaskResult, TaskSettings, run_task

__all__ = ["EvalModel", "ExecutionResult", "TASKS", "TaskResult", "TaskSettings", "extract_choice",
           "extract_math_answer", "extract_number", "math_equal", "normalize_math", "numbers_equal", "perplexity",
           "run_python", "run_task"]
