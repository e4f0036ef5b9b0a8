"""Tokenizer: byte-level BPE on tiktoken, and chat rendering by the model's own template.

The paper's quantities are all per token: ℓ_t = log π_θ(y_t | x, y_<t), the entropy H_t,
the centered log-likelihood φ_t = ℓ_t + H_t and the varentropy V_t (docs/math.md).
Which token is "y_t", and what the prompt x looks like (the chat template), is decided
here, so this module must cut text exactly as transformers does for the same model, or φ is
computed for token sequences the model never sees.

BPE
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
- Added tokens.  Non-special ones (Qwen's <think>, <tool_call>) are matched in any text, as HF
  does, so a model's own output re-encodes to the same ids.  Special ones are never matched
  in text given to `encode`: "<|im_end|>" in data is plain text.  Added tokens with
  lstrip/rstrip/single_word are refused (none of the supported families uses them).
- Missing bytes.  Some vocabularies have no token for a few single bytes (SmolLM2 lacks 21,
  e.g. 0x04, 0x06 and the lead bytes 0xF1/0xF2 of rare Unicode planes).  tiktoken would
  panic (a pyo3 PanicException that `except Exception` misses); HF silently drops the byte.
  Our behaviour: every character whose UTF-8 form contains a missing byte is replaced by
  U+FFFD (or dropped if U+FFFD itself cannot be encoded) before BPE.  Vocabularies with all
  256 bytes skip the check; otherwise it is one bytes-regex search per call.
- `decode` skips ids that have no token (e.g. padded embedding rows beyond `vocab_size`).

Chat (`encode_chat`, `encode_conversation`)
- The template comes from chat_template.jinja, else tokenizer_config.json's "chat_template"
  (a bundled GGUF's template is written there by hub.py).  It is rendered with jinja2 the way
  transformers' `apply_chat_template` does it: sandboxed environment, trim_blocks and
  lstrip_blocks, raise_exception, strftime_now, transformers' tojson, the named special tokens
  (bos_token, eos_token, ...) as variables, and tools=None; extra arguments pass through
  (`enable_thinking=False` for Qwen3, `date_string=...` for Llama-3.1/3.2, which otherwise
  print today's date).  The rendered string is split on special tokens and the text between
  them is encoded as one string each, so the ids equal `apply_chat_template(tokenize=True)`.
- The one deliberate difference: text that came from the caller (message strings, template
  arguments) never becomes a special token.  HF would turn "<|im_end|>" typed by a user into
  the real token.  Here every special-token text in those strings is swapped for a single
  private-use character before rendering and swapped back, as plain text, after the split.
  A single character survives what templates do to content (trim, strip, split on </think>,
  lower/upper, tojson) or disappears whole; either way no special token is made from data.
  (A template that glues data to a partial special token, e.g. '<|' + role + '|>', could
  still form one; data.py allows only the roles system/user/assistant.)
- No template at all (e.g. Meta's bare tokenizer.model): a ChatML template if the vocabulary
  has <|im_start|>/<|im_end|>, else Meta's Llama-3 template if it has the Llama-3 header
  tokens, else `encode_chat` raises UserError.
- `eos_id` is the end-of-turn token: the first special token the template writes after an
  assistant message (<|im_end|>, <|eot_id|>), else tokenizer_config's eos_token.  `stop_ids`
  holds every id that ends generation: eos_id, generation_config.json's eos_token_id(s)
  (Llama-3: <|end_of_text|>, <|eom_id|>, <|eot_id|>), the tokenizer's eos_token.
- Training sequences (`encode_conversation(prompt_messages, response)`) are the template's
  rendering of the whole conversation prompt + assistant turn, tokenized as one string, so the
  template's own rules apply to the response (Llama-3 trims it; Qwen3 wraps it in a think
  block, empty unless the response carries one) and the ids at the boundary are HF's.  The
  sequence ends with the end-of-turn token that closes the response (what the model must
  emit to stop; the "\\n" ChatML writes after <|im_end|> is not trained, where TRL 1.16 trains it); a template
  that writes none gets eos_id appended.  n_prompt is the length of the longest common prefix
  of these ids and the generation prompt's ids: len(generation prompt) when they agree, one or
  two less when BPE merges text across the boundary (SmolLM2: "assistant\\n" + "\\n\\n21"), so
  every token the model must produce after the shared prefix is a response token.  The
  generation prompt's text must be a prefix of the whole conversation's text, else UserError.
  A template that rewrites earlier turns (Qwen3 drops the reasoning of assistant turns before
  the last user message) rewrites them the same way in both renderings, so they stay prompt.
"""
import base64
import json
import re
import unicodedata
from datetime import datetime
from pathlib import Path

import jinja2
import tiktoken
from jinja2.sandbox import ImmutableSandboxedEnvironment

from plumbing.cli import UserError
from plumbing.files import read_json

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

# Used only when a tokenizer ships no chat template: ChatML (transformers' former default) or
# Meta's Llama-3 template.
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_TEMPLATE = ("{% for message in messages %}{% if loop.first %}{{ '<|begin_of_text|>' }}{% endif %}"
                   "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
                   "'<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# One private-use character stands in for one special-token text from the caller while rendering.
PLACEHOLDER_BASE = 0xF0000
PLACEHOLDER = re.compile("[\\U000F0000-\\U0010FFFF]")


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
    """tokenizer.json -> (mergeable_ranks, special tokens, other added tokens, pattern, nfc); a file
    that is not one is a one-line UserError."""
    try:
        return _parse_tokenizer_json(read_json(path), path)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{path}: not a tokenizer.json ({type(e).__name__}: {e})") from None


def _parse_tokenizer_json(tj: dict, path: Path):
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"{path}: only byte-level BPE tokenizers are supported, got model {model.get('type')!r}")
    normalizer = (tj.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise UserError(f"{path}: unsupported normalizer {normalizer!r} (supported: none, NFC)")
    pattern = _pattern_from_pre_tokenizer(tj.get("pre_tokenizer"), path)
    for t in tj.get("added_tokens", []):
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise UserError(f"{path}: added token {t['content']!r} uses lstrip/rstrip/single_word (not supported)")
    specials = {t["content"]: t["id"] for t in tj.get("added_tokens", []) if t.get("special", True)}
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", []) if not t.get("special", True)}
    special_ids = set(specials.values()) | set(added.values())
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
    return ranks, specials, added, pattern, normalizer == "NFC"


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
    return ranks, specials, {}, LLAMA3_PATTERN, False


def _token_text(value) -> str | None:
    """tokenizer_config.json stores tokens as strings or as {"content": ...} objects."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _compile_template(source: str, where: str) -> jinja2.Template:
    """A chat template compiled in transformers' environment (its utils/chat_template_utils.py):
    sandboxed, trim_blocks + lstrip_blocks, loop controls, raise_exception, strftime_now, and a
    tojson that keeps non-ASCII text and HTML characters as they are."""
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    if PLACEHOLDER.search(source):
        raise UserError(f"{where}: chat template contains private-use characters U+F0000.. (reserved here)")
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{where}: chat template line {e.lineno}: {e.message}") from None


class Tokenizer:
    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], pattern: str, *,
                 added_tokens: dict[str, int] | None = None, chat_template: str | None = None,
                 token_names: dict[str, str | None] | None = None, stop_ids=(), nfc: bool = False,
                 name: str = "tokenizer"):
        """`token_names`: HF's named tokens ({"eos_token": "<|im_end|>", ...}), which templates see as
        variables; `stop_ids`: generation_config.json's eos_token_id(s)."""
        self.name = name
        self.special_tokens = dict(special_tokens)
        self.added_tokens = dict(added_tokens or {})  # non-special added tokens (Qwen's <think>)
        self._match_in_text = set(self.added_tokens)
        self.vocab_size = len(ranks) + len(self.special_tokens) + len(self.added_tokens)
        self._enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens={**self.special_tokens, **self.added_tokens})
        self._special_text = {i: t for t, i in self.special_tokens.items()}
        self._nfc = nfc
        self._ids_known = set(ranks.values()) | set(self._special_text) | set(self.added_tokens.values())
        self.n_ids = max(self._ids_known) + 1  # ids run below this: the model needs as many embedding rows
        missing = bytes(b for b in range(256) if bytes([b]) not in ranks)
        self._missing = re.compile(b"[" + re.escape(missing) + b"]") if missing else None
        self._fill = "" if self._missing and self._missing.search("\ufffd".encode()) else "\ufffd"

        # Chat template: the model's own, else a fallback picked by the special tokens present.
        self.template_kwargs = {}  # defaults for every render, e.g. {"enable_thinking": False}
        self._token_vars = {k: v for k, v in (token_names or {}).items() if v is not None}
        if chat_template is None:
            has = lambda *names: all(n in self.special_tokens for n in names)
            chat_template = (CHATML_TEMPLATE if has("<|im_start|>", "<|im_end|>") else
                             LLAMA3_TEMPLATE if has("<|begin_of_text|>", "<|start_header_id|>",
                                                    "<|end_header_id|>", "<|eot_id|>") else None)
        self.chat_template = chat_template
        self._template = _compile_template(chat_template, name) if chat_template else None
        specials = "|".join(map(re.escape, sorted(self.special_tokens, key=len, reverse=True)))  # longest first
        self._split_specials = re.compile(f"({specials})") if specials else None
        self._protect = re.compile(f"{specials}|{PLACEHOLDER.pattern}" if specials else PLACEHOLDER.pattern)

        eos_name = self._token_vars.get("eos_token")
        end_of_turn = self._end_of_turn_id()
        if end_of_turn is None and eos_name not in self.special_tokens:
            raise UserError(f"{name}: no end-of-turn token (the chat template writes no special token after "
                            f"an assistant message, and eos_token {eos_name!r} is not a special token)")
        self.eos_id = self.special_tokens[eos_name] if end_of_turn is None else end_of_turn
        self.pad_id = self.special_tokens.get(self._token_vars.get("pad_token"), self.eos_id)
        # every id that ends generation, end of turn first (Llama-3 lists 3, Qwen2.5 2)
        eos_token_id = self.special_tokens.get(eos_name)
        self.stop_ids = tuple(dict.fromkeys(i for i in (self.eos_id, *stop_ids, eos_token_id) if i is not None))

    @classmethod
    def from_pretrained(cls, name_or_path) -> "Tokenizer":
        path = Path(name_or_path)
        if not path.is_dir():
            import hub  # lazy: only names and hub ids need it, a local directory does not
            path = hub.resolve_model_dir(str(name_or_path))
        config = _read_json(path / "tokenizer_config.json")
        model_file = next((p for p in (path / "tokenizer.model", path / "original" / "tokenizer.model")
                           if p.exists()), None)
        if (path / "tokenizer.json").exists():
            ranks, specials, added, pattern, nfc = _read_tokenizer_json(path / "tokenizer.json")
        elif model_file is not None:
            ranks, specials, added, pattern, nfc = _read_tiktoken_model(model_file)
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
        legacy_names = _read_json(path / "special_tokens_map.json")
        token_names = {k: _token_text(config.get(k) or legacy_names.get(k)) for k in TOKEN_NAMES}
        eos = _read_json(path / "generation_config.json").get("eos_token_id")
        return cls(ranks, specials, pattern, added_tokens=added, chat_template=template, token_names=token_names,
                   stop_ids=eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [],
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
        """Text -> ids. Non-special added tokens match as in HF; special-token text stays plain text."""
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        if self._missing is not None:
            text = self._sanitize(text)
        if not self._match_in_text:
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, allowed_special=self._match_in_text, disallowed_special=())

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        try:
            return self._enc.decode(ids)
        except KeyError:  # an id with no token, e.g. a padded embedding row: skip it
            return self._enc.decode([i for i in ids if i in self._ids_known])

    # ---- Chat ----------------------------------------------------------------------------------

    def _render(self, messages: list[dict], add_generation_prompt: bool, template_kwargs: dict) -> list[str | int]:
        """The rendered chat as text pieces and the ids of the specials the template wrote, in order."""
        if self._template is None:
            raise UserError(f"{self.name}: no chat template (tokenizer_config.json or chat_template.jinja), "
                            "and no ChatML or Llama-3 special tokens to fall back on")
        hidden = []  # the caller's special-token texts, in placeholder order

        def placeholder(match):
            hidden.append(match[0])
            return chr(PLACEHOLDER_BASE + len(hidden) - 1)

        def hide(value):  # every string the caller passes in: messages and template arguments
            if isinstance(value, str):
                return self._protect.sub(placeholder, value)
            if isinstance(value, dict):
                return {k: hide(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [hide(v) for v in value]
            return value

        try:
            text = self._template.render(messages=hide(messages), add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None,
                                         **{**self._token_vars, **hide({**self.template_kwargs, **template_kwargs})})
        except jinja2.TemplateError as e:
            raise UserError(f"{self.name}: chat template: {e}") from None
        unhide = lambda piece: PLACEHOLDER.sub(lambda m: hidden[ord(m[0]) - PLACEHOLDER_BASE], piece)
        pieces = self._split_specials.split(text) if self._split_specials else [text]  # text, special, text, ...
        return [self.special_tokens[p] if k % 2 else unhide(p) for k, p in enumerate(pieces) if k % 2 or p]

    def _parts_to_ids(self, parts: list[str | int]) -> list[int]:
        ids = []
        for part in parts:
            ids += [part] if isinstance(part, int) else self.encode(part)
        return ids

    def _parts_to_text(self, parts: list[str | int]) -> str:
        return "".join(self._special_text[p] if isinstance(p, int) else p for p in parts)

    def _end_of_turn_id(self) -> int | None:
        """The first special token the template writes after an assistant message's text."""
        probe = "end-of-turn probe"
        try:
            parts = self._render([{"role": "user", "content": "?"}, {"role": "assistant", "content": probe}], False, {})
        except UserError:
            return None
        at = max((k for k, p in enumerate(parts) if isinstance(p, str) and probe in p), default=len(parts))
        return next((p for p in parts[at + 1:] if isinstance(p, int)), None)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False, **template_kwargs) -> list[int]:
        """Chat messages -> ids, rendered by the model's chat template; message text is never special."""
        return self._parts_to_ids(self._render(messages, add_generation_prompt, template_kwargs))

    def encode_conversation(self, prompt_messages: list[dict], response: str, **template_kwargs) -> tuple[list[int], int]:
        """(x, y) as one training sequence: (ids, n_prompt), see the module docstring.

        ids: the template's rendering of prompt + assistant response, up to and including the
        end-of-turn token that closes the response; n_prompt: where the response's tokens start.
        """
        prompt = self._render(prompt_messages, True, template_kwargs)
        whole = self._render([*prompt_messages, {"role": "assistant", "content": response}], False, template_kwargs)
        if not self._parts_to_text(whole).startswith(self._parts_to_text(prompt)):
            raise UserError(f"{self.name}: the chat template renders the prompt differently once the response "
                            "follows it, so the response's first token is undefined")
        prompt_ids, ids = self._parts_to_ids(prompt), self._parts_to_ids(whole)
        # equal to len(prompt_ids) unless BPE merges text across the boundary (e.g. "\n" + "\n\n")
        n_prompt = next((k for k, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), len(prompt_ids))
        if self.eos_id not in ids[n_prompt:]:  # a template that does not close the turn: the model must still stop
            return ids + [self.eos_id], n_prompt
        return ids[:ids.index(self.eos_id, n_prompt) + 1], n_prompt
