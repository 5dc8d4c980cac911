"""A generated arithmetic task for the CPU default: integer answers, difficulty knobs, seeded, disjoint splits.

    ds = generate_arithmetic("l0", 512, split="train", seed=0)        # PromptDataset of PromptExample
    ev = generate_arithmetic("l5", 64, split="test", seed=0)          # held-out problems: never in any train split

Knobs (:class:`ArithmeticLevel`): number of operations (a range), the first operand's range, the other operands'
range, the allowed operations (``+ - * /``) or a fixed operation sequence, the surface style (``expression``:
"What is 3 + 4?"; ``word``: "Tom has 12 apples, buys 7 more and gives away 5. How many apples does he have
now?"; ``mixed``), and whether intermediate results may go negative. Answers are always integers: division is
only drawn when it is exact, and evaluation is left to right (expressions get parentheses where that matters).

Splits: a problem belongs to ``test`` when a hash of its identity (its canonical expression ``"3 + 4"``, the same
for every surface form, level and seed) falls below ``heldout_fraction``; otherwise to ``train``. So train and test
are disjoint across levels and seeds; a level with few distinct problems (l0 has 81) has a small test split.
Three knobs, off in the older presets (their problems and splits are unchanged): ``canonical="commutative"``
makes a first ``+`` / ``*`` with swapped operands the same problem (``"8 + 31"`` is ``"31 + 8"``: one identity,
one split); ``distinct_heldout`` draws the test split without replacement (by identity), so a held-out set of n
prompts is n distinct problems; ``heldout_fraction`` on the preset fixes its split whatever the caller passes.

Presets and what SmolLM2-135M-Instruct (the Q4_1-derived fp32 checkpoint) scored on them in a calibration run
on 2026-11-26 (32 prompts x 8 samples, T=0.7, max_tokens 256; "mixed" = share of groups with both
correct and wrong samples). ``direct`` / ``cot`` are :data:`~megatron_bppo.data.chat.DIRECT_INSTRUCTION` /
:data:`~megatron_bppo.data.chat.COT_INSTRUCTION` placed before the question:

==============  =========================================  ==============================================
preset          problems                                   measured (T=0.7)
==============  =========================================  ==============================================
``l0``          a + b, a, b in 1..9 (81 problems)          direct 0.47 acc, 91 % mixed; cot 0.32, 84 %
``l5``          a + b, a in 1..9, b in 10..30              direct 0.12 acc, 41 % mixed
``l1``          a + b, a, b in 1..99                       direct 0.12 acc, 53 % mixed; cot 0.13, 44 %
``l2``          a + b - c, 1..50                           cot 0.016 acc, 9 % mixed (eval only)
``l3``          word: has a, buys b, gives away c          direct 0.02 acc, 12 % mixed (eval only)
``l4``          a * b, a in 1..9, b in 10..99              cot 0.035 acc, 25 % mixed (eval only)
``l0_l5_mix``   l0 and l5, half each                       about 0.3 acc expected (not measured as a mix)
``l0_l1_mix``   l0 and l1, half each                       about 0.3 acc expected (not measured as a mix)
``one_op_25``   a + b, a - b or a * b; a in 2..25, b in    cot: greedy 0.219 [0.172, 0.273] on 256 distinct
                2..9 (492 problems, 298 held out)          held-out, 85 tokens; T=0.7: 67 % mixed, 0.195
``one_op_40``   the same with a in 2..40, three surface    cot: greedy 0.141 [0.103, 0.189], 112 tokens;
                templates (What is / Calculate / Compute)  T=0.7: 41 % mixed (too hard for the head-to-head)
==============  =========================================  ==============================================

``one_op_25`` is the head-to-head task (issue 16, docs/benchmarks.md section 6): calibrated 2026-11-30 with
``bench/calibrate_task.py`` (cot instruction, max_tokens 256, 256 held-out prompts greedy, 64 training prompts x 8
samples at T=0.7; bench/results/calibration_one_op_25.json).

The recommended CPU demo setting: train on ``l0`` (or ``l0_l5_mix`` to avoid memorising 81 problems), direct
instruction, T=0.7, max_tokens 256; evaluate on the ``test`` split of ``l0``/``l5``/``l1``.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Optional, Union

from megatron_bppo.data.datasets import DatasetError, LoadReport, PromptDataset, PromptExample

__all__ = ["ArithmeticLevel", "ArithmeticMixture", "PRESETS", "generate_arithmetic", "get_preset", "problem_identity",
           "problem_split", "sample_problem"]

OPS = ("+", "-", "*", "/")
STYLES = ("expression", "word", "mixed")
CANONICAL = ("expression", "commutative")
_SALT = "megatron_bppo-arith-v1"

NAMES = (("Tom", "he"), ("Anna", "she"), ("Liam", "he"), ("Mia", "she"), ("Noah", "he"), ("Emma", "she"),
         ("Ben", "he"), ("Lily", "she"), ("Sam", "he"), ("Zoe", "she"))
ITEMS = ("apples", "books", "marbles", "stickers", "pencils", "cookies", "coins", "cards", "shells", "stamps")
CLAUSES = {
    "+": ("buys {n} more", "finds {n} more", "gets {n} more"),
    "-": ("gives away {n}", "loses {n}", "sells {n}"),
    "*": ("then ends up with {n} times as many",),
    "/": ("splits them into {n} equal groups and keeps one group",),
}


@dataclass(frozen=True)
class ArithmeticLevel:
    name: str
    num_ops: tuple[int, int] = (1, 1)              # inclusive range of operations per problem
    first_range: tuple[int, int] = (1, 9)          # first operand
    operand_range: tuple[int, int] = (1, 9)        # every later operand
    ops: tuple[str, ...] = ("+",)                  # drawn uniformly per step ...
    op_sequence: Optional[tuple[str, ...]] = None  # ... unless a fixed sequence is given (overrides num_ops)
    style: str = "expression"                      # expression | word | mixed
    templates: tuple[str, ...] = ("What is {expr}?",)
    allow_negative: bool = False
    expected: str = ""                             # measured accuracy (documentation only)
    # Identity and splits (the defaults keep every older preset's problems and splits exactly as they were):
    canonical: str = "expression"                  # expression: the key is the identity | commutative: a first
                                                   # "+" / "*" with its operands swapped is the same problem
    distinct_heldout: bool = False                 # the test split drawn without replacement (by identity)
    heldout_fraction: Optional[float] = None       # the preset's own held-out share (wins over the argument)

    def __post_init__(self):
        seq = self.op_sequence or ()
        bad = [o for o in (*self.ops, *seq) if o not in OPS]
        if bad or not (self.ops or seq):
            raise ValueError(f"level {self.name}: operations must be a non-empty subset of {OPS}, got {bad or '()'}")
        if self.style not in STYLES:
            raise ValueError(f"level {self.name}: style {self.style!r} not in {STYLES}")
        lo, hi = self.num_ops
        if not 1 <= lo <= hi:
            raise ValueError(f"level {self.name}: num_ops {self.num_ops} must satisfy 1 <= lo <= hi")
        for rng_name in ("first_range", "operand_range"):
            a, b = getattr(self, rng_name)
            if a > b or (rng_name == "operand_range" and a < 1 and ("/" in self.ops or "/" in seq)):
                raise ValueError(f"level {self.name}: bad {rng_name} {(a, b)}")
        if any("{expr}" not in t for t in self.templates):
            raise ValueError(f"level {self.name}: every template needs an {{expr}} field")
        _check_split_knobs(self)


def _check_split_knobs(spec):
    if spec.canonical not in CANONICAL:
        raise ValueError(f"{spec.name}: canonical {spec.canonical!r} not in {CANONICAL}")
    if spec.heldout_fraction is not None and not 0.0 < spec.heldout_fraction < 1.0:
        raise ValueError(f"{spec.name}: heldout_fraction {spec.heldout_fraction} must be in (0, 1)")


@dataclass(frozen=True)
class ArithmeticMixture:
    name: str
    components: tuple[tuple[ArithmeticLevel, float], ...] = field(default_factory=tuple)
    expected: str = ""
    canonical: str = "expression"                  # as ArithmeticLevel: one identity rule for the whole mixture
    distinct_heldout: bool = False
    heldout_fraction: Optional[float] = None

    def __post_init__(self):
        _check_split_knobs(self)


PRESETS: dict[str, Union[ArithmeticLevel, ArithmeticMixture]] = {}


def _add(level):
    PRESETS[level.name] = level
    return level


L0 = _add(ArithmeticLevel("l0", expected="direct T=0.7: acc 0.47, 91% mixed; cot: acc 0.32, 84% mixed"))
L5 = _add(ArithmeticLevel("l5", operand_range=(10, 30), expected="direct T=0.7: acc 0.12, 41% mixed"))
L1 = _add(ArithmeticLevel("l1", first_range=(1, 99), operand_range=(1, 99),
                          expected="direct T=0.7: acc 0.12, 53% mixed; cot: acc 0.13, 44% mixed"))
L2 = _add(ArithmeticLevel("l2", first_range=(1, 50), operand_range=(1, 50), op_sequence=("+", "-"),
                          expected="cot T=0.7: acc 0.016, 9% mixed (eval only)"))
L3 = _add(ArithmeticLevel("l3", first_range=(5, 20), operand_range=(1, 9), op_sequence=("+", "-"), style="word",
                          expected="direct T=0.7: acc 0.02, 12% mixed (eval only)"))
L4 = _add(ArithmeticLevel("l4", operand_range=(10, 99), ops=("*",),
                          expected="cot T=0.7: acc 0.035, 25% mixed (eval only)"))
_add(ArithmeticMixture("l0_l5_mix", ((L0, 0.5), (L5, 0.5)), expected="about 0.3 acc (not measured as a mix)"))
_add(ArithmeticMixture("l0_l1_mix", ((L0, 0.5), (L1, 0.5)), expected="about 0.3 acc (not measured as a mix)"))
# The head-to-head task (issue 16; docs/benchmarks.md section 6): one operation of three on numbers a small model
# gets wrong often but not always, with the cot instruction; >= 256 distinct held-out problems (the split holds
# 298 of 492). one_op_40 (larger numbers, three surface templates) was the first design: too hard (0.14).
ONE_OP_25 = _add(ArithmeticLevel(
    "one_op_25", first_range=(2, 25), operand_range=(2, 9), ops=("+", "-", "*"),
    canonical="commutative", distinct_heldout=True, heldout_fraction=0.6,
    expected="cot, greedy, 256 held-out: 0.219 [0.172, 0.273], 85 tokens; T=0.7 G=8: 67 % mixed, 33 % all wrong"))
ONE_OP_40 = _add(ArithmeticLevel(
    "one_op_40", first_range=(2, 40), operand_range=(2, 9), ops=("+", "-", "*"),
    templates=("What is {expr}?", "Calculate {expr}.", "Compute {expr}."),
    canonical="commutative", distinct_heldout=True, heldout_fraction=0.4,
    expected="cot, greedy, 256 held-out: 0.141 [0.103, 0.189], 112 tokens; T=0.7 G=8: 41 % mixed, 59 % all wrong"))


def get_preset(name: str) -> Union[ArithmeticLevel, ArithmeticMixture]:
    if name not in PRESETS:
        raise DatasetError(f"unknown arithmetic level {name!r}; presets: {', '.join(PRESETS)} "
                           f"(or pass an ArithmeticLevel)")
    return PRESETS[name]


def problem_split(key: str, heldout_fraction: float = 0.2, salt: str = _SALT) -> str:
    """``"test"`` or ``"train"`` for a canonical expression, by hash (stable across runs, seeds and machines)."""
    h = int.from_bytes(hashlib.sha256(f"{salt}|{key}".encode()).digest()[:8], "big") / 2.0 ** 64
    return "test" if h < heldout_fraction else "train"


@dataclass
class Problem:
    key: str            # canonical expression, e.g. "(3 + 4) * 12"
    answer: int
    steps: list         # [(op, operand), ...] after the first operand
    first: int


def _expression(first: int, steps) -> str:
    """The canonical expression of a left-to-right chain: parentheses where precedence would change it."""
    key, low_precedence = str(first), False
    for op, n in steps:
        if op in "*/" and low_precedence:
            key = f"({key})"
        low_precedence = op in "+-"
        key = f"{key} {op} {n}"
    return key


def problem_identity(p: "Problem", rule: str = "expression") -> str:
    """What makes two problems the same one (splits and distinctness use it). ``expression``: the expression
    itself; ``commutative``: also a first ``+`` / ``*`` with its two operands swapped ("8 + 47" is "47 + 8")."""
    if rule == "commutative" and p.steps and p.steps[0][0] in "+*":
        (op, n), rest = p.steps[0], p.steps[1:]
        return _expression(max(p.first, n), [(op, min(p.first, n)), *rest])
    return p.key


def sample_problem(level: ArithmeticLevel, rng: random.Random, max_tries: int = 100) -> Problem:
    """One random problem of ``level`` (rejection-sampled so every intermediate result is a valid integer)."""
    for _ in range(max_tries):
        seq = level.op_sequence or tuple(rng.choice(level.ops) for _ in range(rng.randint(*level.num_ops)))
        value = first = rng.randint(*level.first_range)
        steps, ok = [], True
        for op in seq:
            lo, hi = level.operand_range
            if op == "/":
                divisors = [d for d in range(max(lo, 1), hi + 1) if value % d == 0]
                if not divisors:
                    ok = False
                    break
                n = rng.choice(divisors)
                value //= n
            else:
                n = rng.randint(lo, hi)
                value = value + n if op == "+" else value - n if op == "-" else value * n
            if value < 0 and not level.allow_negative:
                ok = False
                break
            steps.append((op, n))
        if ok:
            return Problem(key=_expression(first, steps), answer=int(value), steps=steps, first=first)
    raise DatasetError(f"level {level.name}: no valid problem in {max_tries} tries; widen the operand ranges or "
                       f"allow negative results")


def _surface(level: ArithmeticLevel, p: Problem, rng: random.Random) -> tuple[str, str]:
    style = level.style if level.style != "mixed" else rng.choice(("expression", "word"))
    if style == "expression":
        return rng.choice(level.templates).format(expr=p.key), style
    name, pron = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    clauses = [rng.choice(CLAUSES[op]).format(n=n) for op, n in p.steps]
    body = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
    return f"{name} has {p.first} {item}, {body}. How many {item} does {pron} have now?", style


def generate_arithmetic(level: Union[str, ArithmeticLevel, ArithmeticMixture] = "l0", n: int = 256, *,
                        split: str = "train", seed: int = 0, heldout_fraction: float = 0.2,
                        unique: Optional[bool] = None) -> PromptDataset:
    """``n`` problems of ``level`` from ``split`` ("train" or "test"), deterministic in (level, split, seed).

    unique=True: no problem twice (raises DatasetError when the split has fewer than ``n`` distinct problems,
    e.g. l0's test split holds about 16 of its 81); False: drawn with replacement; None: without replacement
    for the test split of a preset with ``distinct_heldout``, else with replacement. A problem's identity is
    :func:`problem_identity` under the preset's ``canonical`` rule; a preset
    with its own ``heldout_fraction`` uses it whatever the argument says (its held-out set is part of the preset).
    The first ``m`` problems of a draw of ``n >= m`` are the draw of ``m`` (the stream does not depend on ``n``).
    """
    spec = get_preset(level) if isinstance(level, str) else level
    if spec.heldout_fraction is not None:
        heldout_fraction = spec.heldout_fraction
    if unique is None:
        unique = spec.distinct_heldout and split == "test"
    if split not in ("train", "test"):
        raise DatasetError(f"split {split!r}: choose 'train' or 'test' (held-out)")
    if not 0.0 < heldout_fraction < 1.0:
        raise DatasetError(f"heldout_fraction={heldout_fraction}: must be in (0, 1)")
    if n <= 0:
        raise DatasetError(f"n={n}: must be > 0")
    if isinstance(spec, ArithmeticMixture):
        levels = [lv for lv, _ in spec.components]
        weights = [float(w) for _, w in spec.components]
    else:
        levels, weights = [spec], [1.0]
    rng = random.Random(f"arith/{spec.name}/{split}/{seed}")
    examples, seen, tries, max_tries = [], set(), 0, 200 * n + 2000
    while len(examples) < n:
        tries += 1
        if tries > max_tries:
            raise DatasetError(f"arithmetic {spec.name}/{split}: found only {len(examples)} of {n} "
                               f"{'distinct ' if unique else ''}problems in {max_tries} draws; ask for fewer, set "
                               f"unique=False, or use a harder level with more problems")
        lv = rng.choices(levels, weights)[0] if len(levels) > 1 else levels[0]
        p = sample_problem(lv, rng)
        identity = problem_identity(p, spec.canonical)
        if problem_split(identity, heldout_fraction) != split or (unique and identity in seen):
            continue
        seen.add(identity)
        text, style = _surface(lv, p, rng)
        examples.append(PromptExample(
            id=f"arith-{spec.name}-{split}-{seed}-{len(examples)}", reference=str(p.answer), prompt=text,
            data_source=f"arithmetic/{lv.name}",
            meta={"level": lv.name, "expression": p.key, "canonical": identity, "split": split,
                  "num_ops": len(p.steps), "style": style}))
    report = LoadReport(path=f"<arithmetic {spec.name} {split} seed={seed}>", schema="arithmetic", rows=n, loaded=n)
    return PromptDataset(examples, report)
