"""The benchmarks the released model is judged on, each scored the way the official scripts score
it: ARC-Challenge and MMLU (multiple choice: generate and match the letter, or compare the
log-likelihoods of the letters), GSM8K and MATH (generate a worked answer, extract and compare the
final answer), HumanEval (generate code, run its tests in a sandbox; pass@1 with greedy decoding).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from .answers import extract_choice, extract_math_answer, extract_number, math_equal, numbers_equal
from .prompts import FEW_SHOT_STOP, GSM8K_SHOTS, MATH_SHOTS, few_shot_text, multiple_choice_text, sep_prompt
from .readers import Problem, load_arc, load_gsm8k, load_humaneval, load_math, load_mmlu
from .lm import EvalModel
from .sandbox import run_python

MC_SCORINGS = ("generate", "loglikelihood")


@dataclass
class TaskSettings:
    limit: int | None = None  # first N problems (MMLU: taken round-robin over the subjects)
    scoring: str = "generate"  # multiple choice only: one of MC_SCORINGS
    shots: int | None = None  # few-shot examples; None = the task's official number
    max_new_tokens: int | None = None  # None = the task's default
    humaneval_prompts: str = "textprompts"  # one of readers.HUMANEVAL_PROMPT_STYLES
    timeout_s: float = 10.0  # HumanEval: per program
    memory_mb: int = 1024  # HumanEval: address space per program
    workers: int = 4  # HumanEval: programs run at once


@dataclass
class TaskResult:
    task: str
    metric: str  # "accuracy" or "pass@1"
    correct: int
    total: int
    settings: dict
    subjects: dict[str, dict] = field(default_factory=dict)  # MMLU: per-subject correct/total/score
    records: list[dict] = field(default_factory=list)  # per problem: id, reference, prediction, correct, ...

    @property
    def score(self) -> float:
        return self.correct / self.total  # run_task refuses zero problems: never a 0/0 score

    def to_dict(self) -> dict:
        return {"score": self.score, **asdict(self)}


def _limit(problems: list[Problem], limit: int | None) -> list[Problem]:
    if limit is None:
        return problems
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    return problems[:limit]


def _interleave_subjects(problems: list[Problem]) -> list[Problem]:
    """The first problem of every subject, then the second of every subject, and so on."""
    by_subject = defaultdict(list)
    for p in problems:
        by_subject[p.subject].append(p)
    rounds = max(len(group) for group in by_subject.values())
    return [group[i] for i in range(rounds) for group in by_subject.values() if i < len(group)]


def _output_text(text: str) -> str:
    """Official-format output writes newlines as <n>; read them as newlines."""
    return text.replace("<n>", "\n")


# ---- multiple choice ---------------------------------------------------------------------------

def score_multiple_choice(lm: EvalModel, problems: list[Problem], settings: TaskSettings,
                          progress: bool) -> list[dict]:
    if settings.scoring not in MC_SCORINGS:
        raise ValueError(f"unknown scoring {settings.scoring!r}; choose one of {', '.join(MC_SCORINGS)}")
    if settings.scoring == "loglikelihood":
        return _mc_by_loglikelihood(lm, problems, progress)
    ids = [sep_prompt(lm.tokenizer, multiple_choice_text(p.question)) for p in problems]
    outputs = lm.generate(ids, settings.max_new_tokens or 256, progress=progress)
    records = []
    for p, out in zip(problems, outputs):
        text = _output_text(out.text)
        predicted = extract_choice(text, letters="".join(p.choices))
        records.append(_record(p, predicted, predicted == p.answer, output=text))
    return records


def _mc_by_loglikelihood(lm: EvalModel, problems: list[Problem], progress: bool) -> list[dict]:
    """Each option letter scored as the continuation of "...question\\nAnswer:"; the likeliest wins."""
    pairs = [(multiple_choice_text(p.question) + "\nAnswer:", f" {letter}")
             for p in problems for letter in p.choices]
    scores = iter(lm.loglikelihood(pairs, progress=progress))
    records = []
    for p in problems:
        option_scores = {letter: next(scores)[0] for letter in p.choices}
        predicted = max(option_scores, key=option_scores.get)
        records.append(_record(p, predicted, predicted == p.answer, logprobs=option_scores))
    return records


# ---- GSM8K and MATH ----------------------------------------------------------------------------

def score_gsm8k(lm: EvalModel, problems: list[Problem], settings: TaskSettings, progress: bool) -> list[dict]:
    return _score_worked_answers(lm, problems, settings, progress, GSM8K_SHOTS, extract_number,
                                 numbers_equal)


def score_math(lm: EvalModel, problems: list[Problem], settings: TaskSettings, progress: bool) -> list[dict]:
    return _score_worked_answers(lm, problems, settings, progress, MATH_SHOTS, extract_math_answer,
                                 math_equal)


def _score_worked_answers(lm, problems, settings, progress, shots, extract, equal) -> list[dict]:
    count = len(shots) if settings.shots is None else settings.shots
    ids = [sep_prompt(lm.tokenizer, few_shot_text(shots, count, p.question)) for p in problems]
    outputs = lm.generate(ids, settings.max_new_tokens or 512, stop=FEW_SHOT_STOP, progress=progress)
    records = []
    for p, out in zip(problems, outputs):
        text = _output_text(out.text)
        predicted = extract(text)
        records.append(_record(p, predicted, equal(predicted, p.answer), output=text))
    return records


# ---- HumanEval ---------------------------------------------------------------------------------

PLAIN_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
FENCE_STOP = ("\n```",)
_TOP_LEVEL_TEST_CODE = ("print(", "assert ", "if __name__")


def humaneval_program(problem: Problem, style: str, completion: str) -> str:
    """The program that passes when the completion is right: the original prompt (its imports and
    helper functions), the completed function, the tests, and the call of `check`.

    For instruction-style prompts the model writes the whole function inside a code fence that the
    prompt opened with the function's signature; that signature is taken from the prompt."""
    if style == "plain":
        code = problem.code["prompt"] + completion
    else:
        fence = problem.question.rfind("```python")
        opened = problem.question[fence + len("```python"):].lstrip("\n") if fence >= 0 else ""
        code = problem.code["prompt"] + "\n" + opened + completion
    lines = code.split("\n")
    cut = next((i for i, line in enumerate(lines) if line.startswith(_TOP_LEVEL_TEST_CODE)), len(lines))
    code = "\n".join(lines[:cut])
    return f"{code}\n\n{problem.code['test']}\n\ncheck({problem.code['entry_point']})\n"


def score_humaneval(lm: EvalModel, problems: list[Problem], settings: TaskSettings,
                    progress: bool) -> list[dict]:
    style = settings.humaneval_prompts
    ids = [lm.tokenizer.encode(p.question) for p in problems]
    outputs = lm.generate(ids, settings.max_new_tokens or 512, stop=PLAIN_STOP if style == "plain" else FENCE_STOP,
                          progress=progress)
    completions = [_output_text(out.text) for out in outputs]
    programs = [humaneval_program(p, style, c) for p, c in zip(problems, completions)]
    with ThreadPoolExecutor(max_workers=max(1, settings.workers)) as pool:
        runs = pool.map(lambda program: run_python(program, settings.timeout_s, settings.memory_mb), programs)
        results = list(tqdm(runs, total=len(programs), desc="tests", disable=not progress, leave=False))
    return [_record(p, None, r.passed, output=c, status=r.status, detail=r.detail)
            for p, c, r in zip(problems, completions, results)]


def _record(problem: Problem, predicted, correct: bool, **extra) -> dict:
    record = {"id": problem.id, "reference": problem.answer, "prediction": predicted, "correct": bool(correct)}
    return {**record, **extra}


# ---- the registry ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    load: Callable[[str, TaskSettings], list[Problem]]
    score: Callable[[EvalModel, list[Problem], TaskSettings, bool], list[dict]]
    description: str


TASKS = {
    "arc": Task("arc", "accuracy", lambda d, s: load_arc(d), score_multiple_choice,
                "ARC-Challenge, multiple choice"),
    "mmlu": Task("mmlu", "accuracy", lambda d, s: load_mmlu(d), score_multiple_choice,
                 "MMLU, 57 subjects, multiple choice"),
    "gsm8k": Task("gsm8k", "accuracy", lambda d, s: load_gsm8k(d), score_gsm8k,
                  "GSM8K grade-school math, 8-shot, final number"),
    "math": Task("math", "accuracy", lambda d, s: load_math(d), score_math,
                 "MATH competition problems, 4-shot, final expression"),
    "humaneval": Task("humaneval", "pass@1", lambda d, s: load_humaneval(d, s.humaneval_prompts),
                      score_humaneval, "HumanEval Python functions, tests run in a sandbox"),
}


def _settings_used(task: Task, settings: TaskSettings) -> dict:
    used = {"limit": settings.limit, "max_new_tokens": settings.max_new_tokens}
    if task.score is score_multiple_choice:
        used["scoring"] = settings.scoring
    if task.name == "gsm8k":
        used["shots"] = len(GSM8K_SHOTS) if settings.shots is None else settings.shots
    if task.name == "math":
        used["shots"] = len(MATH_SHOTS) if settings.shots is None else settings.shots
    if task.name == "humaneval":
        used.update(prompts=settings.humaneval_prompts, timeout_s=settings.timeout_s, memory_mb=settings.memory_mb)
    return used


def run_task(name: str, lm: EvalModel, data_dir, settings: TaskSettings | None = None,
             progress: bool = True) -> TaskResult:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    task, settings = TASKS[name], settings or TaskSettings()
    problems = task.load(data_dir, settings)
    if not problems:
        raise ValueError(f"the {name} files in {data_dir} hold no problems; point --data at the benchmark "
                         f"datasets folder")
    if name == "mmlu" and settings.limit is not None:
        problems = _interleave_subjects(problems)  # so that a limited run samples every subject
    problems = _limit(problems, settings.limit)
    records = task.score(lm, problems, settings, progress)
    result = TaskResult(name, task.metric, sum(r["correct"] for r in records), len(records),
                        _settings_used(task, settings), records=records)
    if name == "mmlu":
        for p, r in zip(problems, records):
            counts = result.subjects.setdefault(p.subject, {"correct": 0, "total": 0})
            counts["correct"] += r["correct"]
            counts["total"] += 1
        for counts in result.subjects.values():
            counts["score"] = counts["correct"] / counts["total"]
    return result
