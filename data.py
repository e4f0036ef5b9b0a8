"""Training data: JSONL loading and final-answer checking.

In the paper's notation a training example is a pair (x, y): a prompt x and a reference
response y = (y_1..y_T). Everything that scores or trains on y (φ_t, H_t, V_t in ddt.py, the
IDFT weights in idft.py) gets its pairs from `load_examples`. The verifier of the pipeline
(docs/math.md, "Hinted decoding": keep the model's own answers that verify, send only the
failures through hinted decoding, keep hinted outputs whose final answer verifies) is
`extract_answer` + `answers_match`, shared by hinted_decode.py and eval.py so both judge
answers the same way.

Input formats, one JSON object per line (blank lines are skipped):
  GSM8K   {"question": str, "answer": str}        answer = step-by-step solution ending "#### N"
  pair    {"prompt": str | [messages], "response": str}
  TRL     {"prompt": str | [messages], "completion": str | [one assistant message]}
  chat    {"messages": [{"role", "content"}, ...]} the last message is the assistant's response
A string prompt becomes one user turn and every example is rendered with the model's chat
template (tokenizer.py), also TRL's plain-string prompt/completion, which TRL itself would
concatenate without a template. A completion list must hold exactly one assistant message
(several would be several trained turns; refused). Only the final assistant turn is trained:
earlier assistant turns in "messages" or in a prompt list are context, like the user's turns.
Optional in every format: "id" (str or int; default: a hash of prompt + response, so it
survives reordering), "system" (str, for GSM8K, pair and TRL: prepended as a system message)
and "final_answer" (str or number: the gold answer, when it is not in the response itself).

Answer extraction, first rule that fires wins:
  "####"         text after the last '####' (GSM8K), to the end of that line
  "boxed"        content of the last complete \\boxed{...} (nested braces allowed)
  "last_number"  the last number in the text
Two answers match when both hold exactly one number and the numbers are equal as exact
fractions ("1,234" = "1234.0", "$1,000.50" = "1000.5", "50%" = "50", "\\frac{1}{2}" = "0.5"
= "1/2", "42 apples" = "42"); otherwise when their normalized strings are equal.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from fractions import Fraction

from plumbing.cli import UserError
from plumbing.files import check_input, json_problem

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    id: str
    prompt: list[dict]  # chat messages before the response, e.g. [{"role": "user", "content": q}]
    response: str
    answer: str | None  # gold final answer, or None if none can be found
    line: int  # 1-based line in the source file
    source: str  # file path


# ---------------------------------------------------------------------------------------------
# Loading


def load_examples(path) -> list[Example]:
    """Read and validate a whole JSONL file; raise UserError naming file:line: field on any bad line."""
    path = check_input(path)
    examples, first_line_of_id = [], {}
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # tolerate a UTF-8 byte-order mark
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
            found = SURROGATE_ESCAPE.search(text) and _lone_surrogate(obj)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # an integer beyond 4300 digits, nesting beyond the stack
            raise UserError(f"{where}: not valid JSON ({json_problem(e)})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got {_json_type(obj)}")
        if found:
            raise UserError(f"{where}: field '{found[0]}': a lone surrogate ({ascii(found[1])[1:-1]}) is not text "
                            "(a character beyond U+FFFF needs both halves of its pair)")
        ex = _parse_example(obj, where, lineno, str(path))
        if ex.id in first_line_of_id:
            raise UserError(
                f"{where}: field 'id': {ex.id!r} already used on line {first_line_of_id[ex.id]}"
                " (duplicate example? give each line a distinct 'id')"
            )
        first_line_of_id[ex.id] = lineno
        examples.append(ex)
    if not examples:
        raise UserError(f"{path}: no examples (file is empty)")
    return examples


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a UTF-16 surrogate gets into a JSON line
SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value, field: str = "") -> tuple[str, str] | None:
    """(field, character) of the first string of a parsed JSON value (key or value) that holds a
    lone UTF-16 surrogate. json.loads accepts "\\ud800" alone, but no UTF-8 file can hold it, so
    every output made from that example would fail when it is written: refused at load instead."""
    if isinstance(value, str):
        match = SURROGATE.search(value)
        return (field, match[0]) if match else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        name = f"{field}[{key}]" if isinstance(key, int) else key.encode("utf-8", "backslashreplace").decode()
        name = f"{field}.{name}" if field and isinstance(key, str) else name
        found = (isinstance(key, str) and _lone_surrogate(key, name)) or _lone_surrogate(item, name)
        if found:
            return found
    return None


def _parse_example(obj: dict, where: str, lineno: int, source: str) -> Example:
    if "messages" in obj:
        messages = _messages(obj, "messages", where)
        if messages[-1]["role"] != "assistant":
            if not any(m["role"] == "assistant" for m in messages):
                raise UserError(f"{where}: field 'messages': no assistant turn")
            raise UserError(f"{where}: field 'messages': the last message must be the assistant's response")
        prompt, response = messages[:-1], messages[-1]["content"]
        if not prompt:
            raise UserError(f"{where}: field 'messages': no prompt before the assistant turn")
        response_field = f"messages[{len(messages) - 1}].content"
    elif "prompt" in obj:
        if isinstance(obj["prompt"], list):
            prompt = _messages(obj, "prompt", where)
        else:
            prompt = [{"role": "user", "content": _text(obj, "prompt", where)}]
        response, response_field = _response(obj, where)
    elif "question" in obj:
        prompt = [{"role": "user", "content": _text(obj, "question", where)}]
        response, response_field = _text(obj, "answer", where), "answer"
    else:
        raise UserError(f"{where}: no 'question', 'prompt' or 'messages' field (keys: {sorted(obj)})")
    if not response.strip():
        raise UserError(f"{where}: field '{response_field}': empty response")
    if "system" in obj and "messages" not in obj:
        prompt = [{"role": "system", "content": _text(obj, "system", where)}] + prompt

    if "final_answer" in obj:
        gold = obj["final_answer"]
        if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
            raise UserError(f"{where}: field 'final_answer': expected a string or number, got {_json_type(gold)}")
        answer = str(gold).strip() or None
    else:
        answer = extract_answer(response)

    if "id" in obj:
        if isinstance(obj["id"], bool) or not isinstance(obj["id"], (str, int)) or str(obj["id"]) == "":
            raise UserError(f"{where}: field 'id': expected a non-empty string or integer")
        ex_id = str(obj["id"])
    else:
        content = json.dumps([prompt, response], ensure_ascii=False, sort_keys=True)
        ex_id = hashlib.sha256(content.encode("utf-8")).hexdigest()[:12]
    return Example(id=ex_id, prompt=prompt, response=response, answer=answer, line=lineno, source=source)


def _response(obj: dict, where: str) -> tuple[str, str]:
    """The response of a pair or TRL prompt/completion example, and its field name for errors."""
    if "response" in obj and "completion" in obj:
        raise UserError(f"{where}: both 'response' and 'completion' given (use one)")
    if not isinstance(obj.get("completion"), list):
        field = "completion" if "completion" in obj else "response"
        return _text(obj, field, where), field
    completion = _messages(obj, "completion", where)
    if len(completion) != 1 or completion[0]["role"] != "assistant":
        raise UserError(f"{where}: field 'completion': expected exactly one assistant message, got roles "
                        f"{[m['role'] for m in completion]}")
    return completion[0]["content"], "completion[0].content"


def _text(obj: dict, field: str, where: str) -> str:
    if field not in obj:
        raise UserError(f"{where}: missing field '{field}'")
    value = obj[field]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field}': expected a string, got {_json_type(value)}")
    if not value.strip():
        raise UserError(f"{where}: field '{field}': empty")
    return value


def _messages(obj: dict, field: str, where: str) -> list[dict]:
    value = obj[field]
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field '{field}': expected a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise UserError(f"{where}: field '{name}': expected an object, got {_json_type(m)}")
        if m.get("role") not in ROLES:
            raise UserError(f"{where}: field '{name}.role': expected one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise UserError(f"{where}: field '{name}.content': expected a string, got {_json_type(m.get('content'))}")
        messages.append({"role": m["role"], "content": m["content"]})  # drop extra keys (name, ...)
    return messages


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Answers

# A number as written in text: optional minus, digits with optional 1,234 grouping, decimals,
# exponent or a plain a/b fraction. Not preceded by a letter, digit or '.', so "v2", "5-3" and
# the ".3" in "1.2.3" do not start a number.
NUMBER = re.compile(
    r"(?<![\w.])-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+|(?=\.[0-9]))(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?(?:/[0-9]+)?"
)
LATEX_WRAPPER = re.compile(r"\\(?:boxed|text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[0-9.,]+)\s*\}\s*\{\s*(-?[0-9.,]+)\s*\}")


def find_answer(text: str) -> tuple[str | None, str | None]:
    """(final answer, rule that found it: '####', 'boxed', 'last_number'), or (None, None)."""
    if "####" in text:
        after = text.rsplit("####", 1)[1].split("\n", 1)[0].strip()
        if after:
            return after, "####"
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    numbers = NUMBER.findall(text.replace("\u2212", "-"))  # U+2212 is the typographic minus
    if numbers:
        return numbers[-1], "last_number"
    return None, None


def extract_answer(text: str) -> str | None:
    return find_answer(text)[0]


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} whose braces close (a truncated one is skipped)."""
    open_at = text.rfind("\\boxed{")
    while open_at != -1:
        body, depth = open_at + len("\\boxed{"), 1
        for i in range(body, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                if text[body:i].strip():
                    return text[body:i].strip()
                break
        open_at = text.rfind("\\boxed{", 0, open_at)
    return None


def to_number(s: str) -> Fraction | None:
    """The value of a string holding exactly one number (units, '$', '%' and words allowed)."""
    s = s.replace("\u2212", "-").replace("\\$", "").replace("$", "").replace("\\%", "%")
    s = s.replace("\\,", "").replace("\\!", "").replace("\\ ", " ")
    s = _unwrap_latex(s)
    s = LATEX_FRAC.sub(r"\1/\2", s)
    numbers = NUMBER.findall(s)
    if len(numbers) != 1:  # none, or ambiguous like "3 or 4", "1 000", "2 \times 10^3"
        return None
    num, _, den = numbers[0].replace(",", "").partition("/")
    if den and Fraction(den) == 0:
        return None
    return Fraction(num) / (Fraction(den) if den else 1)


def answers_match(pred: str | None, gold: str | None) -> bool:
    if pred is None or gold is None:
        return False
    p, g = to_number(pred), to_number(gold)
    if p is not None and g is not None:
        return p == g
    return _normalize(pred) == _normalize(gold)


def _unwrap_latex(s: str) -> str:
    while True:  # innermost first, so \boxed{\text{5}} unwraps fully
        s, n = LATEX_WRAPPER.subn(r"\1", s)
        if n == 0:
            return s


def _normalize(s: str) -> str:
    s = _unwrap_latex(s).replace("$", "")
    return " ".join(s.split()).strip().rstrip(".").lower()


# ---------------------------------------------------------------------------------------------
# Tokens


def encode_example(tokenizer, example: Example, **template_kwargs) -> tuple[list[int], int]:
    """Token ids of (x, y) as the model sees them, and the number of prompt tokens.

    The model's chat template renders the whole conversation (prompt, then the response as the
    assistant's turn) up to the end-of-turn token the model must learn to emit; the response's
    text is never special tokens (Tokenizer.encode_conversation). Training, DDT scoring and
    hinted decoding all use this, so φ is computed on exactly the tokens that are trained on.
    """
    return tokenizer.encode_conversation(example.prompt, example.response, **template_kwargs)

