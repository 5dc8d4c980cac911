"""Final-answer extraction and number normalisation (pure Python, no sympy).

Three places a model puts its final answer, tried in a configurable order by :func:`extract_answer`:

* ``hash``        the GSM8K convention ``#### 42``: the text after the **first** ``####`` that is followed by an
                  answer (numeric mode: the first number on that line; text mode: the whole line, trimmed);
* ``boxed``       the **last** ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces matched; ``\\boxed 5`` too;
* ``last_number`` the last number anywhere in the text (``1,234``, ``-3.5``, ``3/4``), a fallback for weak models
                  that rarely follow the format (SmolLM2-135M uses ``####`` in 2-5 % of answers).

Numbers are compared through :func:`to_fraction`, which accepts ``1,234``, ``$5``, ``5.0``, ``50%``, ``3/4``,
``\\frac{3}{4}``, ``-\\dfrac12``, ``1{,}000`` and returns an exact :class:`fractions.Fraction` (so ``0.5 == 1/2``);
:func:`normalize_number` turns that into a canonical string (``"1234"``, ``"12.5"``, ``"1/3"``).
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import NamedTuple, Optional, Sequence

__all__ = [
    "Extraction",
    "SOURCES",
    "extract_answer",
    "extract_boxed",
    "extract_hash",
    "extract_last_number",
    "normalize_number",
    "to_fraction",
    "strip_answer",
]

SOURCES = ("hash", "boxed", "last_number")

# A number as written in prose: optional sign, thousands groups or plain digits, decimals, an optional /denominator.
# Not preceded by a letter/digit/dot (so "x2" and "1.2.3" tails are not numbers of their own).
_NUMBER = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?(?![\d])"
_NUMBER_RE = re.compile(_NUMBER)
_HASH_RE = re.compile(r"#{4,}")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)")
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\s*(?:\{\s*(-?[\d.,]+)\s*\}|(\d))\s*(?:\{\s*(-?[\d.,]+)\s*\}|(\d))$")
_PLAIN_NUMBER_RE = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?$|^[-+]?\.\d+$")


class Extraction(NamedTuple):
    """The extracted answer string (None when nothing was found) and where it came from (one of :data:`SOURCES`)."""

    answer: Optional[str]
    source: Optional[str]


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last balanced ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``); None if there is none."""
    if not text:
        return None
    for m in reversed(list(_BOXED_RE.finditer(text))):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, start = 0, i + 1
            for j in range(i, len(text)):
                c = text[j]
                if c == "{" and (j == 0 or text[j - 1] != "\\"):
                    depth += 1
                elif c == "}" and (j == 0 or text[j - 1] != "\\"):
                    depth -= 1
                    if depth == 0:
                        content = text[start:j].strip()
                        if content:
                            return content
                        break
            continue  # unbalanced or empty: try an earlier \boxed
        if i > m.end():  # "\boxed 5": the token up to whitespace or '$'
            tok = re.match(r"[^\s$]+", text[i:])
            if tok:
                return tok.group(0)
    return None


def extract_last_number(text: str) -> Optional[str]:
    """The last number in ``text`` as written (``"1,234"``, ``"-3.5"``, ``"3/4"``); None if there is none."""
    if not text:
        return None
    found = _NUMBER_RE.findall(text)
    return found[-1].replace(" ", "") if found else None


def extract_hash(text: str, numeric: bool = True) -> Optional[str]:
    """The answer after the first ``####`` that is followed by one.

    numeric=True: the first number on the line after the marker (``#### The answer is 1,234.`` -> ``"1,234"``).
    numeric=False: that line, trimmed of ``$`` and a final period (``#### \\frac{1}{2}.`` -> ``"\\frac{1}{2}"``).
    """
    if not text or "####" not in text:
        return None
    for m in _HASH_RE.finditer(text):
        rest = text[m.end():].lstrip()
        line = rest.split("\n", 1)[0].strip()
        if line.startswith("#"):  # "#####" or a second marker right away
            continue
        if numeric:
            num = _first_number(line)
            if num is not None:
                return num
        else:
            ans = strip_answer(line)
            if ans:
                return ans
    return None


def _first_number(line: str) -> Optional[str]:
    m = _NUMBER_RE.search(line)
    return m.group(0).replace(" ", "") if m else None


def extract_answer(text: str, order: Sequence[str] = SOURCES, hash_numeric: bool = True) -> Extraction:
    """Try each source of ``order`` (names from :data:`SOURCES`) and return the first answer found."""
    for source in order:
        if source == "hash":
            ans = extract_hash(text, numeric=hash_numeric)
        elif source == "boxed":
            ans = extract_boxed(text)
        elif source == "last_number":
            ans = extract_last_number(text)
        else:
            raise ValueError(f"unknown answer source {source!r}; choose from {', '.join(SOURCES)}")
        if ans is not None:
            return Extraction(ans, source)
    return Extraction(None, None)


def strip_answer(s: str) -> str:
    """Trim whitespace, surrounding ``$...$`` / ``$$...$$`` / ``\\(...\\)`` / ``\\[...\\]`` and a final period."""
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left):len(s) - len(right)].strip()
    s = s.rstrip(" .")
    return s.strip()


def to_fraction(s: Optional[str]) -> Optional[Fraction]:
    """An exact value for a plain number string, or None when ``s`` is not one.

    Accepts: ``42``, ``-42``, ``+42``, ``1,234``, ``1{,}234``, ``5.0``, ``.5``, ``$5``, ``\\$5``, ``50%``, ``50\\%``,
    ``3/4``, ``\\frac{3}{4}``, ``\\dfrac34``, ``-\\frac{1}{2}``, ``5.`` (trailing period), ``\\!`` and ``~`` spacing.
    """
    if s is None:
        return None
    t = strip_answer(str(s))
    t = t.replace("\\!", "").replace("~", "").replace("{,}", ",").replace("\\,", "").replace(" ", "")
    t = t.replace("\\$", "").replace("$", "").replace("\\%", "").rstrip("%")
    if t.startswith("\\text{") and t.endswith("}"):
        t = t[6:-1]
    if not t or len(t) > 64:
        return None
    m = _FRAC_RE.match(t)
    if m:
        sign, n1, n2, d1, d2 = m.groups()
        num, den = _plain(n1 or n2), _plain(d1 or d2)
        if num is None or den is None or den == 0:
            return None
        value = num / den
        return -value if sign else value
    if "/" in t:
        parts = t.split("/")
        if len(parts) != 2:
            return None
        num, den = _plain(parts[0]), _plain(parts[1])
        if num is None or den is None or den == 0:
            return None
        return num / den
    return _plain(t)


def _plain(t: str) -> Optional[Fraction]:
    if t is None or not _PLAIN_NUMBER_RE.match(t):
        return None
    try:
        return Fraction(t.replace(",", "").rstrip("."))
    except (ValueError, ZeroDivisionError):
        return None


def normalize_number(s: Optional[str]) -> Optional[str]:
    """Canonical string of a number, else None: integers plainly (``"1,234"`` -> ``"1234"``, ``"5.0"`` -> ``"5"``),
    terminating decimals as decimals (``"12.50"`` -> ``"12.5"``, ``"1/2"`` -> ``"0.5"``), others as ``"p/q"``."""
    value = to_fraction(s)
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den == 1:  # terminating decimal: exact digits, no float rounding
        digits = max(twos, fives)
        scaled = value * 10 ** digits
        sign = "-" if scaled < 0 else ""
        whole, frac = divmod(abs(scaled.numerator), 10 ** digits)
        return f"{sign}{whole}.{frac:0{digits}d}".rstrip("0")
    return f"{value.numerator}/{value.denominator}"
