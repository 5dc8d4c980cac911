"""Prompt datasets (schemas, malformed rows, clear errors), resumable sampling, chat rendering, the arithmetic task,
and the GSM8K / MATH preparation scripts on fixture files in the releases' formats."""
import json
import os

import pytest

from megatron_bppo.data import (DIRECT_INSTRUCTION, ArithmeticLevel, ChatFormat, ChatTemplateError, DatasetError,
                                PromptExample, PromptRenderer, PromptSampler, PromptTooLongError,
                                build_messages, generate_arithmetic, get_preset, read_prompt_file, open_dataset,
                                problem_split, write_prompts_jsonl, write_verl_parquet)
from megatron_bppo.data.arithmetic import Problem, problem_identity, sample_problem
from conftest import ROOT, load_script

FIX = os.path.join(ROOT, "tests", "fixtures")


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _load_script(name):
    return load_script(f"examples/{name}.py")


@pytest.fixture(scope="module")
def tokenizer():
    from megatron_bppo.testing.tiny_models import train_tiny_tokenizer

    return train_tiny_tokenizer(None, vocab_size=512)


# ----------------------------------------------------------------------------------------------- loading


def test_gsm8k_jsonl_malformed_rows_counted():
    ds = read_prompt_file(os.path.join(FIX, "gsm8k", "train.jsonl"))
    rep = ds.report
    assert (rep.schema, rep.rows, rep.loaded, rep.skipped) == ("gsm8k", 5, 3, 2)
    assert rep.reasons == {"no '#### <answer>' in 'answer'": 1, "invalid JSON": 1}
    assert rep.samples[0] == "line 4: no '#### <answer>' in 'answer'"
    assert rep.samples[1].startswith("line 5: invalid JSON")
    assert [e.reference for e in ds] == ["27", "1350", "12.5"]
    assert [e.id for e in ds] == ["train-0", "train-1", "train-2"]
    assert ds[0].prompt.startswith("Lena picked 12 apples") and ds[0].messages is None
    assert ds[0].data_source == "gsm8k" and ds[0].meta["solution"].endswith("#### 27")
    assert "skipped 2 malformed" in rep.summary()


def test_math_directory_tree_and_jsonl():
    train = read_prompt_file(os.path.join(FIX, "math", "MATH", "train"))
    assert (train.report.schema, train.report.rows, train.report.loaded) == ("math", 3, 2)
    assert train.report.reasons == {"no \\boxed{...} answer in 'solution'": 1}
    by_id = {e.id: e for e in train}
    assert by_id["algebra/1"].reference == "4"
    assert by_id["algebra/2"].reference == "\\frac{1}{2}"
    assert by_id["algebra/2"].meta["level"] == "Level 2" and by_id["algebra/2"].meta["type"] == "Algebra"
    test = read_prompt_file(os.path.join(FIX, "math", "MATH", "test"))
    assert {e.id: e.reference for e in test} == {"algebra/5": "x^{2}+2x+1", "geometry/4": "2"}  # last \boxed
    assert test.report.reasons == {"invalid JSON": 1}
    m500 = read_prompt_file(os.path.join(FIX, "math", "math500.jsonl"))
    assert [(e.id, e.reference) for e in m500] == [("test/algebra/100.json", "25"),
                                                   ("test/prealgebra/7.json", "\\frac{1}{2}")]
    assert m500.report.reasons == {"empty 'problem'": 1}


def test_verl_parquet_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "What is 2+2?"}], "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": "4"}, "extra_info": {"split": "train", "index": 0}},
        {"data_source": "openai/gsm8k", "prompt": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "What is 3+3?"}], "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": "6"}, "extra_info": {"split": "train", "index": 1}},
        {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "No answer"}], "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": None}, "extra_info": {"split": "train", "index": 2}},
    ]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ds = read_prompt_file(path)
    assert (ds.report.schema, ds.report.loaded, ds.report.skipped) == ("verl", 2, 1)
    assert ds.report.reasons == {"missing 'reward_model.ground_truth'": 1}
    assert [(e.id, e.reference, e.data_source) for e in ds] == [("train-0", "4", "openai/gsm8k"),
                                                               ("train-1", "6", "openai/gsm8k")]
    assert ds[1].messages[0] == {"role": "system", "content": "Be brief."} and ds[1].prompt is None


def test_roundtrip_project_jsonl_and_verl_parquet(tmp_path):
    src = read_prompt_file(os.path.join(FIX, "gsm8k", "test.jsonl"))
    back = read_prompt_file(write_prompts_jsonl(src, tmp_path / "p.jsonl"))
    assert back.report.schema == "prompts"
    assert [(e.id, e.prompt, e.reference, e.meta) for e in back] == [(e.id, e.prompt, e.reference, e.meta)
                                                                     for e in src]
    pq_back = read_prompt_file(write_verl_parquet(src, tmp_path / "p.parquet", instruction="Think."))
    assert [e.reference for e in pq_back] == ["36", "65"]
    assert pq_back[0].messages == [{"role": "user", "content": src[0].prompt + " Think."}]
    assert pq_back[0].id == src[0].id


def test_dataset_errors_are_clear(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DatasetError, match="is empty"):
        read_prompt_file(empty)
    wrong = _write_jsonl(tmp_path / "wrong.jsonl", [{"foo": 1, "bar": "x"}] * 3)
    with pytest.raises(DatasetError, match=r"columns \[bar, foo\]\. Expected one of.*gsm8k: question, answer"):
        read_prompt_file(wrong)
    gsm = os.path.join(FIX, "gsm8k", "test.jsonl")
    with pytest.raises(DatasetError, match=r"no usable rows for the math schema \(expected columns: problem, sol"):
        read_prompt_file(gsm, schema="math")
    with pytest.raises(DatasetError, match="unknown dataset schema 'gsm'"):
        read_prompt_file(gsm, schema="gsm")
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "#### 1"}, "{oops", "{oops", "[1]"])
    with pytest.raises(DatasetError, match=r"3 of 4 rows are malformed \(more than 50%\)"):
        read_prompt_file(bad)
    assert read_prompt_file(bad, max_malformed_fraction=1.0).report.reasons == {"invalid JSON": 2,
                                                                            "not a JSON object": 1}
    with pytest.raises(DatasetError, match="unknown file type"):
        read_prompt_file(empty.rename(tmp_path / "data.csv"))
    ok = _write_jsonl(tmp_path / "ok.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(10)])
    assert [e.reference for e in read_prompt_file(ok, limit=4)] == ["0", "1", "2", "3"]


# ----------------------------------------------------------------------------------------------- sampling


def test_sampler_deterministic_epochs_and_resume():
    a = PromptSampler(10, seed=3)
    full = [a.next_indices(4) for _ in range(7)]           # 28 prompts, about 2.8 epochs
    flat = sum(full, [])
    assert all(len(set(call)) == 4 for call in full)        # never a prompt twice in one call (one step)
    assert sorted(flat[:10]) == list(range(10))             # epoch 0 in full
    epoch1 = PromptSampler(10, seed=3)
    epoch1.next_indices(10)
    assert epoch1.next_indices(10) != flat[:10]             # a fresh order each epoch
    assert a.epoch == 2 and a.index >= 8
    again = PromptSampler(10, seed=3)
    assert sum([again.next_indices(4) for _ in range(7)], []) == flat
    assert PromptSampler(10, seed=4).next_indices(10) != flat[:10]
    plain = PromptSampler(10, shuffle=False)
    assert plain.next_indices(8) == list(range(8)) and plain.next_indices(4) == [8, 9, 0, 1]
    with pytest.raises(DatasetError, match="cannot draw 12 distinct prompts"):
        PromptSampler(10).next_indices(12)

    b = PromptSampler(10, seed=3, fingerprint="data-a")
    part = [b.next_indices(4) for _ in range(3)]
    state = json.loads(json.dumps(b.state_dict()))          # survives a checkpoint round trip
    assert {k: state[k] for k in ("epoch", "seed", "fingerprint")} == {"epoch": 1, "seed": 3, "fingerprint": "data-a"}
    assert 2 <= state["index"] <= 4                           # 2, plus prompts skipped as already in the step
    c = PromptSampler(10, seed=99, fingerprint="data-a")
    c.load_state_dict(state)
    assert part + [c.next_indices(4) for _ in range(4)] == full

    with pytest.raises(DatasetError, match="dataset of 10 prompts, this one has 9"):
        PromptSampler(9).load_state_dict(state)
    with pytest.raises(DatasetError, match="content changed"):
        PromptSampler(10, fingerprint="data-b").load_state_dict(state)
    PromptSampler(10, fingerprint="data-b").load_state_dict(state, strict=False)
    PromptSampler(10).load_state_dict(state)                # no fingerprint of its own: the size is checked only
    with pytest.raises(DatasetError, match="empty dataset"):
        PromptSampler(0)


# ----------------------------------------------------------------------------------------------- chat


def test_build_messages():
    ex = PromptExample("a", "7", prompt="What is 3 + 4?")
    assert build_messages(ex) == [{"role": "user", "content": "What is 3 + 4?"}]
    fmt = ChatFormat(system_prompt="Sys.", instruction_prefix=DIRECT_INSTRUCTION, instruction_suffix="Go.")
    assert build_messages(ex, fmt) == [{"role": "system", "content": "Sys."},
                                       {"role": "user", "content": DIRECT_INSTRUCTION + "\nWhat is 3 + 4?\nGo."}]
    chat = PromptExample("b", "1", messages=[{"role": "system", "content": "Own."}, {"role": "user", "content": "Q"}])
    assert build_messages(chat, fmt) == [{"role": "system", "content": "Own."},
                                         {"role": "user", "content": DIRECT_INSTRUCTION + "\nQ\nGo."}]
    assert chat.messages[1]["content"] == "Q"               # the example is not modified


def test_renderer_chat_template_and_length_check(tokenizer):
    ex = PromptExample("a", "7", prompt="What is 3 + 4?")
    r = PromptRenderer(tokenizer, ChatFormat(instruction_suffix="Answer after ####.")).render(ex)
    assert r.text == "<|im_start|>user\nWhat is 3 + 4?\nAnswer after ####.<|im_end|>\n<|im_start|>assistant\n"
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?\nAnswer after ####."}],
                                             tokenize=True, add_generation_prompt=True)["input_ids"]
    assert r.token_ids == list(expected)

    long_ex = PromptExample("long", "1", prompt="What is " + " + ".join(["1"] * 40) + "?")
    strict = PromptRenderer(tokenizer, ChatFormat(max_prompt_tokens=30))
    with pytest.raises(PromptTooLongError, match=r"prompt 'long' has \d+ tokens, more than max_prompt_tokens=30"):
        strict.render_all([ex, long_ex])
    lenient = PromptRenderer(tokenizer, ChatFormat(max_prompt_tokens=30, on_too_long="skip"))
    out = lenient.render_all([ex, long_ex, ex])
    assert [p.example.id for p in out] == ["a", "a"] and lenient.num_too_long == 1
    with pytest.raises(PromptTooLongError, match="all 1 prompts are longer"):
        lenient.render_all([long_ex])
    with pytest.raises(ValueError, match="on_too_long"):
        ChatFormat(on_too_long="truncate")


def test_renderer_without_chat_template(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template.*use_chat_template=false"):
        PromptRenderer(plain)
    r = PromptRenderer(plain, ChatFormat(system_prompt="S", use_chat_template=False)).render(
        PromptExample("a", "1", prompt="Q"))
    assert r.text == "S\n\nQ"


# ----------------------------------------------------------------------------------------------- arithmetic


def test_arithmetic_deterministic_and_integer():
    a = generate_arithmetic("l0_l5_mix", 64, split="train", seed=7)
    b = generate_arithmetic("l0_l5_mix", 64, split="train", seed=7)
    assert [(e.id, e.prompt, e.reference) for e in a] == [(e.id, e.prompt, e.reference) for e in b]
    assert [e.prompt for e in generate_arithmetic("l0_l5_mix", 64, seed=8)] != [e.prompt for e in a]
    assert {e.meta["level"] for e in a} == {"l0", "l5"}
    for e in a:
        assert e.reference == str(int(e.reference)) and int(e.reference) == eval(e.meta["expression"])
        assert e.prompt == f"What is {e.meta['expression']}?" and e.data_source == f"arithmetic/{e.meta['level']}"
    knobs = ArithmeticLevel("hard", num_ops=(2, 4), first_range=(1, 50), operand_range=(1, 12),
                            ops=("+", "-", "*", "/"), style="mixed")
    for e in generate_arithmetic(knobs, 200, seed=1):
        assert int(e.reference) == eval(e.meta["expression"].replace("/", "//")) >= 0
        assert 2 <= e.meta["num_ops"] <= 4
    assert ({e.meta["style"] for e in generate_arithmetic(knobs, 50, seed=1)} == {"expression", "word"})


def test_arithmetic_splits_disjoint():
    train = generate_arithmetic("l1", 400, split="train", seed=0)
    test = generate_arithmetic("l1", 200, split="test", seed=0)
    tr, te = {e.meta["expression"] for e in train}, {e.meta["expression"] for e in test}
    assert not tr & te and len(te) > 50
    assert all(problem_split(k) == "test" for k in te) and all(problem_split(k) == "train" for k in tr)
    # disjoint across levels and seeds too: the split is a property of the problem
    other = {e.meta["expression"] for e in generate_arithmetic("l0_l1_mix", 300, split="train", seed=5)}
    assert not other & te
    l0_test = generate_arithmetic("l0", 10, split="test", seed=0, unique=True)
    assert len({e.meta["expression"] for e in l0_test}) == 10
    with pytest.raises(DatasetError, match="distinct problems"):
        generate_arithmetic("l0", 40, split="test", unique=True)     # l0's test split has ~17 of 81


def test_open_dataset():
    ds = open_dataset("arithmetic:l5", size=8, split="test", seed=2)
    assert len(ds) == 8 and {e.meta["split"] for e in ds} == {"test"} and ds.report.schema == "arithmetic"
    assert [e.prompt for e in ds] == [e.prompt for e in generate_arithmetic("l5", 8, split="test", seed=2)]
    assert len(open_dataset("arithmetic")) == 1024 and open_dataset("arithmetic")[0].meta["level"] == "l0"
    assert len(open_dataset(os.path.join(FIX, "gsm8k", "train.jsonl"), size=2)) == 2
    with pytest.raises(DatasetError, match="unknown arithmetic level"):
        open_dataset("arithmetic:l7")


def test_arithmetic_presets_and_word_style():
    assert get_preset("l0").expected.startswith("direct T=0.7: acc 0.47")
    with pytest.raises(DatasetError, match="unknown arithmetic level 'l9'; presets: l0, l5, l1"):
        get_preset("l9")
    e = generate_arithmetic("l3", 1, seed=0)[0]
    a, b, c = (int(x) for x in e.meta["expression"].replace("-", "+").split("+"))
    assert e.prompt.split(" has ")[1].startswith(f"{a} ") and f" {b} more and " in e.prompt
    assert e.prompt.endswith("have now?") and int(e.reference) == a + b - c
    with pytest.raises(ValueError, match="operations must be"):
        ArithmeticLevel("bad", ops=("^",))


def _fingerprint(ds):
    import hashlib

    h = hashlib.sha256()
    for e in ds:
        h.update(f"{e.id}|{e.prompt}|{e.reference}\n".encode())
    return h.hexdigest()[:16]


def test_older_presets_unchanged():
    """The identity / split knobs added for the head-to-head presets leave every older preset's problems and splits
    as they were (fingerprints taken from the generator before the change)."""
    assert _fingerprint(generate_arithmetic("l0_l5_mix", 200, split="train", seed=0)) == "689cc00e3890bea6"
    assert _fingerprint(generate_arithmetic("l0_l5_mix", 100, split="test", seed=1)) == "afbb5670b1e3edce"
    assert _fingerprint(generate_arithmetic("l1", 200, split="train", seed=0)) == "39ac358fc99a2e4c"
    assert _fingerprint(generate_arithmetic("l1", 100, split="test", seed=1)) == "cd044a3fac1abcd7"
    assert _fingerprint(generate_arithmetic("l3", 200, split="train", seed=0)) == "4f9ff6952cd10e25"
    assert _fingerprint(generate_arithmetic("l3", 100, split="test", seed=1)) == "f56777f1662412e5"


def test_problem_identity():
    import random

    rng = random.Random(0)
    lv = ArithmeticLevel("t", first_range=(2, 40), operand_range=(2, 40), ops=("+", "-", "*"), num_ops=(1, 2))
    for _ in range(300):
        p = sample_problem(lv, rng)
        assert problem_identity(p) == p.key                       # the default rule: the expression itself
        ident = problem_identity(p, "commutative")
        assert eval(ident) == eval(p.key) == p.answer               # same value, same operation sequence
        op, n = p.steps[0]
        if op in "+*":
            swapped = Problem(key="", answer=p.answer, steps=[(op, p.first), *p.steps[1:]], first=n)
            assert problem_identity(swapped, "commutative") == ident
    minus = Problem(key="9 - 3", answer=6, steps=[("-", 3)], first=9)
    assert problem_identity(minus, "commutative") == "9 - 3"
    with pytest.raises(ValueError, match="canonical"):
        ArithmeticLevel("bad", canonical="sorted")


HEAD_TO_HEAD = "one_op_25"


def _held_out(seed, n=256):
    """The held-out prompts a run with data.seed = seed evaluates (data/prompts.py: test split, seed + 1)."""
    return open_dataset(f"arithmetic:{HEAD_TO_HEAD}", split="test", seed=seed + 1, size=n)


def test_head_to_head_heldout_distinct_and_large():
    for seed in (0, 1):
        ids = [e.meta["canonical"] for e in _held_out(seed)]
        assert len(ids) == 256 and len(set(ids)) == 256
        assert all(problem_split(i, 0.6) == "test" for i in ids)
    # the split holds more than 256 identities (enumerated: every problem of the level), so 256 always exist
    lv = get_preset(HEAD_TO_HEAD)
    test_ids, train_ids = set(), set()
    for a in range(lv.first_range[0], lv.first_range[1] + 1):
        for op in lv.ops:
            for b in range(lv.operand_range[0], lv.operand_range[1] + 1):
                v = a + b if op == "+" else a - b if op == "-" else a * b
                if v >= 0:
                    ident = problem_identity(Problem(f"{a} {op} {b}", v, [(op, b)], a), lv.canonical)
                    (test_ids if problem_split(ident, lv.heldout_fraction) == "test" else train_ids).add(ident)
    assert len(test_ids) == 298 and len(train_ids) == 194


def test_head_to_head_heldout_disjoint_from_training():
    held = {e.meta["canonical"] for e in _held_out(0)}
    for seed in (0, 1, 2, 3, 100):                      # every data seed's training set, as the runs draw it
        train = open_dataset(f"arithmetic:{HEAD_TO_HEAD}", split="train", seed=seed, size=2048)
        assert len(train) == 2048 and not held & {e.meta["canonical"] for e in train}
    # canonical identity, not text: "8 + 31" in training would be "31 + 8" held out; and the surface forms
    # (templates) never make a held-out problem look new
    texts = {e.prompt for e in _held_out(0)}
    assert len({e.meta["expression"] for e in _held_out(0)}) == 256 and len(texts) == 256


def test_head_to_head_heldout_deterministic():
    a, b = _held_out(0), _held_out(0)
    assert [(e.id, e.prompt, e.reference) for e in a] == [(e.id, e.prompt, e.reference) for e in b]
    # the in-run checks use the first 64 held-out prompts: the same as the first 64 of the 256
    assert [e.prompt for e in _held_out(0, 64)] == [e.prompt for e in a][:64]
    # fixed by the preset and the data seed: the held-out fraction argument does not move it
    c = generate_arithmetic(HEAD_TO_HEAD, 256, split="test", seed=1, heldout_fraction=0.2)
    assert [e.prompt for e in c] == [e.prompt for e in a]
    assert [e.prompt for e in _held_out(1)] != [e.prompt for e in a]
    for e in a:
        assert int(e.reference) == eval(e.meta["expression"]) >= 0 and e.meta["num_ops"] == 1
    assert all(e.prompt == f"What is {e.meta['expression']}?" for e in a)
    with pytest.raises(DatasetError, match="distinct problems"):
        generate_arithmetic(HEAD_TO_HEAD, 299, split="test", seed=1)     # the split holds 298


# ----------------------------------------------------------------------------------------------- prepare scripts


def test_prepare_gsm8k(tmp_path, capsys):
    mod = _load_script("prepare_gsm8k")
    assert mod.main([os.path.join(FIX, "gsm8k"), "--out-dir", str(tmp_path), "--parquet"]) == 0
    assert "loaded 3 of 5 rows" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    assert [(r["id"], r["answer"], r["data_source"], r["meta"]["split"]) for r in rows] == [
        ("gsm8k-train-0", "27", "gsm8k", "train"), ("gsm8k-train-1", "1350", "gsm8k", "train"),
        ("gsm8k-train-2", "12.5", "gsm8k", "train")]
    assert read_prompt_file(tmp_path / "test.jsonl").report.loaded == 2
    verl = read_prompt_file(tmp_path / "train.parquet")
    assert verl.report.schema == "verl" and [e.id for e in verl] == ["gsm8k-train-0", "gsm8k-train-1",
                                                                      "gsm8k-train-2"]
    assert verl[0].messages[0]["content"].endswith('output the final answer after "####".')
    assert mod.main([str(tmp_path / "nope.jsonl"), "--out-dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_prepare_math(tmp_path, capsys):
    mod = _load_script("prepare_math")
    assert mod.main([os.path.join(FIX, "math", "MATH"), os.path.join(FIX, "math", "math500.jsonl"),
                     "--out-dir", str(tmp_path), "--parquet"]) == 0
    out = capsys.readouterr().out
    assert out.count("loaded 2 of 3 rows") == 3
    test = [json.loads(line) for line in open(tmp_path / "test.jsonl")]
    assert [(r["id"], r["answer"], r["meta"]["level"]) for r in test] == [
        ("math-test-algebra/5", "x^{2}+2x+1", "Level 5"), ("math-test-geometry/4", "2", "Level 3")]
    assert {r["id"] for r in map(json.loads, open(tmp_path / "train.jsonl"))} == {"math-train-algebra/1",
                                                                                  "math-train-algebra/2"}
    assert [e.reference for e in read_prompt_file(tmp_path / "math500.parquet")] == ["25", "\\frac{1}{2}"]
    assert mod.main([os.path.join(FIX, "math", "MATH"), "--out-dir", str(tmp_path / "l5"), "--levels", "5"]) == 0
    assert [json.loads(x)["id"] for x in open(tmp_path / "l5" / "test.jsonl")] == ["math-test-algebra/5"]
    assert not (tmp_path / "l5" / "train.jsonl").exists()      # nothing of level 5 in train: no file
    assert mod.main([os.path.join(FIX, "math", "MATH", "train"), "--out-dir", str(tmp_path / "x"),
                     "--levels", "5"]) == 2
    assert "no problems left" in capsys.readouterr().err
