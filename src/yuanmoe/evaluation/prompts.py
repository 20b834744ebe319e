"""The prompts the evaluation sends, in the official format: each problem is one record whose
question is followed by the `<sep>` token, after which the model answers.

Few-shot runs (GSM8K 8-shot, MATH 4-shot, as the released model was scored) put worked examples
before the question as "Question:...\\nAnswer:..." blocks. The examples below are written for this
project, in the same shape as the official ones.
"""

from __future__ import annotations

MULTIPLE_CHOICE_INSTRUCTION = "Choose the correct answer from the options after each question."

GSM8K_SHOTS = [
    ("A baker made 24 muffins in the morning and 18 in the afternoon. She sold 35 of them. How many "
     "muffins does she have left?",
     "The baker made 24 + 18 = 42 muffins. After selling 35 she has 42 - 35 = 7 muffins left.\n"
     "The answer is 7."),
    ("Tom reads 12 pages every day. How many days does he need to read a book of 180 pages?",
     "Each day he reads 12 pages, so he needs 180 / 12 = 15 days.\nThe answer is 15."),
    ("A jacket costs $80 and is on sale for 25% off. What is the sale price in dollars?",
     "The discount is 80 * 0.25 = 20 dollars, so the sale price is 80 - 20 = 60 dollars.\nThe answer is 60."),
    ("Maria has 3 boxes with 8 pencils in each. She gives 5 pencils to her brother. How many pencils "
     "does she have now?",
     "She has 3 * 8 = 24 pencils. After giving away 5 she has 24 - 5 = 19 pencils.\nThe answer is 19."),
    ("A train travels at 60 miles per hour for 2.5 hours. How many miles does it travel?",
     "Distance is speed times time: 60 * 2.5 = 150 miles.\nThe answer is 150."),
    ("Sam is twice as old as his sister, who is 7. In how many years will Sam be 20?",
     "Sam is 2 * 7 = 14 years old. He will be 20 in 20 - 14 = 6 years.\nThe answer is 6."),
    ("A garden has 4 rows of 9 tomato plants, and each plant gives 3 tomatoes. How many tomatoes "
     "does the garden give?",
     "There are 4 * 9 = 36 plants, giving 36 * 3 = 108 tomatoes.\nThe answer is 108."),
    ("Lena saved $15 a week for 6 weeks and then spent $32 on a gift. How many dollars does she have left?",
     "She saved 15 * 6 = 90 dollars. After the gift she has 90 - 32 = 58 dollars.\nThe answer is 58."),
]

MATH_SHOTS = [
    ("What is the value of $\\frac{2}{3} + \\frac{1}{6}$?",
     "Over the common denominator 6, $\\frac{2}{3} = \\frac{4}{6}$, so the sum is "
     "$\\frac{4}{6} + \\frac{1}{6} = \\frac{5}{6}$.\nThe answer is $\\boxed{\\frac{5}{6}}$."),
    ("Solve for $x$: $3x - 7 = 11$.",
     "Adding 7 to both sides gives $3x = 18$, so $x = 6$.\nThe answer is $\\boxed{6}$."),
    ("How many positive divisors does 36 have?",
     "Since $36 = 2^2 \\cdot 3^2$, it has $(2+1)(2+1) = 9$ positive divisors.\nThe answer is $\\boxed{9}$."),
    ("Simplify $\\sqrt{50} - \\sqrt{8}$.",
     "$\\sqrt{50} = 5\\sqrt{2}$ and $\\sqrt{8} = 2\\sqrt{2}$, so the difference is $3\\sqrt{2}$.\n"
     "The answer is $\\boxed{3\\sqrt{2}}$."),
]

# Where a few-shot answer would run on into a new invented question.
FEW_SHOT_STOP = ("\nQuestion:",)


def few_shot_prefix(shots: list[tuple[str, str]], count: int) -> str:
    if not 0 <= count <= len(shots):
        raise ValueError(f"this task has {len(shots)} example problems; --shots must be 0..{len(shots)}")
    return "".join(f"Question:{q}\nAnswer:{a}\n" for q, a in shots[:count])


def sep_prompt(tokenizer, text: str) -> list[int]:
    """A record's question followed by the <sep> token, after which the model answers."""
    return tokenizer.encode(text) + [tokenizer.sep_id]


def multiple_choice_text(question: str) -> str:
    return f"{MULTIPLE_CHOICE_INSTRUCTION}\n{question}"


def few_shot_text(shots: list[tuple[str, str]], count: int, question: str) -> str:
    prefix = few_shot_prefix(shots, count)
    return f"{prefix}Question:{question}" if count else question
