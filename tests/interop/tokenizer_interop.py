#!/usr/bin/env python3
"""Tokenizers from GGUF metadata against the reference implementations.

usage: tokenizer_interop.py TOKENIZE WORKDIR

Trains a small SentencePiece BPE model (byte fallback) and small byte-level BPE models with
the llama-3, Qwen2 and GPT-2 pre-tokenizers (HF `tokenizers`) on a generated corpus, stores each vocabulary in
a GGUF file the way llama.cpp's converter does, and requires `tokenize` to produce the same
ids as the reference encoders and to decode them back to the input. Needs:
pip install gguf numpy sentencepiece tokenizers
"""
import json
import os
import random
import subprocess
import sys

try:
    import gguf
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
except ImportError as e:
    sys.exit(f"tokenizer_interop: {e}: pip install gguf numpy sentencepiece tokenizers")

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                  r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre as llama.cpp's converter writes it, and the pattern it stands for
# (SMOLLM: every digit split off first, then ByteLevel's own GPT-2 pattern).
SMOLLM = "digits, then GPT-2"
PRE_TOKENIZERS = (("llama-bpe", LLAMA3_PATTERN), ("qwen2", QWEN2_PATTERN), ("gpt-2", GPT2_PATTERN),
                  ("smollm", SMOLLM), ("tekken", TEKKEN_PATTERN))

WORDS = ("the quick brown fox jumps over lazy dog attention flash kernel tensor graph model token "
         "weights quantized layer head query key value softmax gradient backward forward "
         "caf\u00e9 na\u00efve \u00fcber stra\u00dfe \u65e5\u672c\u8a9e \u043f\u0440\u0438\u0432\u0435\u0442").split()


def corpus(rng, n_lines):
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        if rng.random() < 0.2:
            words[rng.randrange(len(words))] += rng.choice([",", ".", "!", "'s", "'re", "?!"])
        line = " ".join(words)
        lines.append(line.capitalize() if rng.random() < 0.5 else line)
    return lines


def test_texts(rng):
    texts = [
        "Hello world", "the quick brown fox", " leading space", "trailing space ", "two  spaces",
        "tabs\tand\nnewlines\n\n", "numbers 1234567 and 42", "It's we're they've I'm we'll he'd",
        "caf\u00e9 \u00fcber na\u00efve", "\u65e5\u672c\u8a9e text", "emoji \U0001F600 and symbols \u2603 \u00d7 \u00f7",
        "unseen chars: \u0394\u03b4 \u05d0 \u0915", "punctuation!!! ... ??? (parens) [brackets]", "", "x",
        "   ", "\n", "MiXeD CaSe WoRdS", "a\r\nb\r\n", "year 2026, 1234567890 and 3.14159",
        "line one\r\n\r\nline two  \n   three\t\tfour", "It'S WE'RE upper-case contractions",
        "camelCase HTTPServer getURL xmlHTTPRequest ÉCOLE École Straße ĞÜNAYDIN Привет МИР Ωmega",
        "A\u65e5B HTTP\u65e5\u672cAPI x\u65e5Y \u00c9\u0301T\u00c9",
        "paths a/b/c and https://x.org/a/b?q=1, e\u0301 (combining), \u0915\u093f (a vowel sign)",
    ]
    lines = corpus(rng, 30)
    texts += lines
    texts.append("\n".join(lines[:5]))
    return texts


def run_tokenize(tokenize, model, texts, workdir, *flags):
    cases = os.path.join(workdir, "cases.bin")
    with open(cases, "wb") as f:
        f.write(b"\0".join(t.encode("utf-8") for t in texts))
    proc = subprocess.run([tokenize, model, "--cases", cases, *flags], capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"tokenize failed: {proc.stderr.decode(errors='replace')}")
    lines = proc.stdout.decode().split("\n")
    out = []
    for i in range(len(texts)):
        ids = [int(x) for x in lines[2 * i].split()]
        out.append((ids, bytes.fromhex(lines[2 * i + 1]).decode("utf-8", errors="replace")))
    return out


def check_spm(tokenize, workdir, rng):
    text_path = os.path.join(workdir, "spm-corpus.txt")
    with open(text_path, "w", encoding="utf-8") as f:
        f.write("\n".join(corpus(rng, 400)))
    prefix = os.path.join(workdir, "spm")
    spm.SentencePieceTrainer.train(
        input=text_path, model_prefix=prefix, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")

    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 1)
    path = os.path.join(workdir, "spm.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    texts = test_texts(rng)
    ours = run_tokenize(tokenize, path, texts, workdir)
    failures = 0
    for text, (ids, decoded) in zip(texts, ours):
        want = sp.encode(text)
        if ids != want:
            failures += 1
            print(f"spm encode {text!r}:\n  ours {ids}\n  ref  {want}")
        if decoded != sp.decode(want):
            failures += 1
            print(f"spm decode {text!r}: ours {decoded!r}, ref {sp.decode(want)!r}")
    bos = run_tokenize(tokenize, path, ["hello"], workdir, "--bos")[0][0]
    if bos != [sp.bos_id()] + sp.encode("hello"):
        failures += 1
        print(f"spm --bos: {bos}")
    return failures, len(texts)


BPE_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


def byte_level(pattern):
    if pattern == SMOLLM:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_bpe(rng):
    """One byte-level BPE vocabulary for every pre-tokenizer: trained with the llama-3 pattern on
    text with numbers, runs of spaces, CRLF line ends, upper-case contractions and mixed-case
    words, so that it has merges of digits, of whitespace, of "'S" and across case changes that
    the other patterns split differently (a pattern that only decided
    splits its own vocabulary never merges across would go unnoticed)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level(LLAMA3_PATTERN)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=BPE_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = corpus(rng, 400)
    for i in range(0, len(lines), 7):
        lines[i] = (f"{lines[i]}  {rng.randint(0, 10**7)}\r\n\t{lines[i + 1] if i + 1 < len(lines) else ''}"
                    f" IT'S WE'RE HTTP\u65e5\u672cAPI A\u65e5B x\u65e5Y camelCase a/b/c\n\n")
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def check_bpe(tokenize, workdir, rng, trained, pre, pattern):
    specials = BPE_SPECIALS
    tok = Tokenizer.from_str(trained.to_str())
    tok.pre_tokenizer = byte_level(pattern)

    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = [None] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    types = [3 if t in specials else 1 for t in tokens]
    path = os.path.join(workdir, f"bpe-{pre}.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|begin_of_text|>"])
    w.add_eos_token_id(vocab["<|end_of_text|>"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    texts = test_texts(rng)
    failures = 0
    ours = run_tokenize(tokenize, path, texts, workdir)
    for text, (ids, decoded) in zip(texts, ours):
        want = tok.encode(text, add_special_tokens=False).ids
        if ids != want:
            failures += 1
            print(f"bpe ({pre}) encode {text!r}:\n  ours {ids}\n  ref  {want}")
        if decoded != text:
            failures += 1
            print(f"bpe ({pre}) decode {text!r}: {decoded!r}")
    special_text = "<|begin_of_text|>Hello<|eot_id|> world<|end_of_text|>"
    ids = run_tokenize(tokenize, path, [special_text], workdir, "--special")[0][0]
    want = tok.encode(special_text, add_special_tokens=False).ids
    if ids != want:
        failures += 1
        print(f"bpe ({pre}) specials: ours {ids}, ref {want}")
    return failures, len(texts)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    tokenize, workdir = sys.argv[1:]
    os.makedirs(workdir, exist_ok=True)
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    f1, n1 = check_spm(tokenize, workdir, rng)
    f2, n2 = 0, 0
    trained = train_bpe(rng)
    for pre, pattern in PRE_TOKENIZERS:
        f, n = check_bpe(tokenize, workdir, rng, trained, pre, pattern)
        f2, n2 = f2 + f, n2 + n
    if f1 or f2:
        print(f"tokenizer_interop: {f1 + f2} mismatches (seed {seed})")
        return 1
    print(f"tokenizer_interop: {n1} SentencePiece and {n2} BPE texts ({', '.join(p for p, _ in PRE_TOKENIZERS)}) "
          f"identical (seed {seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
