"""Tokenizer: byte-level BPE on tiktoken, plus the two chat formats our models use.

The paper's quantities are all per token: ℓ_t = log π_θ(y_t | x, y_<t), the entropy H_t,
the centered log-likelihood φ_t = ℓ_t + H_t and the varentropy V_t (SPEC sections 2-3).
Which token is "y_t", and what the prompt x looks like (the chat template), is decided
here, so this module must cut text exactly as the model's own tokenizer does, or φ is
computed for token sequences the model never sees.

Design
- Every model we load (SmolLM2, Qwen2/2.5/3, Llama 3.x) uses byte-level BPE.  tiktoken runs
  byte-level BPE fast (about 9x faster than HF `tokenizers` here) but needs two inputs:
  `mergeable_ranks` (token bytes -> rank, lower rank merges first) and a pre-tokenization
  regex.  HF's tokenizer.json stores the vocabulary as GPT-2 "byte-to-printable-unicode"
  strings plus an ordered merge list; we map the strings back to bytes and use the token id
  as the rank.  That is exact only if ids of merge results never decrease along the merge
  list (HF merges by merge index, tiktoken by rank); we check it and refuse otherwise.
  A Llama-3 `tokenizer.model` is already a tiktoken rank file (base64 token, rank per line).
- The pre-tokenization regex comes from tokenizer.json's pre_tokenizer, never from the model
  name: a Split with a regex (Llama-3, Qwen) -> that regex; ByteLevel(use_regex) alone ->
  the GPT-2 regex; Digits(individual_digits) + ByteLevel (SmolLM2) -> the GPT-2 regex with
  every numeric character made its own piece.  Folding the Digits step into one regex needs
  one change besides `\\p{N}`: GPT-2's `\\s+(?!\\S)` must also stop before a digit, because
  after the Digits split a digit ends the piece just as the end of the string would.
  A NFC normalizer (Qwen2) is applied in Python.
- `encode` never produces special-token ids: "<|im_end|>" inside user data is plain text
  (tiktoken's `encode_ordinary`).  Specials appear only where `encode_chat` puts them.
  Every added token of tokenizer.json counts as special here, even the few marked
  non-special (e.g. Qwen's "<tool_call>"), which HF would match inside text.
- Chat formats are recognised, not interpreted (no jinja):
    ChatML (SmolLM2, Qwen):  <|im_start|>role\\ncontent<|im_end|>\\n ... ; a default system
      turn is inserted when the template has one and the messages start without a system turn.
      Qwen3's <think> blocks are not rendered (the generation prompt is still exact).
    Llama-3:  <|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>
      with content stripped like the template's `trim`; Llama-3.1/3.2 templates also get their
      always-present system turn "Cutting Knowledge Date: ...\\nToday Date: ...\\n\\n" with the
      template's fixed fallback date (transformers would insert today's date for 3.2; a fixed
      date keeps training data reproducible).
  Text between two special tokens is encoded as one string, as HF does after it splits the
  rendered template on special tokens.
- Missing bytes.  Some vocabularies have no token for a few single bytes (SmolLM2 lacks 21,
  e.g. 0x04, 0x06 and the lead bytes 0xF1/0xF2 of rare Unicode planes).  tiktoken would
  panic (a pyo3 PanicException that `except Exception` misses); HF silently drops the byte.
  Our behaviour: every character whose UTF-8 form contains a missing byte is replaced by
  U+FFFD (or dropped if U+FFFD itself cannot be encoded) before BPE.  Vocabularies with all
  256 bytes skip the check; otherwise it is one bytes-regex search per call.
- `decode` skips ids that have no token (e.g. padded embedding rows beyond `vocab_size`).
"""
import base64
import json
import re
import unicodedata
from pathlib import Path

import tiktoken

from data import UserError

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Digits(individual_digits=True) then GPT-2 ByteLevel split, as one regex (see docstring).
DIGITS_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta's Llama-3.1 tokenizer.model ships without names for its 256 special ids (rank n..n+255).
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                   "<|python_tag|>"] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]


def gpt2_unicode_to_byte() -> dict[str, int]:
    """GPT-2's table: printable bytes map to themselves, the other 68 to chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + k): b for k, b in enumerate(others)})
    return table


def _pattern_from_pre_tokenizer(pre: dict | None, where: Path) -> str:
    pre = pre or {}
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        raise UserError(f"{where}: ByteLevel(add_prefix_space=true) is not supported")
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) \
            and "Regex" in steps[0]["pattern"] and steps[0].get("behavior") == "Isolated" \
            and not steps[0].get("invert"):
        return steps[0]["pattern"]["Regex"]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return DIGITS_GPT2_PATTERN
    raise UserError(f"{where}: unsupported pre_tokenizer {kinds}; supported: Split(regex)+ByteLevel "
                     "(Llama-3, Qwen), ByteLevel (GPT-2), Digits(individual)+ByteLevel (SmolLM2)")


def _read_tokenizer_json(path: Path):
    """tokenizer.json -> (mergeable_ranks, special_tokens, pattern, nfc)."""
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"{path}: only byte-level BPE tokenizers are supported, got model {model.get('type')!r}")
    normalizer = (tj.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise UserError(f"{path}: unsupported normalizer {normalizer!r} (supported: none, NFC)")
    pattern = _pattern_from_pre_tokenizer(tj.get("pre_tokenizer"), path)
    specials = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    special_ids = set(specials.values())
    u2b = gpt2_unicode_to_byte()
    try:
        ranks = {bytes(u2b[c] for c in s): i for s, i in model["vocab"].items() if i not in special_ids}
    except KeyError as e:
        raise UserError(f"{path}: vocabulary is not GPT-2 byte-level (character {e})") from None
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF merges the
    # pair listed first.  Ids as ranks agree with HF when merge results' ids never go down.
    last = -1
    for k, merge in enumerate(model["merges"]):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        rank = ranks.get(bytes(u2b[c] for c in a + b))
        if rank is None or rank < last:
            raise UserError(f"{path}: merge {k} ({a!r}, {b!r}) gives token id {rank} after id {last}: "
                             "token ids are not BPE merge ranks, cannot build a tiktoken encoding")
        last = rank
    return ranks, specials, pattern, normalizer == "NFC"


def _read_tiktoken_model(path: Path):
    """Llama-3 tokenizer.model (one 'base64-token rank' per line) -> same tuple as above."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise UserError(f"{path}: not a tiktoken rank file "
                                 "(SentencePiece models are not supported)") from None
    first = max(ranks.values()) + 1
    specials = {name: first + k for k, name in enumerate(LLAMA3_SPECIALS)}
    return ranks, specials, LLAMA3_PATTERN, False


def _unescape(jinja_literal: str) -> str:
    """Undo backslash escapes of a jinja string literal (templates write '\\n' or a raw newline)."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), jinja_literal, flags=re.S)


def _token_text(value) -> str | None:
    """tokenizer_config.json stores tokens as strings or as {"content": ...} objects."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str,
                 chat_template: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, nfc: bool = False, name: str = "tokenizer"):
        self.name = name
        self.special_tokens = dict(special_tokens)
        self.vocab_size = len(ranks) + len(special_tokens)
        self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self._nfc = nfc
        self._ids = set(ranks.values()) | set(special_tokens.values())
        missing = bytes(b for b in range(256) if bytes([b]) not in ranks)
        self._missing = re.compile(b"[" + re.escape(missing) + b"]") if missing else None
        self._fill = "" if self._missing and self._missing.search("\ufffd".encode()) else "\ufffd"

        # Chat format: from the template if there is one, else from the special tokens present.
        has = lambda *names: all(n in special_tokens for n in names)
        if chat_template is not None:
            self.chat_format = ("chatml" if "<|im_start|>" in chat_template else
                                "llama3" if "<|start_header_id|>" in chat_template else None)
        else:
            self.chat_format = ("chatml" if has("<|im_start|>", "<|im_end|>") else
                                "llama3" if has("<|start_header_id|>", "<|eot_id|>") else None)
        if self.chat_format == "chatml" and not has("<|im_start|>", "<|im_end|>") or \
                self.chat_format == "llama3" and not has("<|begin_of_text|>", "<|start_header_id|>",
                                                        "<|end_header_id|>", "<|eot_id|>"):
            raise UserError(f"{name}: chat template is {self.chat_format} but its special tokens are missing")
        end_of_turn = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(self.chat_format, eos_token)
        if end_of_turn not in special_tokens:
            raise UserError(f"{name}: no end-of-turn token (eos_token {eos_token!r} is not a special token)")
        self.eos_id = special_tokens[end_of_turn]
        self.pad_id = special_tokens.get(pad_token, self.eos_id)

        self.default_system = None  # ChatML: system turn the template inserts when none is given
        self.llama3_preamble = None  # Llama-3.1+: text that opens the always-present system turn
        if self.chat_format == "chatml" and chat_template:
            # a string literal that opens a system turn and closes it with no expression inside
            m = re.search(r"(['\"])<\|im_start\|>system(?:\\n|\n)((?:(?!\1)[^\\]|\\.)*?)<\|im_end\|>", chat_template)
            self.default_system = _unescape(m[2]) if m else None
        if self.chat_format == "llama3" and chat_template and "Cutting Knowledge Date:" in chat_template:
            cutoff = re.search(r"Cutting Knowledge Date: ([^\\\n\"']*)", chat_template)[1]
            date = re.search(r"date_string = [\"']([^\"']+)[\"']", chat_template)
            date = date[1] if date else "26 Jul 2024"
            self.llama3_preamble = f"Cutting Knowledge Date: {cutoff}\nToday Date: {date}\n\n"

    @classmethod
    def from_pretrained(cls, name_or_path) -> "Tokenizer":
        path = Path(name_or_path)
        if not path.is_dir():
            import hub  # lazy: only names and hub ids need it, a local directory does not
            path = hub.resolve_model_dir(str(name_or_path))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        model_file = next((p for p in (path / "tokenizer.model", path / "original" / "tokenizer.model")
                           if p.exists()), None)
        if (path / "tokenizer.json").exists():
            ranks, specials, pattern, nfc = _read_tokenizer_json(path / "tokenizer.json")
        elif model_file is not None:
            ranks, specials, pattern, nfc = _read_tiktoken_model(model_file)
            names = {i: name for name, i in specials.items()}  # config names replace defaults, id by id
            names.update({int(i): t["content"] for i, t in config.get("added_tokens_decoder", {}).items()})
            specials = {name: i for i, name in names.items()}
        else:
            raise UserError(f"{path}: no tokenizer.json or tokenizer.model")
        template = config.get("chat_template")
        if isinstance(template, list):  # older multi-template format: [{"name", "template"}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if (path / "chat_template.jinja").exists():  # newer transformers save the template apart
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(ranks, specials, pattern, chat_template=template,
                   eos_token=_token_text(config.get("eos_token")), pad_token=_token_text(config.get("pad_token")),
                   nfc=nfc, name=path.name)

    def _sanitize(self, text: str) -> str:
        """Replace characters that contain a byte with no token (see module docstring)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: tiktoken would turn them into U+FFFD too
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            data = text.encode("utf-8")
        if not self._missing.search(data):
            return text
        return "".join(self._fill if self._missing.search(c.encode("utf-8")) else c for c in text)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; special-token text is encoded as ordinary text."""
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        if self._missing is not None:
            text = self._sanitize(text)
        return self._enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        try:
            return self._enc.decode(ids)
        except KeyError:  # an id with no token, e.g. a padded embedding row: skip it
            return self._enc.decode([i for i in ids if i in self._ids])

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> list[int | str]:
        """The chat as a list of special-token ids and plain-text pieces."""
        sp = self.special_tokens
        parts = []
        if self.chat_format == "chatml":
            if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
                messages = [{"role": "system", "content": self.default_system}, *messages]
            for m in messages:
                parts += [sp["<|im_start|>"], f"{m['role']}\n{m['content']}", sp["<|im_end|>"], "\n"]
            if add_generation_prompt:
                parts += [sp["<|im_start|>"], "assistant\n"]
        elif self.chat_format == "llama3":
            header = lambda role: [sp["<|start_header_id|>"], role, sp["<|end_header_id|>"], "\n\n"]
            turns = [(m["role"], m["content"].strip()) for m in messages]  # the template's `| trim`
            if self.llama3_preamble is not None:
                system = turns.pop(0)[1] if turns and turns[0][0] == "system" else ""
                turns.insert(0, ("system", self.llama3_preamble + system))
            parts.append(sp["<|begin_of_text|>"])
            for role, content in turns:
                parts += [*header(role), content, sp["<|eot_id|>"]]
            if add_generation_prompt:
                parts += header("assistant")
        else:
            raise UserError(f"{self.name}: chat template not recognised; supported formats are ChatML "
                             "(<|im_start|>role ... <|im_end|>) and Llama-3 (<|start_header_id|> ... <|eot_id|>)")
        return parts

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Chat messages -> ids in the model's chat format; message content is plain text."""
        ids, text = [], ""
        for part in self._render(messages, add_generation_prompt):
            if isinstance(part, str):
                text += part  # text between two specials is tokenized as one string, as HF does
            else:
                ids += self.encode(text) + [part]
                text = ""
        return ids + self.encode(text)
