"""Reading the answer out of generated text, and deciding whether two answers are the same.

Multiple choice: the letter the model settled on ("the correct answer is C", "C. Thick and waxy").
GSM8K: the final number. MATH: the final expression (``\\boxed{...}``, "the answer is ..."), compared
after normalisation so that ``\\frac{1}{2}``, ``1/2`` and ``0.5`` are equal, and, failing a string
match, symbolically with sympy.
"""

from __future__ import annotations

import re
from fractions import Fraction

_FULL_WIDTH = str.maketrans("ＡＢＣＤＥＦＧＨＩＪＫ０１２３４５６７８９．：（）", "ABCDEFGHIJK0123456789.:()")

# Phrases after which a choice letter follows, most explicit first; the last occurrence wins.
_CHOICE_PATTERNS = [
    r"(?:correct|right|best|most (?:appropriate|accurate|likely|reasonable)|final)\s+"
    r"(?:answer|option|choice)\s*(?:is|would be|:)?\s*(?:option\s*)?[\s:(*]*([A-K])\b(?![a-zA-Z'])",
    r"(?:answer|option|choice)\s*(?:is|would be|:)\s*(?:option\s*)?[\s:(*]*([A-K])\b(?![a-zA-Z'])",
    r"(?:答案|正确答案|正确选项)\s*(?:是|为|应为|应该是)?\s*[:：]?\s*\(?([A-K])",
    r"(?:option|choice)\s+\(?([A-K])\)?\s+is\s+(?:the\s+)?(?:correct|right|best)",
    r"选\s*\(?([A-K])",
]
# A bare letter that is clearly a choice: "C", "(C)", "C.", "C)" or "C:" (not the article "A ...").
_BARE_CHOICE = r"(?:^|[\s(*])\(?([A-K])(?:\)|[.:](?!\d)|(?=\s*$))"


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The option letter a generated answer picks, or None when it names none of `letters`."""
    text = _unwrap_latex_letters(text.translate(_FULL_WIDTH).replace("$", "").replace("**", ""))
    for pattern in _CHOICE_PATTERNS:
        picks = [m for m in re.findall(pattern, text, flags=re.IGNORECASE) if m.upper() in letters]
        if picks:
            return picks[-1].upper()
    for line in reversed([ln for ln in text.splitlines() if ln.strip()]):
        picks = [m for m in re.findall(_BARE_CHOICE, line.strip()) if m in letters]
        if picks:
            return picks[0]
    return None


def _unwrap_latex_letters(text: str) -> str:
    return re.sub(r"\\(?:boxed|text|textbf|mathrm|mathbf|rm)\s*\{\s*\(?([A-K])\)?\s*\}", r"\1", text)


# ---- numbers (GSM8K) -------------------------------------------------------------------------------

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|-?\.\d+"
_ANSWER_MARKERS = r"(?:the (?:final )?answer is|answer:|####|答案(?:是|为)?[:：]?)"


def extract_number(text: str) -> str | None:
    """The final numeric answer of a worked solution: after the last "the answer is" / "####" when
    present, else inside the last \\boxed{}, else the last number in the text."""
    text = text.translate(_FULL_WIDTH).replace("$", "").replace("\\!", "")
    text = re.sub(r"\\[dt]?frac\{(\d+)\}\{(\d+)\}", r"\1/\2", text)
    markers = list(re.finditer(_ANSWER_MARKERS, text, flags=re.IGNORECASE))
    if markers:
        found = re.findall(_NUMBER, text[markers[-1].end():])
        if found:
            return _clean_number(found[0])
    boxed = last_boxed(text)
    if boxed is not None and re.findall(_NUMBER, boxed):
        return _clean_number(re.findall(_NUMBER, boxed)[-1])
    found = re.findall(_NUMBER, text)
    return _clean_number(found[-1]) if found else None


def _clean_number(number: str) -> str:
    return number.replace(",", "").rstrip(".")


def to_fraction(text: str) -> Fraction | None:
    """An exact value for "12", "-0.5", "1,000", "3/4" or "50%" (read as 50, as GSM8K answers are)."""
    text = text.strip().replace(",", "").rstrip("%").strip()
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    a, b = to_fraction(predicted), to_fraction(reference)
    if a is None or b is None:
        return normalize_math(predicted) == normalize_math(reference)
    return abs(a - b) <= Fraction(1, 10**6) * max(1, abs(b))


# ---- expressions (MATH) ----------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...}, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        rest = text[start:].split(None, 1)
        return rest[1].split("$")[0].strip() if len(rest) > 1 else None
    inner = _braced(text, brace)
    return inner


def _braced(text: str, open_index: int) -> str | None:
    """The text inside the brace group opening at text[open_index] ('{'), or None if unclosed."""
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1: i]
    return None


def extract_math_answer(text: str) -> str | None:
    """The final answer of a MATH solution: the last \\boxed{}, else what follows the last
    "the answer is", else the right-hand side of the last equation, else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    marker = list(re.finditer(r"(?:the (?:final )?answer is|answer:|答案(?:是|为)?[:：]?)", text, flags=re.IGNORECASE))
    if marker:
        tail = text[marker[-1].end():].strip()
        tail = re.split(r"\n|(?<!\d)\.(?:\s|$)|\.$", tail, maxsplit=1)[0]
        return tail.strip().strip("$").strip() or None
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if lines and "=" in lines[-1]:
        return lines[-1].rsplit("=", 1)[1].strip().strip("$.").strip() or None
    found = re.findall(_NUMBER, text)
    return _clean_number(found[-1]) if found else None


_UNIT_WORDS = (r"\\(?:text|mbox|mathrm)\{\s*(?:units?|degrees?|cm|m|km|inches|inch|feet|foot|ft|meters?|"
               r"miles?|hours?|minutes?|seconds?|dollars?|cents?|square\s+\w+|sq\s*\w+)\s*\}(?:\^\{?\d\}?)?")


def normalize_math(answer: str) -> str:
    """A canonical string for a final answer: LaTeX spacing, \\left/\\right, dollars, degree signs,
    percent signs, units and "x =" removed; \\dfrac and \\tfrac as \\frac; \\frac12 and \\sqrt2
    braced; thousands separators dropped; a lone fraction or decimal written as a reduced a/b."""
    s = answer.strip().translate(_FULL_WIDTH)
    s = s.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\$", "").replace("$", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac").replace("\\displaystyle", "")
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(_UNIT_WORDS, "", s)
    s = re.sub(r"\\text\{\s*([^{}]*?)\s*\}", r"\1", s)
    s = s.replace(" ", "")
    s = re.sub(r"^[a-zA-Z]\w*=(?!=)", "", s)  # "x=5" -> "5"
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]+)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"^\(([A-Za-z])\)$", r"\1", s.rstrip("."))  # "(B)" -> "B"
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    value = _plain_value(s)
    if value is not None:
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return s


def _plain_value(s: str) -> Fraction | None:
    """The exact value of an integer, decimal, a/b or \\frac{a}{b} (optionally negative), else None."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    if re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/-?\d+(?:\.\d+)?)?", s):
        try:
            num, _, den = s.partition("/")
            return Fraction(num) / Fraction(den) if den else Fraction(num)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def math_equal(predicted: str | None, reference: str) -> bool:
    """Whether a predicted final answer equals the reference: same normal form, or (for tuples and
    intervals, element by element) the same value by sympy."""
    if predicted is None:
        return False
    a, b = normalize_math(predicted), normalize_math(reference)
    if a == b:
        return True
    a_parts, b_parts = _split_top_level(a), _split_top_level(b)
    if len(a_parts) != len(b_parts):
        return False
    if len(a_parts) > 1:
        if a[:1] + a[-1:] != b[:1] + b[-1:] and a[:1] in "([" and b[:1] in "([":
            return False  # an open interval is not a closed one
        return all(math_equal(x, y) for x, y in zip(a_parts, b_parts))
    return _sympy_equal(a, b)


def _split_top_level(s: str) -> list[str]:
    """"(1,2)" -> ["1", "2"]; "\\{1,2\\}" likewise; a plain expression -> [itself]."""
    inner = s
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        inner = s[1:-1]
    elif s.startswith("\\{") and s.endswith("\\}"):
        inner = s[2:-2]
    parts, depth, current = [], 0, ""
    for ch in inner:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts if len(parts) > 1 else [s]


def latex_to_sympy_text(s: str) -> str:
    """Rewrite the LaTeX of a typical final answer as sympy input: \\frac{a}{b} -> ((a)/(b)),
    \\sqrt[n]{x} -> ((x)**(1/(n))), \\pi -> pi, ^ -> **, braces -> parentheses."""
    s = _replace_command(s, "\\frac", 2, lambda a, b: f"(({a})/({b}))")
    s = re.sub(r"\\sqrt\[([^\]]+)\]\{", r"\\root{\1}{", s)
    s = _replace_command(s, "\\root", 2, lambda n, x: f"(({x})**(1/({n})))")
    s = _replace_command(s, "\\sqrt", 1, lambda x: f"sqrt({x})")
    for latex, plain in (("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), ("\\pi", "pi"), ("\\infty", "oo"),
                         ("\\ln", "log"), ("\\log", "log"), ("\\sin", "sin"), ("\\cos", "cos"), ("\\tan", "tan")):
        s = s.replace(latex, plain)
    return s.replace("{", "(").replace("}", ")").replace("^", "**").replace("\\", "")


def _replace_command(s: str, command: str, arity: int, render) -> str:
    """Replace each `command{a}{b}...` (innermost arguments first) with render(a, b, ...)."""
    while True:
        start = s.rfind(command + "{")
        if start < 0:
            return s
        pos, args = start + len(command), []
        for _ in range(arity):
            if pos >= len(s) or s[pos] != "{":
                return s
            inner = _braced(s, pos)
            if inner is None:
                return s
            args.append(inner)
            pos += len(inner) + 2
        s = s[:start] + render(*args) + s[pos:]


def _sympy_equal(a: str, b: str) -> bool:
    if max(len(a), len(b)) > 200:  # sympy can take minutes on long generated junk
        return False
    import sympy
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                            standard_transformations)

    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    try:
        x = parse_expr(latex_to_sympy_text(a), transformations=transformations, evaluate=True)
        y = parse_expr(latex_to_sympy_text(b), transformations=transformations, evaluate=True)
        if not (isinstance(x, sympy.Expr) and isinstance(y, sympy.Expr)):
            return False
        difference = x - y
        if difference.free_symbols:
            return sympy.simplify(difference) == 0
        scale = 1.0 if y.free_symbols else max(1.0, abs(complex(y.evalf())))
        return abs(complex(difference.evalf())) <= 1e-6 * scale
    except Exception:  # unparseable text is simply not equal; sympy raises many kinds
        return False
