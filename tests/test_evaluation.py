import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import DATASETS
from yuanmoe.evaluation import answers, readers
from yuanmoe.evaluation.harness import HarnessModel
from yuanmoe.evaluation.lm import EvalModel
from yuanmoe.evaluation.sandbox import OUT_OF_MEMORY, PASSED, TIMEOUT, run_python
from yuanmoe.evaluation.tasks import humaneval_program


# ---- answer extraction and normalisation --------------------------------------------------------

@pytest.mark.parametrize("text, letter", [
    ("The correct answer is C. Thick and waxy.", "C"),
    ("Let's analyze each option.\nSo, the correct answer is:\nD. A decrease in nesting sites.", "D"),
    ("Therefore, the correct answer is **B. solar roof panels**.", "B"),
    ("Option A is the correct answer.", "A"),
    ("答案是：D", "D"),
    ("$\\boxed{C}$", "C"),
    ("(B)", "B"),
    ("A. Heat moves from the person's hand to the ice cube.", "A"),
    ("A bird builds a nest in the trees.", None),  # the article "A" is not a choice
    ("The answer is E.", None),  # not among the options
])
def test_choice_extraction_reads_the_letter_the_answer_settles_on(text, letter):
    assert answers.extract_choice(text, letters="ABCD") == letter


@pytest.mark.parametrize("text, number", [
    ("She has 24 + 18 = 42 muffins, so 42 - 35 = 7 are left.\nThe answer is 7.", "7"),
    ("The answer is 1,250 dollars, up from 900.", "1250"),
    ("#### -3", "-3"),
    ("So the total is $\\boxed{85}$.", "85"),
    ("He pays 2 * 3.5 = 7.50.", "7.50"),
    ("No numbers here.", None),
])
def test_gsm8k_extraction_takes_the_final_number(text, number):
    assert answers.extract_number(text) == number


def test_numbers_compare_by_value():
    assert answers.numbers_equal("7.50", "7.5")
    assert answers.numbers_equal("3/4", "0.75")
    assert not answers.numbers_equal("85", "86")
    assert not answers.numbers_equal(None, "1")


@pytest.mark.parametrize("a, b", [
    ("\\frac{1}{2}", "1/2"), ("1/2", "0.5"), ("\\dfrac12", "0.5"), ("\\frac{ 1 }{ 2 }", "\\tfrac{1}{2}"),
    ("x = 3", "3"), ("10\\%", "10"), ("90^\\circ", "90"), ("1,000", "1000"), ("(1, 2)", "(1,2)"),
    ("2x+1", "1 + 2x"), ("\\frac{\\sqrt{3}}{2}", "\\sqrt3/2"), ("5\\sqrt{2}", "\\sqrt{50}"),
    ("\\pi/2", "\\frac{\\pi}{2}"), ("\\text{(B)}", "B"), ("\\left( 3, 4 \\right)", "(3,4)"),
])
def test_equivalent_math_answers_are_equal(a, b):
    assert answers.math_equal(a, b)
    assert answers.math_equal(b, a)


@pytest.mark.parametrize("a, b", [("3", "4"), ("\\frac{1}{2}", "\\frac{1}{3}"), ("[1,2)", "(1,2)"),
                                  ("(1,2)", "(2,1)"), ("x+1", "x+2"), ("1,2,3", "1,2")])
def test_different_math_answers_are_not_equal(a, b):
    assert not answers.math_equal(a, b)


@pytest.mark.parametrize("text, answer", [
    ("so $x = \\frac{3}{2}$ and the answer is $\\boxed{\\frac{3}{2}}$.", "\\frac{3}{2}"),
    ("Nested: \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("The answer is $(1, 2)$.", "(1, 2)"),
    ("Adding them, u + 4u = 14", "14"),
])
def test_math_extraction_finds_the_final_expression(text, answer):
    assert answers.extract_math_answer(text) == answer


# ---- readers ------------------------------------------------------------------------------------

def test_readers_parse_the_official_benchmark_files():
    arc = readers.load_arc(DATASETS)
    assert len(arc) == 2344 and arc[0].answer == "C" and list(arc[0].choices) == ["A", "B", "C", "D"]
    assert "\n" in arc[0].question and "<n>" not in arc[0].question
    mmlu = readers.load_mmlu(DATASETS)
    assert len({p.subject for p in mmlu}) == 57 and all(p.answer in p.choices for p in mmlu)
    assert len(readers.load_gsm8k(DATASETS)) == 1319
    assert readers.load_math(DATASETS)[3].answer == "\\frac{3}{2}"
    humaneval = readers.load_humaneval(DATASETS, "instructions")
    assert len(humaneval) == 164 and humaneval[0].question.rstrip().endswith("-> bool:")


def test_a_line_without_sep_is_reported_with_its_place(tmp_path):
    (tmp_path / "GSM8K").mkdir()
    (tmp_path / "GSM8K" / "gsm8k.txt").write_text("What is 1+1?[SEP]2\nWhat is 2+2? 4\n")
    with pytest.raises(ValueError, match=r"gsm8k.txt:2 has no \[SEP\]"):
        readers.load_gsm8k(tmp_path)


# ---- the sandbox --------------------------------------------------------------------------------

def _first_humaneval_problem():
    return readers.load_humaneval(DATASETS, "plain")[0]


def test_sandbox_passes_a_correct_solution_and_fails_a_wrong_one():
    problem = _first_humaneval_problem()
    canonical = next(r for _, r in readers.read_jsonl(DATASETS / "HUMANEVAL" / "HumanEval.jsonl.gz")
                     if r["task_id"] == problem.id)["canonical_solution"]
    assert run_python(humaneval_program(problem, "plain", canonical)).status == PASSED
    wrong = run_python(humaneval_program(problem, "plain", "    return False\n"))
    assert not wrong.passed and "AssertionError" in wrong.detail


def test_instruction_style_completion_is_joined_to_the_signature_in_the_prompt():
    problem = readers.load_humaneval(DATASETS, "textprompts")[0]
    body = ("    return any(abs(a - b) < threshold for i, a in enumerate(numbers)\n"
            "               for j, b in enumerate(numbers) if i != j)\n")
    program = humaneval_program(problem, "textprompts", body + "\nprint(has_close_elements([1.0], 0.5))\n")
    assert "print(" not in program  # top-level test code the model adds is cut
    assert run_python(program).passed


def test_sandbox_kills_an_infinite_loop():
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == TIMEOUT and not result.passed
    assert time.monotonic() - start < 5


def test_sandbox_stops_a_memory_hog():
    result = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))\n", memory_mb=256)
    assert result.status == OUT_OF_MEMORY and not result.passed


def test_sandbox_has_no_network_and_a_private_working_directory(tmp_path):
    result = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert not result.passed and "network" in result.detail
    marker = tmp_path / "outside.txt"
    program = f"import os\nassert os.getcwd() != {str(Path.cwd())!r}\nopen('inside.txt', 'w').write('x')\n" \
              f"assert not os.path.exists({str(marker)!r})\n"
    assert run_python(program).passed


# ---- a tiny checkpoint that carries its tokenizer -----------------------------------------------

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from yuanmoe import YuanForCausalLM, preset
    from yuanmoe.checkpoint import save_pretrained
    from yuanmoe.tokenizer import BPETokenizer

    text = [(DATASETS / "GSM8K" / "gsm8k.txt").read_text()[:20000], (DATASETS / "ARC" / "ARC_challenge.txt").read_text()[:20000]]
    tokenizer = BPETokenizer.train(text, vocab_size=400)
    config = preset("tiny", vocab_size=tokenizer.vocab_size, eod_token_id=tokenizer.eod_id,
                    sep_token_id=tokenizer.sep_id, pad_token_id=tokenizer.pad_id, max_position_embeddings=2048)
    torch.manual_seed(0)
    return save_pretrained(YuanForCausalLM(config), tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_lm(tiny_checkpoint):
    return EvalModel.from_checkpoint(tiny_checkpoint, batch_size=4)


def _direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, from one plain forward."""
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def test_loglikelihood_matches_a_direct_forward_whatever_the_batch(tiny_lm):
    pairs = [([5, 9, 30, 41], [7, 8]), ([12], [100, 101, 102]), ([3, 4, 5, 6, 7, 8, 9, 10, 11], [200])]
    scores = tiny_lm.loglikelihood_ids(pairs)
    with torch.inference_mode():
        for (context, continuation), (logprob, greedy) in zip(pairs, scores):
            expected = _direct_logprobs(tiny_lm.model, context + continuation)[-len(continuation):]
            assert logprob == pytest.approx(float(expected.sum()), abs=1e-4)
            assert isinstance(greedy, bool)


def test_rolling_loglikelihood_scores_every_token_once(tiny_lm):
    ids = list(range(20, 60))
    with torch.inference_mode():
        expected = float(_direct_logprobs(tiny_lm.model, [tiny_lm.tokenizer.eod_id] + ids).sum())
    whole = sum(lp for lp, _ in tiny_lm.score_windows(tiny_lm.rolling_windows(ids)))
    assert whole == pytest.approx(expected, abs=1e-4)
    short = EvalModel(tiny_lm.model, tiny_lm.tokenizer, max_length=16)
    windows = short.rolling_windows(ids)
    assert sum(n for _, n in windows) == len(ids)
    assert all(len(tokens) - 1 <= 16 for tokens, _ in windows)
    assert len(windows[-1][0]) == 17  # the last window is read with a full context


def test_generation_stops_at_a_stop_string(tiny_lm):
    prompt = tiny_lm.tokenizer.encode("Question: how many apples?")
    free = tiny_lm.generate([prompt], max_new_tokens=12)[0].text
    assert free, "the random model should produce some text"
    stop = free[len(free) // 2:][:2]
    stopped = tiny_lm.generate([prompt], max_new_tokens=12, stop=(stop,))[0]
    assert stopped.text == free[: free.find(stop)] and stopped.finish_reason == "stop"


# ---- every task end to end ----------------------------------------------------------------------

@pytest.mark.parametrize("task, extra", [
    ("arc", ["--scoring", "generate"]),
    ("arc", ["--scoring", "loglikelihood"]),
    ("mmlu", ["--scoring", "loglikelihood", "--limit", "3"]),
    ("gsm8k", []),
    ("math", []),
    ("humaneval", ["--prompts", "instructions"]),
])
def test_every_task_runs_end_to_end_from_the_command_line(task, extra, tiny_checkpoint, tmp_path, capsys):
    from yuanmoe.cli import main

    out = tmp_path / "results.json"
    argv = ["eval", task, str(tiny_checkpoint), "--limit", "2", "--max-new-tokens", "4", "--out", str(out),
            "--data", str(DATASETS), "--batch-size", "8", *extra]
    assert main(argv) == 0
    result = json.loads(out.read_text())["results"][task]
    expected_total = 3 if task == "mmlu" else 2
    assert result["total"] == expected_total == len(result["records"])
    assert 0 <= result["correct"] <= result["total"] and result["score"] == result["correct"] / result["total"]
    if task == "mmlu":  # a limited run samples across subjects
        assert len(result["subjects"]) == 3
    if task == "humaneval":
        assert {r["status"] for r in result["records"]} <= {"passed", "failed", "timed out", "out of memory"}
    assert task in capsys.readouterr().out  # the printed table


def test_a_missing_data_folder_is_a_one_line_error(tiny_checkpoint, tmp_path, capsys):
    from yuanmoe.cli import main

    assert main(["eval", "arc", str(tiny_checkpoint), "--data", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_perplexity_of_text_equals_that_of_the_same_text_prepared(tiny_checkpoint, tiny_lm, tmp_path):
    from yuanmoe.cli import main
    from yuanmoe.data import prepare_dataset
    from yuanmoe.evaluation.perplexity import perplexity

    text = tmp_path / "docs.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"Question {i}: what is {i} plus {i}? It is {2 * i}."})
                              for i in range(6)) + "\n")
    prepared = tmp_path / "prepared"
    prepare_dataset([str(text)], prepared, tokenizer=tiny_checkpoint, heldout_fraction=0.0, workers=1,
                    progress=False)
    from_text = perplexity(tiny_lm, text, progress=False)
    from_tokens = perplexity(tiny_lm, prepared, split="train", progress=False)
    assert from_text["documents"] == from_tokens["documents"] == 6
    assert from_text["tokens"] == from_tokens["tokens"]
    assert from_text["score"] == pytest.approx(from_tokens["score"], rel=1e-5)
    assert 1 < from_text["score"] < 2 * tiny_lm.tokenizer.vocab_size  # a random model is near uniform
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", str(tiny_checkpoint), str(text), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"]["perplexity"]["score"] == pytest.approx(from_text["score"], rel=1e-5)


# ---- lm-evaluation-harness ----------------------------------------------------------------------

def _request(*args):
    return SimpleNamespace(args=args)  # what the harness's Instance offers


def test_harness_model_answers_each_request_type(tiny_lm):
    harness = HarnessModel(lm=tiny_lm)
    pairs = [("Question: what is two plus two?\nAnswer:", " four"), ("", "Hello")]
    scored = harness.loglikelihood([_request(*p) for p in pairs], disable_tqdm=True)
    assert scored == tiny_lm.loglikelihood(pairs)
    assert all(isinstance(lp, float) and lp < 0 and isinstance(g, bool) for lp, g in scored)

    texts = ["The sun is a star.", "Water boils at one hundred degrees."]
    rolling = harness.loglikelihood_rolling([_request(t) for t in texts], disable_tqdm=True)
    assert rolling == pytest.approx([tiny_lm.rolling_loglikelihood(t)[0] for t in texts], abs=1e-4)

    free = tiny_lm.generate([tiny_lm.tokenizer.encode("Question:")], max_new_tokens=10)[0].text
    until = free[3:5]
    outputs = harness.generate_until([_request("Question:", {"until": [until], "max_gen_toks": 10}),
                                      _request("Question:", {"max_gen_toks": 3})], disable_tqdm=True)
    assert outputs[0] == free[: free.find(until)]
    assert len(tiny_lm.tokenizer.encode(outputs[1])) <= 3


def test_harness_registration_needs_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        from yuanmoe.evaluation.harness import run_lm_eval

        with pytest.raises(ValueError, match="pip install"):
            run_lm_eval(["--tasks", "arc_easy"])
        return
    from yuanmoe.evaluation.harness import register

    assert register() is register()


# ---- scoring against an answer key ----------------------------------------------------------------

class AnswerKeyModel:
    """Stands in for a model: answers the problems with canned outputs, in the order asked, so the
    score a correct scorer must give is known in advance."""

    def __init__(self, tokenizer, outputs=(), option_scores=()):
        self.tokenizer, self.outputs, self.option_scores = tokenizer, list(outputs), list(option_scores)

    def generate(self, prompts, max_new_tokens, stop=(), progress=False):
        from yuanmoe.evaluation.lm import Generation

        assert len(prompts) == len(self.outputs)
        return [Generation(text, "stop") for text in self.outputs]

    def loglikelihood(self, pairs, progress=False):
        assert len(pairs) == len(self.option_scores)
        return [(score, False) for score in self.option_scores]


def test_gsm8k_scores_right_answers_right_and_wrong_ones_wrong(bpe):
    from yuanmoe.evaluation.tasks import TaskSettings, run_task

    references = [p.answer for p in readers.load_gsm8k(DATASETS)[:4]]
    outputs = [f"Step by step we get it. The answer is {references[0]}",
               f"The answer is {float(references[1]) + 1:g}",
               f"So {references[0]} is wrong; the total is {references[2]}",
               "I cannot tell."]
    result = run_task("gsm8k", AnswerKeyModel(bpe, outputs), DATASETS, settings=TaskSettings(limit=4),
                      progress=False)
    assert [r["correct"] for r in result.records] == [True, False, True, False]
    assert (result.correct, result.total, result.score) == (2, 4, 0.5)


def test_multiple_choice_by_loglikelihood_picks_the_likeliest_letter(bpe):
    from yuanmoe.evaluation.tasks import TaskSettings, run_task

    problems = readers.load_arc(DATASETS)[:2]
    scores = []
    for p, right in zip(problems, (True, False)):
        letters = list(p.choices)
        best = p.answer if right else next(letter for letter in letters if letter != p.answer)
        scores += [-1.0 if letter == best else -5.0 for letter in letters]
    result = run_task("arc", AnswerKeyModel(bpe, option_scores=scores), DATASETS, progress=False,
                      settings=TaskSettings(limit=2, scoring="loglikelihood"))
    assert [r["correct"] for r in result.records] == [True, False] and result.score == 0.5
