"""Tests for data.py (loading, answer extraction and matching) and scripts/make_gsm8k.py."""

import importlib.util
import json
from pathlib import Path

import pytest

from data import answers_match, extract_answer, find_answer, load_examples, to_number
from plumbing.cli import UserError
from plumbing.files import replace_marked_block

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# extract_answer / find_answer: (text, expected answer, expected rule)

EXTRACT_CASES = [
    # '####' (GSM8K): the last one wins, up to the end of its line, raw text kept
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72", "####"),
    ("#### 1,234", "1,234", "####"),
    ("#### 5\nwait, recompute\n#### 7", "7", "####"),
    ("#### 42 apples\nHope this helps! 3", "42 apples", "####"),
    ("The answer is #### 18.", "18.", "####"),
    ("####   100  ", "100", "####"),
    ("#### $1,200", "$1,200", "####"),
    ("#### 21.0", "21.0", "####"),
    ("####-3", "-3", "####"),
    ("\\boxed{8}\n#### 9", "9", "####"),  # '####' outranks \boxed
    ("12 eggs\n####\n", "12", "last_number"),  # empty '####' line: fall through
    # \boxed{...}: last complete one, balanced braces
    ("so \\boxed{42}.", "42", "boxed"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed"),
    ("first \\boxed{1}, then \\boxed{2}", "2", "boxed"),
    ("\\boxed{\\text{5 apples}}", "\\text{5 apples}", "boxed"),
    ("\\boxed{a{b{c}}d} and 9", "a{b{c}}d", "boxed"),
    ("\\boxed{3} but maybe \\boxed{4", "3", "boxed"),  # truncated generation
    ("\\boxed{ -3 }", "-3", "boxed"),
    ("\\boxed{1,000}", "1,000", "boxed"),
    ("\\boxed{} so 7", "7", "last_number"),  # empty box is no answer
    # last number in the text
    ("The answer is 42.", "42", "last_number"),
    ("It costs $1,000.50 in total.", "1,000.50", "last_number"),
    ("It dropped to -5 degrees", "-5", "last_number"),
    ("It dropped to \u22125 degrees", "-5", "last_number"),  # typographic minus
    ("5-3 = 2", "2", "last_number"),
    ("from 3 to 4.5", "4.5", "last_number"),
    ("Version 1.2.3", "1.2", "last_number"),
    ("about 50%.", "50", "last_number"),
    ("half is 1/2", "1/2", "last_number"),
    ("60/5 = 12 boxes", "12", "last_number"),
    ("speed 1.5e3 m/s", "1.5e3", "last_number"),
    ("In 2023 she was 7.", "7", "last_number"),
    ("answer: 3.0", "3.0", "last_number"),
    ("x = -0.25", "-0.25", "last_number"),
    (".5 of the pie", ".5", "last_number"),
    ("12,345,678 people", "12,345,678", "last_number"),
    ("1,2,3", "3", "last_number"),
    ("3 apples + 4 apples = 7 apples. Done", "7", "last_number"),
    ("x2 is a variable", None, None),  # digits glued to letters are not numbers
    ("no numbers here", None, None),
    ("", None, None),
]


@pytest.mark.parametrize("text, answer, rule", EXTRACT_CASES)
def test_find_answer(text, answer, rule):
    assert find_answer(text) == (answer, rule)
    assert extract_answer(text) == answer


# answers_match: (prediction, gold, match?)
MATCH_CASES = [
    ("1,234", "1234", True),
    ("21.0", "21", True),
    ("21.5", "21", False),
    ("-5", "-5.0", True),
    ("-5", "5", False),
    ("\u22127", "-7", True),
    ("\\frac{1}{2}", "0.5", True),
    ("1/2", "0.5", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("50%", "50", True),
    ("50\\%", "50", True),
    ("$1,000.50", "1000.5", True),
    ("\\$5", "5", True),
    ("42 apples", "42", True),
    ("42.", "42", True),
    ("The answer is 42.", "42", True),  # exactly one number in the string
    ("3 or 4", "3", False),  # two numbers: ambiguous, compared as strings
    ("1 000", "1000", False),  # a space is not a thousands separator
    ("1\\,000", "1000", True),  # LaTeX thin space is
    ("1.5e3", "1500", True),
    ("1,000,000", "1e6", True),
    ("2 \\times 10^3", "2000", False),
    ("0.333", "1/3", False),  # exact comparison, no tolerance
    ("\\boxed{7}", "7", True),
    ("\\text{7 cm}", "7", True),
    ("007", "7", True),
    (".5", "0.5", True),
    ("12", "12.000", True),
    ("1/0", "0", False),
    (None, "5", False),
    ("5", None, False),
    ("Yes.", "yes", True),  # non-numeric: normalized string equality
    ("  Paris ", "paris", True),
    ("abc", "abd", False),
]


@pytest.mark.parametrize("pred, gold, expected", MATCH_CASES)
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected
    assert answers_match(gold, pred) is expected  # symmetric


def test_to_number_values():
    from fractions import Fraction

    assert to_number("$1,000.50") == Fraction(2001, 2)
    assert to_number("-\\frac{1}{3}") == Fraction(-1, 3)
    assert to_number("no number") is None


# ---------------------------------------------------------------------------------------------
# load_examples


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_load_gsm8k(tmp_path):
    path = write(tmp_path, [{"id": "q1", "question": "How many?", "answer": "2 + 3 = 5\n#### 5"}])
    (ex,) = load_examples(path)
    assert (ex.id, ex.prompt, ex.response, ex.answer, ex.line, ex.source) == (
        "q1", [{"role": "user", "content": "How many?"}], "2 + 3 = 5\n#### 5", "5", 1, str(path))


def test_load_pair_and_system_and_final_answer(tmp_path):
    path = write(tmp_path, [
        {"prompt": "Hi", "response": "Hello 3", "system": "Be brief."},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}], "response": "so \\boxed{2}", "final_answer": 2},
        {"question": "Q", "answer": "#### 21.0", "final_answer": "21", "id": 7},
    ])
    a, b, c = load_examples(path)
    assert a.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (a.response, a.answer) == ("Hello 3", "3")
    assert [m["content"] for m in b.prompt] == ["a", "b", "c"] and b.answer == "2"
    assert (c.id, c.answer) == ("7", "21")


def test_load_chat(tmp_path):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2", "name": "x"},
                {"role": "assistant", "content": "A2 \\boxed{9}"}]
    (ex,) = load_examples(write(tmp_path, [{"messages": messages}]))
    assert ex.prompt == [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    assert (ex.response, ex.answer) == ("A2 \\boxed{9}", "9")


def test_load_trl_prompt_completion(tmp_path):
    rows = [{"prompt": "What is 6 * 7?", "completion": "6 * 7 = 42\n#### 42", "system": "S"},
            {"prompt": [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
                        {"role": "user", "content": "U2"}],
             "completion": [{"role": "assistant", "content": "\\boxed{9}"}]}]
    a, b = load_examples(write(tmp_path, rows))
    assert a.prompt == [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 6 * 7?"}]
    assert (a.response, a.answer) == ("6 * 7 = 42\n#### 42", "42")
    assert b.prompt == rows[1]["prompt"] and (b.response, b.answer) == ("\\boxed{9}", "9")


def test_encode_example_is_the_templated_conversation(tiny_model_dir, tmp_path):
    """Prompt and response rendered together by the model's template (transformers here), cut
    after the response's end of turn; n_prompt is where the generation prompt's ids end."""
    from transformers import AutoTokenizer

    from data import encode_example
    from tokenizer import Tokenizer

    hf, tok = AutoTokenizer.from_pretrained(tiny_model_dir), Tokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": [{"role": "user", "content": "Natalia sold 48 clips."}],
             "completion": [{"role": "assistant", "content": "She sold 72 <|im_end|> clips.\n#### 72"}]},
            {"question": "How many clips?", "answer": "48 + 24 = 72\n#### 72"}]
    for ex in load_examples(write(tmp_path, rows)):
        ids, n_prompt = encode_example(tok, ex)
        messages = [*ex.prompt, {"role": "assistant", "content": ex.response}]
        assert ids == hf.apply_chat_template(messages, return_dict=False, sanitize_control_tokens=True)[:len(ids)]
        assert ids[:n_prompt] == hf.apply_chat_template(ex.prompt, add_generation_prompt=True, return_dict=False)
        assert ids[-1] == hf.convert_tokens_to_ids("<|im_end|>") and ids.count(ids[-1]) == ids[:n_prompt].count(ids[-1]) + 1


def test_blank_lines_crlf_bom_and_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"question": "a", "answer": "#### 1"}\r\n\r\n   \n'
                     b'{"question": "b", "answer": "#### 2"}\n\n')
    a, b = load_examples(path)
    assert (a.line, b.line, a.answer, b.answer) == (1, 4, "1", "2")


def test_hash_ids_survive_reordering(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)]
    ids = {ex.prompt[0]["content"]: ex.id for ex in load_examples(write(tmp_path, rows, "a.jsonl"))}
    ids_rev = {ex.prompt[0]["content"]: ex.id for ex in load_examples(write(tmp_path, rows[::-1], "b.jsonl"))}
    assert ids == ids_rev and len(set(ids.values())) == 5
    assert all(len(i) == 12 for i in ids.values())


GOOD = '{"question": "q", "answer": "#### 1"}'
BAD_CASES = [  # (lines, bad line number, words the message must contain)
    ([GOOD, '{"question": "q2", "answer": '], 2, ["not valid JSON"]),
    (['[1, 2]'], 1, ["expected a JSON object, got array"]),
    ([GOOD, '{"question": "q2"}'], 2, ["missing field 'answer'"]),
    (['{"question": 12, "answer": "#### 1"}'], 1, ["field 'question'", "expected a string, got number"]),
    (['{"question": "q", "answer": "   "}'], 1, ["field 'answer'", "empty"]),
    (['{"prompt": "p", "response": null}'], 1, ["field 'response'", "got null"]),
    (['{"prompt": "", "response": "r"}'], 1, ["field 'prompt'", "empty"]),
    (['{"text": "x"}'], 1, ["no 'question', 'prompt' or 'messages' field"]),
    (['{"prompt": "p", "response": "r", "completion": "c"}'], 1, ["both 'response' and 'completion'"]),
    (['{"prompt": "p", "completion": 3}'], 1, ["field 'completion'", "expected a string, got number"]),
    (['{"prompt": "p", "completion": [{"role": "assistant", "content": "a"}, {"role": "assistant",'
      ' "content": "b"}]}'], 1, ["field 'completion'", "exactly one assistant message"]),
    (['{"prompt": "p", "completion": [{"role": "user", "content": "a"}]}'], 1,
     ["field 'completion'", "exactly one assistant message"]),
    (['{"prompt": "p", "completion": [{"role": "assistant", "content": "  "}]}'], 1,
     ["field 'completion[0].content'", "empty response"]),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], 1, ["field 'messages'", "no assistant turn"]),
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}'], 1,
     ["field 'messages[1].role'", "'bot'"]),
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"},'
      ' {"role": "user", "content": "more"}]}'], 1, ["field 'messages'", "last message"]),
    (['{"messages": [{"role": "assistant", "content": "x"}]}'], 1, ["field 'messages'", "no prompt"]),
    (['{"messages": []}'], 1, ["field 'messages'", "non-empty list"]),
    (['{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}'], 1,
     ["field 'messages[0].content'"]),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}'], 1,
     ["field 'messages[1].content'", "empty response"]),
    (['{"question": "q", "answer": "#### 1", "final_answer": [1]}'], 1, ["field 'final_answer'"]),
    (['{"question": "q", "answer": "#### 1", "id": 1.5}'], 1, ["field 'id'"]),
    ([GOOD, "", GOOD], 3, ["field 'id'", "already used on line 1"]),
    (["", "  "], None, ["no examples"]),
    ([], None, ["no examples"]),
]


@pytest.mark.parametrize("lines, bad_line, words", BAD_CASES)
def test_bad_input_names_file_line_field(tmp_path, lines, bad_line, words):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(UserError) as e:
        load_examples(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{bad_line}: " if bad_line else f"{path}: "), msg
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_missing_file_and_bad_utf8(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_examples(tmp_path / "nope.jsonl")
    path = tmp_path / "u.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"question": "\xff", "answer": "#### 1"}\n')
    with pytest.raises(UserError, match=r"u\.jsonl:2: not valid UTF-8"):
        load_examples(path)


# ---------------------------------------------------------------------------------------------
# scripts/make_gsm8k.py


@pytest.fixture(scope="module")
def make_gsm8k():
    spec = importlib.util.spec_from_file_location("make_gsm8k", ROOT / "scripts" / "make_gsm8k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = ["--n-train", "120", "--n-test", "40", "--n-heldout", "30", "--heldout-templates", "5", "--seed", "3"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_make_gsm8k_deterministic(tmp_path, make_gsm8k):
    for d in ("a", "b"):
        assert make_gsm8k.main(["--out-dir", str(tmp_path / d)] + SMALL) == 0
    for f in ("train.jsonl", "test.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    # a smaller --n-train gives a prefix of the larger train set
    assert make_gsm8k.main(["--out-dir", str(tmp_path / "c"), "--n-train", "50"] + SMALL[2:]) == 0
    small = (tmp_path / "c" / "train.jsonl").read_text()
    assert (tmp_path / "a" / "train.jsonl").read_text().startswith(small) and small.count("\n") == 50


def test_make_gsm8k_splits(tmp_path, make_gsm8k):
    assert make_gsm8k.main(["--out-dir", str(tmp_path)] + SMALL) == 0
    train, test, heldout = (read_jsonl(tmp_path / f) for f in ("train.jsonl", "test.jsonl", "heldout.jsonl"))
    assert (len(train), len(test), len(heldout)) == (120, 40, 30)
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_need_fix, tasks_ok

    train_t, test_t, held_t = ({r["template"] for r in rows} for rows in (train, test, heldout))
    assert len(train_t) == len(tasks_ok) - 5 and len(held_t) == 5  # 120 > 80 train templates: all used
    assert test_t <= train_t and not (held_t & train_t) and not (set(tasks_need_fix) & (train_t | held_t))

    questions = [r["question"] for r in train + test + heldout]
    assert len(set(questions)) == len(questions)  # no duplicates, in particular none of test in train
    assert len({r["id"] for r in train + test + heldout}) == len(questions)
    for r in train + test + heldout:
        assert r["question"].endswith("Do not include units.")
        last = r["answer"].rstrip().splitlines()[-1]
        assert last.startswith("#### ") and float(last[5:]) == float(r["final_answer"])

    # data.py reads the files back with the generator's answer as gold
    examples = load_examples(tmp_path / "test.jsonl")
    assert [ex.id for ex in examples] == [r["id"] for r in test]
    assert all(answers_match(extract_answer(ex.response), ex.answer) for ex in examples)
    assert [ex.answer for ex in examples] == [r["final_answer"] for r in test]


def test_make_gsm8k_refuses_to_overwrite(tmp_path, make_gsm8k, capsys):
    args = ["--out-dir", str(tmp_path)] + SMALL
    assert make_gsm8k.main(args) == 0
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    assert make_gsm8k.main(args) == 0  # same args: same bytes, nothing to refuse
    assert "unchanged" in capsys.readouterr().out
    assert make_gsm8k.main(args[:-1] + ["4"]) == 2  # another seed
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exist" in err and "--force" in err
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before  # untouched, no temp files left
    assert make_gsm8k.main(args[:-1] + ["4", "--force"]) == 0
    assert (tmp_path / "train.jsonl").read_bytes() != before["train.jsonl"]


def test_make_gsm8k_bad_args(tmp_path, make_gsm8k, capsys):
    assert make_gsm8k.main(["--out-dir", str(tmp_path), "--heldout-templates", "85"]) == 2
    assert "--heldout-templates" in capsys.readouterr().err
    assert make_gsm8k.main(["--out-dir", str(tmp_path), "--n-test", "0"]) == 2
    assert not any(tmp_path.iterdir())


def test_replace_marked_block_keeps_the_hand_written_rest(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- x:begin -->\nold\n<!-- x:end -->\noutro\n")
    replace_marked_block(readme, "x", "new\ntable\n")
    assert readme.read_text() == "intro\n<!-- x:begin -->\nnew\ntable\n<!-- x:end -->\noutro\n"
    replace_marked_block(readme, "x", "")
    assert readme.read_text() == "intro\n<!-- x:begin -->\n\n<!-- x:end -->\noutro\n"
    for broken in ("no markers\n", "<!-- x:end -->\n<!-- x:begin -->\n", "<!-- x:begin -->\n<!-- x:begin -->\n<!-- x:end -->\n"):
        readme.write_text(broken)
        with pytest.raises(UserError, match="expected one '<!-- x:begin -->' line"):
            replace_marked_block(readme, "x", "new")
        assert readme.read_text() == broken


def test_make_gsm8k_chosen_templates_and_validation_split(tmp_path, make_gsm8k, capsys):
    args = ["--out-dir", str(tmp_path), "--templates", "26,43,58", "--heldout-templates", "75,39",
            "--n-train", "30", "--n-validation", "12", "--n-test", "12", "--n-heldout", "10"]
    assert make_gsm8k.main(args) == 0
    splits = {s: read_jsonl(tmp_path / f"{s}.jsonl") for s in ("train", "validation", "test", "heldout")}
    assert {s: len(rows) for s, rows in splits.items()} == {"train": 30, "validation": 12, "test": 12, "heldout": 10}
    for s in ("train", "validation", "test"):
        assert {r["template"] for r in splits[s]} == {26, 43, 58}
    assert {r["template"] for r in splits["heldout"]} == {39, 75}
    questions = [r["question"] for rows in splits.values() for r in rows]
    assert len(set(questions)) == len(questions)  # validation shares no question with train or test
    # without --n-validation the other splits are those of a run that never had one
    assert make_gsm8k.main(args[:8] + args[10:] + ["--out-dir", str(tmp_path / "b")]) == 0
    assert not (tmp_path / "b" / "validation.jsonl").exists()
    assert (tmp_path / "b" / "train.jsonl").read_bytes() == (tmp_path / "train.jsonl").read_bytes()
    capsys.readouterr()
    for bad, flag in ((["--templates", "26,26"], "--templates"), (["--templates", "26,3000"], "--templates"),
                      (["--templates", "26,43", "--heldout-templates", "43,75"], "both trained on and held out")):
        assert make_gsm8k.main(["--out-dir", str(tmp_path / "c")] + bad) == 2
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
