"""tokenizer.py against independent references: HF `tokenizers` pipelines for encode/decode,
transformers' jinja rendering (`apply_chat_template`) for encode_chat."""
import base64
import json
import random

import pytest
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models as hf_models

from plumbing.cli import UserError
from tokenizer import LLAMA3_PATTERN, Tokenizer, gpt2_unicode_to_byte

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

WORDS = ["the", "The", "apples", "isn't", "we'll", "I'M", "HE'S", "they've", "Natalia", "clips",
         "café", "naïve", "straße", "東京", "数学题", "😀", "👍🏽", "🇫🇷", "Привет", "مرحبا",
         "٣٤", "²", "Ⅻ", "e\u0301", "\u2126", "<|im_end|>", "<|eot_id|>", "####", "$", "%", "...",
         "--", "=", "+", "*", "/", "(", ")", "\\boxed{", "}", "<<", ">>", "'", "'s", "\"", "?!",
         "x_1", "v2.0", "ab12cd"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\n  ", "\u00a0", "\u3000", "\u2028", "\x85", "\x0b"]


def random_texts(n: int, seed: int) -> list[str]:
    """Numbers, whitespace runs, newlines, unicode and GSM-style math text."""
    rng = random.Random(seed)

    def number():
        k = rng.randint(1, 12)
        return rng.choice([str(rng.randrange(10 ** k)), f"{rng.random() * 10 ** k:.{rng.randint(0, 3)}f}",
                           f"{rng.randrange(10 ** k):,}", f"-{rng.randrange(1000)}"])

    def piece():
        r = rng.random()
        return number() if r < 0.3 else rng.choice(SPACES) if r < 0.5 else rng.choice(WORDS)

    def gsm():
        a, b = rng.randint(1, 999), rng.randint(1, 99)
        return (f"{rng.choice(['Natalia', 'Ali', 'Mei'])} has {a} apples and buys {b} more at "
                f"${b / 7:.2f} each.\nHow many apples?\n{a} + {b} = {a + b}\n#### {a + b}")

    texts = []
    for _ in range(n):
        if rng.random() < 0.2:
            texts.append(gsm())
        else:
            seps = ["", " ", " ", rng.choice(SPACES)]
            texts.append("".join(piece() + rng.choice(seps) for _ in range(rng.randint(1, 30))))
    return texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small byte-level BPE (all 256 bytes in its alphabet) trained with HF tokenizers."""
    tok = HFTokenizer(hf_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = random_texts(3000, seed=0)
    tok.train_from_iterator(corpus, trainer)
    return tok, corpus, tmp_path_factory.mktemp("trained")


PIPELINES = {  # name -> (normalizer, pre_tokenizer): the families tokenizer.py must recognise
    "gpt2": (None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)),
    "smollm2_digits": (None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])),
    "llama3": (None, pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])),
    "qwen_nfc": (normalizers.NFC(), pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])),
}


def variant(trained, name, config=None):
    """Save the trained BPE with one pipeline; return (reference, ours, directory)."""
    tok, _, root = trained
    out = root / name
    out.mkdir(exist_ok=True)
    ref = HFTokenizer.from_str(tok.to_str())
    ref.normalizer, ref.pre_tokenizer = PIPELINES.get(name, PIPELINES["gpt2"])
    ref.save(str(out / "tokenizer.json"))
    if config is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    return ref, Tokenizer.from_pretrained(out), out


def ref_ids(ref, text, specials_as_text=True):
    ref.encode_special_tokens = specials_as_text
    return ref.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("name", list(PIPELINES))
def test_encode_matches_hf_tokenizers(trained, name):
    ref, ours, _ = variant(trained, name)
    texts = random_texts(1200, seed=1)
    bad = [t for t in texts if ours.encode(t) != ref_ids(ref, t)]
    assert not bad, f"{len(bad)} mismatches, e.g. {bad[:3]!r}"
    norm = ref.normalizer.normalize_str if ref.normalizer else (lambda t: t)
    assert all(ours.decode(ours.encode(t)) == norm(t) for t in texts)
    assert ours.vocab_size == ref.get_vocab_size() == 1500


def test_llama3_tiktoken_model_file(trained):
    """A Meta-style tokenizer.model (base64 token, rank) with the Llama-3 pattern and specials."""
    ref, _, _ = variant(trained, "llama3")
    out = trained[2] / "llama3_tiktoken"
    out.mkdir()
    u2b, n = gpt2_unicode_to_byte(), len(SPECIALS)  # the trained specials are ids 0..6: shift them out
    ranks = {bytes(u2b[c] for c in s): i - n for s, i in ref.get_vocab(with_added_tokens=False).items() if i >= n}
    (out / "tokenizer.model").write_text("".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in ranks.items()))
    ours = Tokenizer.from_pretrained(out)
    texts = random_texts(1000, seed=2)
    assert all(ours.encode(t) == [i - n for i in ref_ids(ref, t)] for t in texts)
    first = len(ranks)
    assert ours.vocab_size == len(ranks) + 256
    assert (ours.special_tokens["<|begin_of_text|>"], ours.eos_id) == (first, first + 9)  # <|eot_id|>
    assert ours.encode_chat([{"role": "user", "content": "hi"}])[:2] == [first, first + 6]


def test_special_token_text_is_plain_text(trained):
    ref, ours, _ = variant(trained, "gpt2")
    special_ids = set(ours.special_tokens.values())
    for text in ["<|im_end|>", "a<|im_end|>b", "<|eot_id|><|im_start|>user\n", "<|endoftext|>"]:
        ids = ours.encode(text)
        assert not special_ids & set(ids) and ours.decode(ids) == text
        assert ref_ids(ref, text, specials_as_text=False) != ids  # HF would have emitted the specials
    chat = ours.encode_chat([{"role": "user", "content": "stop <|im_end|> here"}])
    assert chat.count(ours.eos_id) == 1  # only the turn's own end, not the one in the content
    assert ours.decode(chat) == "<|im_start|>user\nstop <|im_end|> here<|im_end|>\n"


# Chat templates, written here in the style of the real ones (SmolLM2, Qwen2.5, Llama 3.0, 3.1).
CHATML_DEFAULT_SYSTEM = (  # SmolLM2 writes raw newlines inside its string literals
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named Tester, made by us<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN_STYLE = (  # Qwen writes escaped newlines ('\\n' in the template text) and may escape quotes
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen-ish, a \\'helpful\\' assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (loop.first and message.role == 'system') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
CHATML_PLAIN = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3_0 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_1 = (
    "{{- bos_token }}\n{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n"
    "{%- endif %}\n{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n")

SYS = {"role": "system", "content": "Be brief.\n"}
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 * 7?"}],
    [SYS, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1 = 84."},
     {"role": "user", "content": "Q2"}],
    [SYS, {"role": "user", "content": "  \n\nleading space 42 \n"},
     {"role": "assistant", "content": "\n  12\n#### 12"}],
]


TEMPLATES = {"chatml_default_system": (CHATML_DEFAULT_SYSTEM, "chatml"), "qwen_style": (QWEN_STYLE, "chatml"),
             "chatml_plain": (CHATML_PLAIN, "chatml"), "llama3_0": (LLAMA3_0, "llama3"),
             "llama3_1": (LLAMA3_1, "llama3")}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_encode_chat_matches_transformers(trained, name):
    from transformers import PreTrainedTokenizerFast

    template, format_ = TEMPLATES[name]
    eos = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[format_]
    config = {"chat_template": template, "eos_token": eos, "bos_token": "<|begin_of_text|>"}
    ref, ours, out = variant(trained, name, config)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), bos_token="<|begin_of_text|>")
    hf.chat_template = template
    assert ours.eos_id == ours.special_tokens[eos] == ours.pad_id
    for messages in CONVERSATIONS:
        for gen in (False, True):
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            ids = ours.encode_chat(messages, add_generation_prompt=gen)
            assert ids == ref_ids(ref, text, specials_as_text=False), (messages, gen)


def test_any_template_renders_and_template_errors_are_user_errors(trained):
    from transformers import PreTrainedTokenizerFast

    template = "{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"
    config = {"chat_template": template, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    ref, ours, out = variant(trained, "inst_template", config)
    assert ours.eos_id == ours.pad_id == 0  # no special after an assistant turn: eos_token
    hf = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    messages = [{"role": "user", "content": "hi 12"}]
    assert ours.encode_chat(messages) == hf.apply_chat_template(messages, chat_template=template, return_dict=False)

    config["chat_template"] = "{{ raise_exception('Conversation roles must alternate') }}"
    _, ours, _ = variant(trained, "raising_template", config)
    with pytest.raises(UserError, match="chat template: Conversation roles must alternate"):
        ours.encode_chat(messages)
    config["chat_template"] = "{% for m in messages %}"
    with pytest.raises(UserError, match="bad_template: chat template line 1"):
        variant(trained, "bad_template", config)


def test_rejects_ids_that_are_not_merge_ranks(trained):
    tok, _, root = trained
    tj = json.loads(tok.to_str())
    vocab, (a, b) = tj["model"]["vocab"], tj["model"]["merges"][:2]
    x, y = "".join(a), "".join(b)  # swap the ids of the first two merge results
    vocab[x], vocab[y] = vocab[y], vocab[x]
    (root / "bad").mkdir()
    (root / "bad" / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UserError, match="not BPE merge ranks"):
        Tokenizer.from_pretrained(root / "bad")
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (root / "bad" / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UserError, match="unsupported pre_tokenizer"):
        Tokenizer.from_pretrained(root / "bad")


def without_bytes(trained, name, removed: bytes):
    """The trained tokenizer with some single-byte tokens deleted (as SmolLM2 lacks 21)."""
    tok, corpus, root = trained
    assert not set(removed) & set("".join(corpus).encode())  # so no merge needs them
    tj = json.loads(tok.to_str())
    b2u = {b: c for c, b in gpt2_unicode_to_byte().items()}
    for b in removed:
        del tj["model"]["vocab"][b2u[b]]
    (root / name).mkdir()
    (root / name / "tokenizer.json").write_text(json.dumps(tj))
    return Tokenizer.from_pretrained(root / name)


def test_missing_bytes_become_replacement_char(trained):
    ours = without_bytes(trained, "missing", b"\x04\xf3")
    for text, expected in [("a\x04b", "a\ufffdb"), ("x \U000e0001 y\x04", "x \ufffd y\ufffd"),
                           ("\ud800ok", "\ufffdok"), ("fine 123", "fine 123")]:
        assert ours.encode(text) == ours.encode(expected)
        assert ours.decode(ours.encode(text)) == expected


def test_missing_bytes_dropped_when_replacement_char_unencodable(trained):
    ours = without_bytes(trained, "missing_fffd", b"\x04\xef")  # U+FFFD is EF BF BD
    for text, expected in [("a\x04b", "ab"), ("x\ufffdy", "xy"), ("\ud800ok", "ok")]:
        assert ours.decode(ours.encode(text)) == expected


def test_decode_skips_ids_without_token(trained):
    _, ours, _ = variant(trained, "gpt2")
    ids = ours.encode("hello world")
    assert ours.decode(ids + [ours.vocab_size + 5]) == "hello world"


@pytest.mark.bundled
def test_bundled_smollm2_matches_digits_bytelevel_reference():
    import gguf
    import hub
    from transformers import PreTrainedTokenizerFast

    ours = Tokenizer.from_pretrained(hub.BUNDLED_NAME)  # through hub.resolve_model_dir
    assert ours.special_tokens == Tokenizer.from_pretrained(hub.bundled_model_dir()).special_tokens

    # Reference straight from the GGUF, independent of hub.py's conversion.
    reader = gguf.GGUFReader(hub.bundled_gguf_path())
    field = lambda key: [bytes(reader.fields[key].parts[i]).decode() for i in reader.fields[key].data]
    tokens, merges, template = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges"), \
        field("tokenizer.chat_template")[0]
    ref = HFTokenizer(hf_models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    ref.pre_tokenizer = PIPELINES["smollm2_digits"][1]
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens(tokens[:17])
    assert (ours.vocab_size, ours.eos_id, ours.pad_id) == (49152, 2, 2)
    assert ours.special_tokens == {t: i for i, t in enumerate(tokens[:17])}

    u2b = gpt2_unicode_to_byte()
    missing = set(range(256)) - {u2b[t] for t in tokens[17:] if len(t) == 1}
    assert len(missing) == 21
    texts = [t for t in random_texts(1500, seed=3) if not missing & set(t.encode())]
    assert len(texts) > 1000
    bad = [t for t in texts if ours.encode(t) != ref_ids(ref, t)]
    assert not bad, f"{len(bad)} mismatches, e.g. {bad[:3]!r}"
    assert all(ours.decode(ours.encode(t)) == t for t in texts)

    # Bytes with no token (0x04; 0xF1 leads U+40000..U+7FFFF): U+FFFD instead, and no panic.
    assert ours.encode("a\x04b\U00040000c") == ours.encode("a\ufffdb\ufffdc")

    hf = PreTrainedTokenizerFast(tokenizer_object=ref)
    hf.chat_template = template
    assert "You are a helpful AI assistant named SmolLM" in ours.chat_template
    for messages in CONVERSATIONS:
        for gen in (False, True):
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.encode_chat(messages, add_generation_prompt=gen) == ref_ids(ref, text, False)
