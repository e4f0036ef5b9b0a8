"""Training data: JSONL loading and final-answer checking.

In the paper's notation a training example is a pair (x, y): a prompt x and a reference
response y = (y_1..y_T). Everything that scores or trains on y (φ_t, H_t, V_t in ddt.py, the
IDFT weights in idft.py) gets its pairs from `load_examples`. The verifier of the pipeline
(SPEC §4: keep the model's own answers that verify, send only the failures through hinted
decoding, keep hinted outputs whose final answer verifies) is `extract_answer` +
`answers_match`, shared by hinted_decode.py and eval.py so both judge answers the same way.
The data-parallel helpers of those tools (`shard`, `gather_in_order`, `example_seed`) live here
too, next to the examples they split.

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

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

ROLES = ("system", "user", "assistant")


class UserError(Exception):
    """A mistake in the user's input or arguments; CLIs print 'error: <msg>' and exit 2."""


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
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got {_json_type(obj)}")
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


def check_input(path, flag: str | None = None) -> Path:
    """An input file that exists and is a file; the error names the flag when one is given."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    if path.is_dir():
        raise UserError(f"{where}: is a directory; expected a JSONL file")
    if not path.is_file():
        raise UserError(f"{where}: file not found")
    return path


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
# Data parallel over examples: hinted_decode.py, eval.py and ddt.py under torchrun
#
#   torchrun --nproc_per_node 8 hinted_decode.py ...            one node, 8 GPUs
#   torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 ...
#
# The split is fixed, never a matter of timing: the examples are cut into batches of
# --batch-size in input order, and rank r of W takes batches r, r + W, r + 2W, ... (`shard`).
# Each rank works on its own device (cuda:LOCAL_RANK, or the CPU); the results come back in
# input order (`gather_in_order`). Only rank 0 talks: the other ranks' stdout and stderr go to
# /dev/null, except tracebacks.


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


# Ranks wait for each other only at the end of the work, which on uneven shares can take long:
# far longer than torch's default 30 minutes, and a crashed rank is caught by torchrun anyway.
RANK_TIMEOUT_HOURS = 24


def start_ranks() -> Ranks:
    """This process's place in the torchrun job (RANK, WORLD_SIZE set), or Ranks(0, 1) without
    torchrun. The ranks only exchange Python objects, once, at the end (gloo, also beside GPUs)."""
    if "RANK" not in os.environ:
        return Ranks()
    import atexit
    import traceback
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(hours=RANK_TIMEOUT_HOURS))
    atexit.register(dist.destroy_process_group)
    ranks = Ranks(dist.get_rank(), dist.get_world_size())
    if not ranks.main:  # one voice: rank 0's progress bar, summary and files
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=sys.__stderr__)
    return ranks


def print_error(error: Exception) -> int:
    """`error: ...` for a user's mistake, and the exit code 2. Under torchrun, ranks other than 0
    have a silenced stderr (start_ranks), yet a bad example may show on theirs only: they write
    to the real stderr, naming themselves."""
    rank = int(os.environ.get("RANK", 0))
    stream, prefix = (sys.stderr, "") if rank == 0 else (sys.__stderr__, f"[rank {rank}] ")
    print(f"{prefix}error: {error}", file=stream)
    return 2


def rank_device(device: str) -> str:
    """`device` for this rank: a bare "cuda" under torchrun becomes this node's cuda:LOCAL_RANK."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        import torch

        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)  # compiled decoding captures its CUDA graphs on this device
    return device


def shard(items: list, ranks: Ranks, batch_size: int = 1) -> list:
    """This rank's share: cut `items` into batches of `batch_size` in order, and take batches
    rank, rank + world, rank + 2·world, ... So an item meets the same batch neighbours as in a
    one-process run: padding widths and float rounding match too, not only the tokens."""
    starts = range(ranks.rank * batch_size, len(items), ranks.world * batch_size)
    return [item for start in starts for item in items[start:start + batch_size]]


def every_rank(value, ranks: Ranks) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank (any picklable value)."""
    if ranks.world == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def gather_in_order(part: list, ranks: Ranks, batch_size: int = 1) -> list:
    """Every rank's results for its `shard` (same batch_size), back in input order, on every rank."""
    batches = [[p[i:i + batch_size] for i in range(0, len(p), batch_size)] for p in every_rank(part, ranks)]
    return [item for k in range(len(batches[0])) for rank_batches in batches if k < len(rank_batches)
            for item in rank_batches[k]]


def print_shares(n_mine: int, ranks: Ranks) -> int:
    """Say how many examples each process did (rank 0 prints, with several processes); their
    total. Every rank must call it: it waits for all of them."""
    counts = every_rank(n_mine, ranks)
    if ranks.world > 1:
        print(f"data parallel: {ranks.world} processes did {' + '.join(map(str, counts))} examples", file=sys.stderr)
    return sum(counts)


def example_seed(seed: int, example_id: str, stage: str = "") -> int:
    """The sampling seed of one example (and stage of the pipeline), from the run's --seed and the
    example's id alone: the same on any rank, in any batch, after any resume."""
    digest = hashlib.sha256(f"{seed}/{stage}/{example_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: torch.Generator.manual_seed takes them


# ---------------------------------------------------------------------------------------------
# Output


def encode_example(tokenizer, example: Example, **template_kwargs) -> tuple[list[int], int]:
    """Token ids of (x, y) as the model sees them, and the number of prompt tokens.

    The model's chat template renders the whole conversation (prompt, then the response as the
    assistant's turn) up to the end-of-turn token the model must learn to emit; the response's
    text is never special tokens (Tokenizer.encode_conversation). Training, DDT scoring and
    hinted decoding all use this, so φ is computed on exactly the tokens that are trained on.
    """
    return tokenizer.encode_conversation(example.prompt, example.response, **template_kwargs)


def atomic_write(path, content) -> None:
    """Write `content` to `path` through a temp file in the same directory and os.replace, so
    readers see the old file or the new one, never half of one. `content` is text, or a
    function that writes the file at the temporary path it is given (safetensors, PNG, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same dir: os.replace stays atomic
    try:
        if callable(content):
            content(str(tmp))
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_marked_block(path, name: str, text: str) -> None:
    """Rewrite the generated part of a hand-written file (README.md): everything between the
    lines `<!-- name:begin -->` and `<!-- name:end -->` becomes `text`; the rest is kept."""
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text(encoding="utf-8")
    if old.count(begin) != 1 or old.count(end) != 1 or old.index(begin) > old.index(end):
        raise UserError(f"{path}: expected one '{begin}' line followed by one '{end}' line")
    head, rest = old.split(begin, 1)
    atomic_write(path, head + begin + "\n" + text.strip("\n") + "\n" + end + rest.split(end, 1)[1])


# ---------------------------------------------------------------------------------------------
# Append-only JSONL logs (hinted_decode.py's records, train.py's metrics): written one line at a
# time, so a crash can leave at most one torn last line, which a resume drops and redoes.


def read_log(path, writer: str) -> tuple[list[dict], int]:
    """The complete records of an append-only JSONL file, each with its 1-based line number under
    "_line", and the byte length up to the end of the last complete line.

    A last line without its newline is what a crash in the middle of a write leaves: it is not a
    record (`drop_torn_tail` cuts it off before appending). Any other line that is not a JSON
    object is an error naming the file and line; `writer` names the program that writes the file.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    records = []
    for lineno, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{lineno}: not a JSON record (was this file written by {writer}?)")
        records.append({**record, "_line": lineno})
    return records, end


def drop_torn_tail(path, end: int) -> None:
    """Cut a torn last line (bytes past `end`, from read_log) off before appending, saying so."""
    path = Path(path)
    if path.exists() and path.stat().st_size > end:
        print(f"{path}: dropping an incomplete last line ({path.stat().st_size - end} bytes) "
              "left by an interrupted run", file=sys.stderr)
        os.truncate(path, end)


def append_record(f, record: dict) -> None:
    """One record per line, flushed at once: an interruption loses at most the line being written."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


# ---------------------------------------------------------------------------------------------
# Command lines: flags checked as they are parsed, outputs checked and locked before any work


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors, so a CLI prints them like every other mistake, on
    one line: 'error: argument --lr: expected a finite number > 0, got -1 (see --help)', exit 2."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def _number(text: str, cast, ok, expected: str):
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):  # nan and inf are refused everywhere
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


# argparse `type=` functions: the value is checked in parse_args and the message names the flag.
def positive_int(text):
    return _number(text, int, lambda x: x > 0, "an integer > 0")


def nonnegative_int(text):
    return _number(text, int, lambda x: x >= 0, "an integer >= 0")


def positive_float(text):
    return _number(text, float, lambda x: x > 0, "a finite number > 0")


def nonnegative_float(text):
    return _number(text, float, lambda x: x >= 0, "a finite number >= 0")


def fraction(text):
    return _number(text, float, lambda x: 0 <= x <= 1, "a number in [0, 1]")


def probability(text):
    return _number(text, float, lambda x: 0 < x <= 1, "a number in (0, 1]")


def check_output(path, flag: str, kind: str = "file") -> Path:
    """Refuse an output path that cannot be written as `kind` ("file" or "dir"): checked before
    any model is loaded, so a wrong --out fails in a second, not after the compute."""
    path = Path(path)
    if path.exists():
        if kind == "file" and path.is_dir():
            raise UserError(f"{flag} {path}: is a directory; expected a file")
        if kind == "dir" and not path.is_dir():
            raise UserError(f"{flag} {path}: is a file; expected a directory")
    parent = path if kind == "dir" and path.exists() else path.parent
    while not parent.exists():  # the first existing ancestor must be a writable directory
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {parent} is not writable")
    return path


class OutputLock:
    """One writer per output: an advisory lock (fcntl.flock) on the hidden file .NAME.lock next to
    `path`, held while the `with` block runs; a second run on the same output stops at once. The
    OS releases the lock when the process ends, however it ends, so a crash leaves no stale lock
    (at most a lock file that the next run takes over). The file is removed on exit; a run that
    locked a file which was removed meanwhile sees it is no longer the one at that path."""

    def __init__(self, path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self.file = None

    def __enter__(self):
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not self.lock_path.exists() or self.lock_path.stat().st_ino != os.fstat(f.fileno()).st_ino:
                raise BlockingIOError  # the holder removed it as we opened it; a new one may be held
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise UserError(f"{self.path} is in use by another run (pid {holder}); wait for it to finish "
                            "or choose another output") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self.file = f
        return self

    def __exit__(self, *exc):
        self.lock_path.unlink(missing_ok=True)  # while still held, so no one holds a removed file
        self.file.close()  # closing the file releases the lock


def lock_output(path):
    """OutputLock(path), taken by the process of rank 0 only under torchrun: the ranks of one run
    are one writer (the others write nothing there, or only through rank 0's run)."""
    return OutputLock(path) if int(os.environ.get("RANK", 0)) == 0 else contextlib.nullcontext()


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'--flag: was A, now B' for every setting of `current` that differs from `saved`."""
    return [f"--{key.replace('_', '-')}: was {saved.get(key)!r}, now {value!r}"
            for key, value in current.items() if saved.get(key) != value]
