"""``choice``: multiple-choice accuracy on the option letter, read out of free text.

Models answer a multiple-choice question in many shapes: "B", "b", "(B)", "B. cat", "The answer is (B).",
"Answer: C", or the option's text ("cat") instead of its letter. :func:`extract_choice` reads the letter
the way multiple-choice benchmarks' evaluation scripts do, in this order (the first rule that finds a
letter wins):

1. the whole answer is one letter, optionally in brackets or followed by '.', ')' or ':' ("b", "(B)", "C.");
2. the answer starts with a letter followed by '.', ')' or ':' ("B. cat", "C) dog");
3. a letter after "answer", "option" or "choice" ("The answer is (B).", "Answer: c", "option D");
4. a letter in brackets anywhere ("I pick (C) because ...");
5. when the question lists its options ("A. cat\\nB. dog" or "(A) cat (B) dog"): the option whose text
   the answer is, or the only option whose text occurs in it as whole words (the longest when one
   option's text contains another's);
6. the only capital letter standing alone among the option letters ("I think B").

Throughout, an "a" or "I" followed by a lower-case word ("A cat sits", "the answer is a dog", "I think")
is the article or the pronoun, not a letter.

The letter must be one of the question's options when it lists them, else one of A-J.
"""
from __future__ import annotations

import re
import string

from cramcl.errors import BadInputError
from cramcl.eval.scorers._common import Reference, check_inputs, ref_list
from cramcl.eval.scorers.text import normalize_answer

DEFAULT_LETTERS = "ABCDEFGHIJ"
_ONLY_LETTER = re.compile(r"^\s*[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:)]?\s*$")
_LEADING_LETTER = re.compile(r"^\s*[(\[]?([A-Za-z])\s*[.:)\]]\s+\S")
_KEYWORD_LETTER = re.compile(
    r"\b(?:answer|option|choice)\b(?:\s+is)?\s*[:：]?\s*[(\[]?\s*([A-Za-z])\s*[)\]]?(?![A-Za-z0-9])", re.IGNORECASE)
_BRACKETED = re.compile(r"[(\[]\s*([A-Z])\s*[)\]]")
_LONE_CAPITAL = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])(\s+[a-z]+)?")
# an option marker in a question: "(A) ", "A. ", "A) ", "A: " at a word start
_OPTION_MARK = re.compile(r"(?:(?<=\s)|^)[(\[]?([A-Z])\s*(?:[.:)\]])\s*")


def parse_options(question: str) -> dict[str, str]:
    """The options a question lists, {letter: text}, read as consecutive markers A, B, C, ... ("A. cat",
    "(B) dog", "C) mouse", "D: bird"); {} when the question lists fewer than two.
    ``parse_options("Which?\\nA. cat\\nB. dog") == {"A": "cat", "B": "dog"}``."""
    marks = [(m.group(1), m.start(), m.end()) for m in _OPTION_MARK.finditer(str(question))]
    chosen: list[tuple[str, int, int]] = []
    for letter, start, end in marks:
        expected = string.ascii_uppercase[len(chosen)]
        if letter == expected and (not chosen or start >= chosen[-1][2]):
            chosen.append((letter, start, end))
    if len(chosen) < 2:
        return {}
    options = {}
    for k, (letter, _, end) in enumerate(chosen):
        stop = chosen[k + 1][1] if k + 1 < len(chosen) else len(question)
        text = question[end:stop]
        if k + 1 == len(chosen):  # the last option ends at its line's end
            text = text.split("\n", 1)[0]
        options[letter] = text.strip().rstrip(",;").strip()
    return options


def _by_option_text(answer: str, options: dict[str, str]) -> str | None:
    a = normalize_answer(answer)
    texts = {letter: normalize_answer(t) for letter, t in options.items() if normalize_answer(t)}
    exact = [letter for letter, t in texts.items() if t == a]
    if len(exact) == 1:
        return exact[0]
    inside = [letter for letter, t in texts.items() if f" {t} " in f" {a} "]
    if len(inside) == 1:
        return inside[0]
    if inside:  # "dark red" and "red" both occur: keep the longest if it contains every other
        longest = max(inside, key=lambda k: len(texts[k]))
        if all(f" {texts[k]} " in f" {texts[longest]} " for k in inside):
            return longest
    return None


def _is_word(letter: str, after: str) -> bool:
    """True when ``letter`` is the article "a" or the pronoun "I" (a lower-case word follows it)."""
    return letter in "aAiI" and re.match(r"\s+[a-z]", after) is not None


def extract_choice(answer: str, question: str = "") -> str | None:
    """The option letter (upper case) that ``answer`` gives, by the rules of the module docstring, or
    None. ``extract_choice("The answer is (b).") == "B"``;
    ``extract_choice("dog", "Pick one. A. cat B. dog") == "B"``."""
    answer = str(answer)
    options = parse_options(question) if question else {}
    letters = "".join(options) or DEFAULT_LETTERS

    def ok(letter: str) -> str | None:
        return letter.upper() if letter.upper() in letters else None

    for pattern in (_ONLY_LETTER, _LEADING_LETTER, _KEYWORD_LETTER):
        for m in pattern.finditer(answer):
            if ok(m.group(1)) and not _is_word(m.group(1), answer[m.end():]):
                return ok(m.group(1))
    found = {m.group(1) for m in _BRACKETED.finditer(answer) if ok(m.group(1))}
    if len(found) == 1:
        return found.pop()
    if options:
        letter = _by_option_text(answer, options)
        if letter:
            return letter
    lone = {m.group(1) for m in _LONE_CAPITAL.finditer(answer)
            if ok(m.group(1)) and not _is_word(m.group(1), m.group(2) or "")}
    return lone.pop() if len(lone) == 1 else None


def check_choice_reference(ref: str, question: str = "") -> str | None:
    """Why ``ref`` cannot be a choice reference (no option letter in it), or None."""
    if extract_choice(ref, question) is not None:
        return None
    return f"reference {ref!r} names no option letter"


def choice(predictions: list[str], references: list[Reference], *, questions: list[str] | None = None,
           **_) -> tuple[float, list[float]]:
    """Multiple-choice accuracy: 100 when the letter :func:`extract_choice` reads from the prediction
    equals the reference's letter (a reference may be "B", "(B)", "B. dog" or, when the question lists
    options, the option's text), else 0. ``questions`` (one per record, optional) supply the options.
    A reference with no letter in it raises :class:`BadInputError` naming the record."""
    check_inputs("choice", predictions, references, questions)
    qs = questions if questions is not None else [""] * len(predictions)
    per = []
    for k, (pred, refs, q) in enumerate(zip(predictions, references, qs)):
        got = extract_choice(str(pred), q or "")
        best = 0.0
        for r in ref_list(refs):
            want = extract_choice(r, q or "")
            if want is None:
                raise BadInputError(f"scorer 'choice': record {k}: {check_choice_reference(r, q or '')}")
            best = max(best, 100.0 if got == want else 0.0)
        per.append(best)
    return sum(per) / len(per), per
