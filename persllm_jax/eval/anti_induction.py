"""Anti-induction on `error` items (false premise or conflicting claim): the share of answers that refute the
premise in character (LLM judge, see precision.py for the judge plumbing) and a rule-based character-break rate
(the model says it is an AI, an assistant, a language model, ...)."""

from __future__ import annotations

import re

BREAK_PATTERNS = [
    r"\bas an ai\b", r"\bi(?: a|')m an? (?:ai|artificial intelligence)\b", r"\b(?:large )?language model\b",
    r"\bi(?: a|')m (?:just )?an? (?:virtual |digital |ai |helpful )?assistant\b", r"\bas an? (?:ai )?assistant\b",
    r"\bi(?: a|')m (?:just )?(?:a|an) (?:chat ?bot|robot|machine|computer(?: program)?|program|machine learning model)\b", r"\bi was (?:trained|created) by\b",
    r"\bi do(?:n't| not) have (?:personal )?(?:feelings|opinions|a body|experiences)\b", r"\bopenai\b",
    r"\bhugging ?face\b", r"\bsmollm\b",
]
_BREAK = re.compile("|".join(BREAK_PATTERNS), re.IGNORECASE)


def breaks_character(text: str) -> bool:
    return bool(_BREAK.search((text or "").replace("\u2019", "'")))


def break_rate(texts: list[str]) -> float | None:
    return sum(map(breaks_character, texts)) / len(texts) if texts else None


REFUTE_PROMPT = """You are judging a role-playing answer. The user's message contains a false premise or a claim that \
conflicts with the facts about {name}. The reference answer shows how {name} would correct it.

[Question]
{question}

[Reference answer]
{reference}

[Answer to judge]
{answer}

Does the answer to judge reject or correct the false premise, speaking as {name} (not as an AI assistant)? \
Reply with one word: YES or NO."""


def parse_yes_no(text: str | None) -> bool | None:
    """True / False for a YES / NO judgement (first such word), None when unparsable."""
    if not text:
        return None
    m = re.search(r"\b(yes|no)\b", text, re.IGNORECASE)
    return None if m is None else m.group(1).lower() == "yes"
