"""Prompt datasets: jsonl / json / parquet / a directory of json files -> ``PromptExample`` rows, checked up front.

Schemas (``schema="auto"`` picks one from the columns; the first that fits wins):

=========  ================================================================  ==========================================
schema     columns                                                           reference answer
=========  ================================================================  ==========================================
verl       data_source, prompt (list of {role, content}), reward_model       ``reward_model["ground_truth"]``
           ({ground_truth, style}), extra_info (optional)
gsm8k      question, answer (worked solution ending in ``#### n``)           the text after ``####`` (commas dropped)
math       problem, solution (with ``\\boxed{}``) and/or answer;              ``answer`` if present, else the last
           level, type / subject (optional)                                  ``\\boxed{}`` of ``solution``
prompts    prompt (text or list of messages), answer; id, data_source, meta  ``answer`` (this project's own jsonl,
           (optional)                                                        written by examples/prepare_*.py)
=========  ================================================================  ==========================================

A row that does not fit (invalid JSON, a missing or empty field, no ``####`` / ``\\boxed``) is skipped and counted
in the :class:`LoadReport` (counts per reason and the first few row numbers). :class:`DatasetError` is raised at
load time -- never deep into a run -- for a missing file, an unreadable format, columns that fit no schema (the
message lists each schema's columns), an empty result, or more than ``max_malformed_fraction`` of rows malformed.

:class:`PromptSampler` walks the indices of a dataset of a given size in seeded, per-epoch shuffled order; its
position (epoch, index, seed) is saved with ``state_dict()`` and restored with ``load_state_dict()`` so a resumed
run sees the same prompts.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, Optional, Sequence

__all__ = [
    "DatasetError",
    "LoadReport",
    "PromptDataset",
    "PromptExample",
    "PromptSampler",
    "SCHEMAS",
    "read_prompt_file",
    "read_rows",
    "write_prompts_jsonl",
    "write_verl_parquet",
]

logger = logging.getLogger(__name__)

SCHEMAS: dict[str, str] = {
    "verl": "data_source, prompt (list of chat messages), reward_model {ground_truth, style}, extra_info",
    "gsm8k": "question, answer (ending in '#### <number>')",
    "math": "problem, solution (with \\boxed{...}) and/or answer; level, type optional",
    "prompts": "prompt (text or chat messages), answer; id, data_source, meta optional",
}
_MAX_SAMPLES = 5


class DatasetError(ValueError):
    """A user-fixable problem with a dataset file; the message names the file and what to do."""


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class PromptExample:
    """One prompt. Exactly one of ``prompt`` (the question text; system prompt and instruction are added when
    rendering) or ``messages`` (a ready chat, e.g. from verl parquet) is set. ``reference`` is the answer string."""

    id: str
    reference: str
    prompt: Optional[str] = None
    messages: Optional[list[dict]] = None
    data_source: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class LoadReport:
    path: str
    schema: str
    rows: int = 0                                      # rows read (blank lines not counted)
    loaded: int = 0
    skipped: int = 0
    reasons: dict = field(default_factory=dict)        # reason -> count
    samples: list = field(default_factory=list)        # first few "row N: reason (detail)"

    def add_bad(self, where: str, bad: _BadRow) -> None:
        self.skipped += 1
        self.reasons[bad.reason] = self.reasons.get(bad.reason, 0) + 1
        if len(self.samples) < _MAX_SAMPLES:
            self.samples.append(f"{where}: {bad.reason}" + (f" ({bad.detail})" if bad.detail else ""))

    def summary(self) -> str:
        s = f"{self.path}: loaded {self.loaded} of {self.rows} rows ({self.schema} schema)"
        if self.skipped:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
            s += f"; skipped {self.skipped} malformed ({reasons}); first: " + "; ".join(self.samples)
        return s


class PromptDataset(Sequence):
    """A list of :class:`PromptExample` with the :class:`LoadReport` that produced it."""

    def __init__(self, examples: list[PromptExample], report: Optional[LoadReport] = None):
        self.examples = list(examples)
        self.report = report or LoadReport(path="<memory>", schema="prompts", rows=len(examples),
                                           loaded=len(examples))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


# ---------------------------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------------------------

def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` from a .jsonl[.gz] / .json / .parquet file or a directory of .json files.
    ``row`` is a dict, or a :class:`_BadRow` for a line that is not a JSON object."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"dataset {str(p)!r} does not exist; check data paths in the config (cwd: {os.getcwd()})")
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".json", ".jsonl"))
        if not files:
            raise DatasetError(f"dataset directory {str(p)!r} holds no .json/.jsonl files")
        for q in files:
            rel = str(q.relative_to(p))
            if q.suffix == ".jsonl":
                for where, row in _read_jsonl(q):
                    yield f"{rel}:{where}", row
                continue
            try:
                obj = json.loads(q.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                yield rel, _BadRow("invalid JSON", str(e)[:80])
                continue
            if isinstance(obj, dict):
                obj.setdefault("id", os.path.splitext(rel)[0])
            yield rel, obj if isinstance(obj, dict) else _BadRow("not a JSON object")
        return
    name = p.name.lower()
    if name.endswith(".parquet"):
        yield from _read_parquet(p)
    elif name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        yield from _read_jsonl(p)
    elif name.endswith(".json"):
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DatasetError(f"dataset {str(p)!r} is not valid JSON ({e}); for one object per line use .jsonl")
        rows = obj if isinstance(obj, list) else obj.get("data", [obj]) if isinstance(obj, dict) else None
        if not isinstance(rows, list):
            raise DatasetError(f"dataset {str(p)!r}: expected a JSON list of objects")
        for i, row in enumerate(rows):
            yield f"item {i}", row if isinstance(row, dict) else _BadRow("not a JSON object")
    else:
        raise DatasetError(f"dataset {str(p)!r}: unknown file type; use .jsonl, .jsonl.gz, .json or .parquet "
                           "(or a directory of .json files)")


def _read_jsonl(p: Path) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if p.name.endswith(".gz") else open
    try:
        with opener(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as e:
                    yield f"line {lineno}", _BadRow("invalid JSON", str(e)[:80])
                    continue
                yield f"line {lineno}", row if isinstance(row, dict) else _BadRow("not a JSON object")
    except OSError as e:
        raise DatasetError(f"cannot read dataset {str(p)!r}: {e}") from e


def _read_parquet(p: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DatasetError(f"reading {str(p)!r} needs pyarrow: pip install pyarrow") from e
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise DatasetError(f"cannot read parquet dataset {str(p)!r}: {e}") from e
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            i += 1
            yield f"row {i}", row


# ---------------------------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------------------------

def _detect(keys: set) -> Optional[str]:
    if {"prompt", "reward_model"} <= keys:
        return "verl"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if "problem" in keys and ({"solution", "answer"} & keys):
        return "math"
    if ({"prompt", "messages"} & keys) and ({"answer", "reference"} & keys):
        return "prompts"
    return None


def _text(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        raise _BadRow(f"missing '{key}'")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise _BadRow(f"'{key}' is not text", type(v).__name__)
    if not v.strip():
        raise _BadRow(f"empty '{key}'")
    return v


def _messages(v: Any, key: str) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise _BadRow(f"'{key}' is not a non-empty list of messages")
    out = []
    for m in v:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _BadRow(f"'{key}' has a message without role/content text")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user" and not any(m["role"] == "user" for m in out):
        raise _BadRow(f"'{key}' has no user message")
    return out


def _convert(row: dict, schema: str, default_id: str, data_source: Optional[str]) -> PromptExample:
    from megatron_bppo.rewards.extract import extract_boxed, extract_hash, normalize_number

    rid = str(row.get("id") if row.get("id") is not None else row.get("unique_id") or default_id)
    if schema == "gsm8k":
        question, solution = _text(row, "question"), _text(row, "answer")
        ans = extract_hash(solution, numeric=False)
        if ans is None:
            raise _BadRow("no '#### <answer>' in 'answer'")
        ref = normalize_number(ans) or ans
        return PromptExample(rid, ref, prompt=question, data_source=data_source or "gsm8k",
                             meta={"solution": solution})
    if schema == "math":
        problem = _text(row, "problem")
        if row.get("answer") not in (None, ""):
            ref = _text(row, "answer")
        else:
            solution = _text(row, "solution")
            ref = extract_boxed(solution)
            if ref is None:
                raise _BadRow("no \\boxed{...} answer in 'solution'")
        meta = {k: row[k] for k in ("level", "type", "subject", "solution") if row.get(k) is not None}
        return PromptExample(rid, ref.strip(), prompt=problem, data_source=data_source or "math", meta=meta)
    if schema == "verl":
        messages = _messages(row.get("prompt"), "prompt")
        rm = row.get("reward_model")
        if not isinstance(rm, dict) or rm.get("ground_truth") in (None, ""):
            raise _BadRow("missing 'reward_model.ground_truth'")
        gt = rm["ground_truth"]
        if isinstance(gt, (list, tuple)):  # some verl sets hold several acceptable answers; keep the first
            gt = gt[0] if gt else ""
        ref = str(gt).strip()
        if not ref:
            raise _BadRow("empty 'reward_model.ground_truth'")
        extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
        if row.get("id") is None and extra.get("id") is not None:
            rid = str(extra["id"])
        elif row.get("id") is None and extra.get("index") is not None:
            rid = f"{extra.get('split', 'row')}-{extra['index']}"
        meta = {"extra_info": extra, "ability": row.get("ability"), "style": rm.get("style")}
        return PromptExample(rid, ref, messages=messages, data_source=data_source or str(row.get("data_source") or ""),
                             meta=meta)
    # prompts
    key = "prompt" if "prompt" in row else "messages"
    value = row.get(key)
    ref = _text(row, "answer" if "answer" in row else "reference")
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    ds = data_source or str(row.get("data_source") or "")
    if isinstance(value, list):
        return PromptExample(rid, ref.strip(), messages=_messages(value, key), data_source=ds, meta=meta)
    return PromptExample(rid, ref.strip(), prompt=_text(row, key), data_source=ds, meta=meta)


def read_prompt_file(path: str | os.PathLike, *, schema: str = "auto", limit: Optional[int] = None,
                 data_source: Optional[str] = None, max_malformed_fraction: float = 0.5,
                 id_prefix: Optional[str] = None) -> PromptDataset:
    """Load and check a prompt dataset (see the module docstring for formats and errors).

    Rows without an ``id`` get ``f"{id_prefix}{row_number}"`` (row numbers count malformed rows too, so ids stay
    tied to the source rows); ``id_prefix`` defaults to ``"<file stem>-"``. ``data_source`` overrides the rows'.
    """
    if schema != "auto" and schema not in SCHEMAS:
        raise DatasetError(f"unknown dataset schema {schema!r}; choose auto or one of: {', '.join(SCHEMAS)}")
    path_s = str(path)
    rows = read_rows(path)
    pending: list[tuple[str, Any]] = []
    chosen = None if schema == "auto" else schema
    seen_keys: Counter = Counter()
    report = LoadReport(path=path_s, schema=chosen or "?")
    examples: list[PromptExample] = []
    prefix = id_prefix if id_prefix is not None else (Path(path_s).stem.split(".")[0] or "row") + "-"

    def handle(where: str, row: Any) -> None:
        report.rows += 1
        try:
            if isinstance(row, _BadRow):
                raise row
            if not isinstance(row, dict):
                raise _BadRow("not a JSON object")
            examples.append(_convert(row, chosen, f"{prefix}{report.rows - 1}", data_source))
            report.loaded += 1
        except _BadRow as bad:
            report.add_bad(where, bad)

    for where, row in rows:
        if chosen is None:  # buffer rows until one tells the schema
            pending.append((where, row))
            if isinstance(row, dict):
                seen_keys.update(row.keys())
                chosen = _detect(set(row.keys()))
            if chosen is None and len(pending) < 50:
                continue
            if chosen is None:
                break
            report.schema = chosen
            for w, r in pending:
                handle(w, r)
            pending = []
        else:
            handle(where, row)
        if limit is not None and report.loaded >= limit:
            break

    if chosen is None:
        if not seen_keys and not pending:
            raise DatasetError(f"dataset {path_s!r} is empty")
        cols = ", ".join(sorted(seen_keys)) or "(no JSON objects)"
        expected = "; ".join(f"{k}: {v}" for k, v in SCHEMAS.items())
        raise DatasetError(f"dataset {path_s!r}: cannot tell its schema from its columns [{cols}]. Expected one of "
                           f"-- {expected}. Convert it with examples/prepare_gsm8k.py / prepare_math.py or pass "
                           f"the schema explicitly.")
    if report.loaded == 0:
        if report.rows == 0:
            raise DatasetError(f"dataset {path_s!r} is empty")
        raise DatasetError(f"dataset {path_s!r}: no usable rows for the {chosen} schema (expected columns: "
                           f"{SCHEMAS[chosen]}). {report.summary()}")
    if report.rows and report.skipped / report.rows > max_malformed_fraction:
        raise DatasetError(f"dataset {path_s!r}: {report.skipped} of {report.rows} rows are malformed (more than "
                           f"{max_malformed_fraction:.0%}); is this the right file / schema (expected columns: "
                           f"{SCHEMAS[chosen]})? {report.summary()}")
    if limit is not None and len(examples) > limit:
        report.loaded, examples = limit, examples[:limit]
    if report.skipped:
        logger.warning("%s", report.summary())
    return PromptDataset(examples, report)


# ---------------------------------------------------------------------------------------------------------------
# Writing (used by examples/prepare_*.py)
# ---------------------------------------------------------------------------------------------------------------

def _atomic_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_prompts_jsonl(examples: Sequence[PromptExample], path: str | os.PathLike) -> Path:
    """Write this project's jsonl ("prompts" schema): id, data_source, prompt (or messages), answer, meta."""
    path = Path(path)
    tmp = _atomic_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            row = {"id": ex.id, "data_source": ex.data_source,
                   "prompt": ex.messages if ex.messages is not None else ex.prompt,
                   "answer": ex.reference, "meta": ex.meta}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_verl_parquet(examples: Sequence[PromptExample], path: str | os.PathLike, *,
                       instruction: Optional[str] = None, ability: str = "math", split: str = "train") -> Path:
    """Write verl's RL parquet schema. ``instruction`` is appended to the question (verl bakes it into the prompt)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, ex in enumerate(examples):
        if ex.messages is not None:
            messages = ex.messages
        else:
            content = ex.prompt if not instruction else f"{ex.prompt} {instruction}"
            messages = [{"role": "user", "content": content}]
        rows.append({"data_source": ex.data_source, "prompt": messages, "ability": ability,
                     "reward_model": {"style": "rule", "ground_truth": ex.reference},
                     "extra_info": {"split": str(ex.meta.get("split", split)), "index": i, "id": ex.id,
                                    "question": ex.prompt or ""}})
    path = Path(path)
    tmp = _atomic_path(path)
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Resumable, seeded iteration
# ---------------------------------------------------------------------------------------------------------------

class PromptSampler:
    """Seeded epoch iteration over ``num_examples`` indices with a resumable position.

    Epoch ``e`` visits a permutation fixed by ``(seed, e)`` (identity when ``shuffle=False``); a batch that runs
    past the end of an epoch continues in the next. ``state_dict()`` = {epoch, index, seed, shuffle,
    num_examples, fingerprint}; ``load_state_dict`` refuses a state from a dataset of another size (or, with
    ``strict``, another fingerprint). ``fingerprint``: what the indices mean, e.g.
    ``data.prompts.prompts_fingerprint(rendered)``; None checks the size only.
    """

    def __init__(self, num_examples: int, *, seed: int = 0, shuffle: bool = True,
                 fingerprint: Optional[str] = None):
        self.fingerprint = fingerprint
        self.num_examples = int(num_examples)
        if self.num_examples <= 0:
            raise DatasetError("cannot sample prompts from an empty dataset")
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = -1, []

    def _order(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            perm = list(range(self.num_examples))
            if self.shuffle:
                random.Random(f"prompts/{self.seed}/{self.epoch}").shuffle(perm)
            self._perm, self._perm_epoch = perm, self.epoch
        return self._perm

    def next_indices(self, n: int, exclude: Collection[int] = ()) -> list[int]:
        """The next `n` distinct indices in epoch order, none of them in `exclude` (the indices the current step
        already holds). An index skipped for that reason at an epoch boundary is not revisited in its new epoch:
        no prompt appears twice in one step, at the cost of at most `n` visits per epoch boundary."""
        if n > self.num_examples - len(exclude):
            raise DatasetError(f"cannot draw {n} distinct prompts: the dataset has {self.num_examples} and "
                               f"{len(exclude)} are already in this step; lower data.prompts_per_step (or "
                               f"algorithm.target_pairs / max_prompt_draw_factor) or use a larger dataset")
        out: list[int] = []
        taken = set(exclude)
        while len(out) < n:
            order = self._order()
            index = order[self.index]
            self.index += 1
            if self.index >= self.num_examples:
                self.epoch, self.index = self.epoch + 1, 0
            if index not in taken:
                out.append(index)
                taken.add(index)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "shuffle": self.shuffle,
                "num_examples": self.num_examples, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        if int(state["num_examples"]) != self.num_examples:
            raise DatasetError(f"cannot resume the prompt position: the checkpoint was taken on a dataset of "
                               f"{state['num_examples']} prompts, this one has {self.num_examples}. Use the same "
                               f"data files to resume, or start a new run directory.")
        fp = self.fingerprint
        if strict and fp and state.get("fingerprint") and state["fingerprint"] != fp:
            raise DatasetError("cannot resume the prompt position: the dataset's content changed since the "
                               "checkpoint (same size, other ids/answers). Use the same data or strict=False.")
        if not 0 <= int(state["index"]) < self.num_examples:
            raise DatasetError(f"bad sampler state: index {state['index']} outside [0, {self.num_examples})")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.seed, self.shuffle = int(state["seed"]), bool(state.get("shuffle", True))
        self._perm_epoch = -1
