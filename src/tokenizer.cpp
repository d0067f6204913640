// SentencePiece-style and byte-level BPE tokenizers driven by GGUF vocabulary metadata.
#include <ggml-fa/error.h>
#include <ggml-fa/tokenizer.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <queue>

namespace gfa {

namespace {

const std::string kSpmSpace = "\xE2\x96\x81"; // U+2581, SentencePiece's visible space

// ---- UTF-8 and character classes ---------------------------------------------------------

// Length of the UTF-8 sequence starting at s[i]; an invalid lead byte counts as one byte.
size_t utf8_len(std::string_view s, size_t i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
    return std::min(n, s.size() - i);
}

uint32_t decode_cp(std::string_view s, size_t i, size_t n) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (n == 1) return c < 0x80 ? c : 0xFFFD;
    uint32_t cp = c & (0x7F >> n);
    for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    return cp;
}

void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out += char(cp);
    } else if (cp < 0x800) {
        out += char(0xC0 | (cp >> 6));
        out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += char(0xE0 | (cp >> 12));
        out += char(0x80 | ((cp >> 6) & 0x3F));
        out += char(0x80 | (cp & 0x3F));
    } else {
        out += char(0xF0 | (cp >> 18));
        out += char(0x80 | ((cp >> 12) & 0x3F));
        out += char(0x80 | ((cp >> 6) & 0x3F));
        out += char(0x80 | (cp & 0x3F));
    }
}

bool in_ranges(uint32_t cp, std::initializer_list<std::pair<uint32_t, uint32_t>> ranges) {
    for (const auto& [lo, hi] : ranges)
        if (cp >= lo && cp <= hi) return true;
    return false;
}

// Unicode classes used by the pre-tokenizer pattern. Exact for ASCII and Latin-1; beyond
// that, the letter and number blocks of the common scripts (Latin, Greek, Cyrillic,
// Armenian, Hebrew, Arabic, Devanagari, CJK, kana, Hangul, full-width forms). Combining
// marks, punctuation and symbols are neither letters nor numbers, as in Unicode.
bool is_space(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 ||
           in_ranges(cp, {{0x85, 0x85},
                          {0xA0, 0xA0},
                          {0x1680, 0x1680},
                          {0x2000, 0x200A},
                          {0x2028, 0x2029},
                          {0x202F, 0x202F},
                          {0x205F, 0x205F},
                          {0x3000, 0x3000}});
}

bool is_number(uint32_t cp) {
    if (cp < 0x80) return cp >= '0' && cp <= '9';
    return in_ranges(cp, {{0xB2, 0xB3},
                          {0xB9, 0xB9},
                          {0xBC, 0xBE},
                          {0x660, 0x669},
                          {0x6F0, 0x6F9},
                          {0x966, 0x96F},
                          {0x2070, 0x2070},
                          {0x2074, 0x2079},
                          {0x2080, 0x2089},
                          {0x2150, 0x2189},
                          {0x2460, 0x249B},
                          {0x24EA, 0x24FF},
                          {0x3007, 0x3007},
                          {0x3021, 0x3029},
                          {0xFF10, 0xFF19}});
}

bool is_letter(uint32_t cp) {
    if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
    if (cp < 0x100) return cp == 0xAA || cp == 0xB5 || cp == 0xBA || (cp >= 0xC0 && cp != 0xD7 && cp != 0xF7);
    return in_ranges(
        cp, {{0x100, 0x2C1},   {0x2C6, 0x2D1},   {0x2E0, 0x2E4},   {0x370, 0x374},   {0x376, 0x37D},
             {0x37F, 0x37F},   {0x386, 0x386},   {0x388, 0x3F5},   {0x3F7, 0x481},   {0x48A, 0x52F},
             {0x531, 0x556},   {0x560, 0x588},   {0x5D0, 0x5EA},   {0x620, 0x64A},   {0x671, 0x6D3},
             {0x904, 0x939},   {0x958, 0x961},   {0x1E00, 0x1FBC}, {0x3041, 0x3096}, {0x309D, 0x309F},
             {0x30A1, 0x30FA}, {0x30FC, 0x30FF}, {0x3400, 0x4DBF}, {0x4E00, 0x9FFF}, {0xAC00, 0xD7A3},
             {0xF900, 0xFAFF}, {0xFF21, 0xFF3A}, {0xFF41, 0xFF5A}, {0xFF66, 0xFFDC}, {0x20000, 0x2FFFF}});
}

// Case of a letter (Unicode Lu/Lt and Ll), for the tekken pattern: exact for ASCII and
// Latin-1; Latin Extended-A/B and Additional, Greek, Cyrillic, Armenian and the full-width
// forms by their blocks' case layout. Letters that are neither (Lm, Lo: CJK, kana, Hangul,
// Hebrew, Arabic, Devanagari, ...) count on both sides of the pattern.
bool is_upper(uint32_t cp) {
    if (cp < 0x80) return cp >= 'A' && cp <= 'Z';
    if (cp < 0x100) return cp >= 0xC0 && cp <= 0xDE && cp != 0xD7;
    if (cp < 0x180) { // pairs, upper first, but for the odd-started runs 0x139-0x148 and 0x179-0x17E
        if (cp == 0x138 || cp == 0x149 || cp == 0x17F) return false;
        if (cp == 0x178) return true;
        const bool odd_run = (cp >= 0x139 && cp <= 0x148) || (cp >= 0x179 && cp <= 0x17E);
        return odd_run ? cp % 2 == 1 : cp % 2 == 0;
    }
    if (cp >= 0x1E00 && cp <= 0x1EFF) return cp % 2 == 0 && !(cp >= 0x1E96 && cp <= 0x1E9F);
    if (cp >= 0x386 && cp <= 0x3AB) return cp != 0x387 && cp != 0x38B && cp != 0x38D && cp != 0x3A2;
    if (cp >= 0x400 && cp <= 0x42F) return true;
    if ((cp >= 0x460 && cp <= 0x481) || (cp >= 0x48A && cp <= 0x4BF) || (cp >= 0x4D0 && cp <= 0x52F))
        return cp % 2 == 0;
    return (cp >= 0x531 && cp <= 0x556) || (cp >= 0xFF21 && cp <= 0xFF3A);
}
bool is_lower(uint32_t cp) {
    if (cp < 0x80) return cp >= 'a' && cp <= 'z';
    if (cp < 0x100) return cp == 0xB5 || (cp >= 0xDF && cp != 0xF7);
    if (cp < 0x180 || (cp >= 0x1E00 && cp <= 0x1EFF)) return is_letter(cp) && !is_upper(cp);
    if (cp >= 0x3AC && cp <= 0x3CE) return true;
    if (cp >= 0x430 && cp <= 0x45F) return true;
    if ((cp >= 0x460 && cp <= 0x481) || (cp >= 0x48A && cp <= 0x4BF) || (cp >= 0x4D0 && cp <= 0x52F))
        return cp % 2 == 1;
    return (cp >= 0x560 && cp <= 0x588) || (cp >= 0xFF41 && cp <= 0xFF5A);
}
// Combining marks (Unicode M) of the common scripts.
bool is_mark(uint32_t cp) {
    return in_ranges(cp, {{0x300, 0x36F},
                          {0x483, 0x489},
                          {0x591, 0x5BD},
                          {0x610, 0x61A},
                          {0x64B, 0x65F},
                          {0x900, 0x903},
                          {0x93A, 0x93C},
                          {0x93E, 0x94F},
                          {0x951, 0x957},
                          {0x962, 0x963},
                          {0x1AB0, 0x1AFF},
                          {0x1DC0, 0x1DFF},
                          {0x20D0, 0x20FF},
                          {0x3099, 0x309A},
                          {0xFE20, 0xFE2F}});
}

// ---- pre-tokenizers ----------------------------------------------------------------------
//
// Hand-written matchers for the patterns byte-level BPE vocabularies split text with, trying
// the alternatives in order at each position, as a backtracking regex engine would:
//   llama-3: (?i:'s|'t|'re|'ve|'m|'ll|'d) | [^\r\n\p{L}\p{N}]?\p{L}+ | \p{N}{1,3} |
//             ?[^\s\p{L}\p{N}]+[\r\n]* | \s*[\r\n]+ | \s+(?!\S) | \s+
//   Qwen2:   the same with \p{N} (one digit per word) for \p{N}{1,3}
//   GPT-2:   's|'t|'re|'ve|'m|'ll|'d | ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+ | \s+(?!\S) | \s+
//   SmolLM:  every digit a word of its own first, then GPT-2's pattern on the text between
//   tekken:  [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+ |
//            [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]* | \p{N} |
//             ?[^\s\p{L}\p{N}]+[\r\n/]* | \s*[\r\n]+ | \s+(?!\S) | \s+
std::vector<std::string> split_words(std::string_view text, Tokenizer::PreSplit kind) {
    if (kind == Tokenizer::PreSplit::Gpt2Digits) {
        std::vector<std::string> words;
        size_t start = 0;
        auto flush = [&](size_t end) {
            if (end == start) return;
            for (std::string& w : split_words(text.substr(start, end - start), Tokenizer::PreSplit::Gpt2))
                words.push_back(std::move(w));
        };
        for (size_t i = 0; i < text.size();) {
            const size_t n = utf8_len(text, i);
            if (is_number(decode_cp(text, i, n))) {
                flush(i);
                words.emplace_back(text.substr(i, n));
                start = i + n;
            }
            i += n;
        }
        flush(text.size());
        return words;
    }
    const bool gpt2 = kind == Tokenizer::PreSplit::Gpt2, tekken = kind == Tokenizer::PreSplit::Tekken;
    const size_t max_digits = kind == Tokenizer::PreSplit::Qwen2 || tekken ? 1 : 3;
    std::vector<uint32_t> cps;
    std::vector<size_t> at; // byte offset of each code point, plus the end
    for (size_t i = 0; i < text.size();) {
        const size_t n = utf8_len(text, i);
        cps.push_back(decode_cp(text, i, n));
        at.push_back(i);
        i += n;
    }
    at.push_back(text.size());
    const size_t n = cps.size();
    auto L = [&](size_t i) { return i < n && is_letter(cps[i]); };
    auto N = [&](size_t i) { return i < n && is_number(cps[i]); };
    auto S = [&](size_t i) { return i < n && is_space(cps[i]); };
    auto CRLF = [&](size_t i) { return i < n && (cps[i] == '\r' || cps[i] == '\n'); };
    // llama-3 and Qwen2 match contractions in either case, GPT-2 in lower case only
    auto lower = [&](size_t i) {
        return i < n && cps[i] < 0x80 ? uint32_t(gpt2 ? cps[i] : cps[i] | 0x20) : uint32_t(0);
    };
    auto other = [&](size_t k) { return k < n && !S(k) && !L(k) && !N(k); };

    // tekken's letter classes: U = Lu Lt Lm Lo M, W = Ll Lm Lo M
    auto caseless = [&](size_t k) {
        return is_mark(cps[k]) || (is_letter(cps[k]) && !is_upper(cps[k]) && !is_lower(cps[k]));
    };
    auto U = [&](size_t k) { return k < n && (is_upper(cps[k]) || caseless(k)); };
    auto W = [&](size_t k) { return k < n && (is_lower(cps[k]) || caseless(k)); };
    // U*W+ from j, as a backtracking engine matches it: the longest U* after which W+ matches
    // (W+ itself greedy); 0 when none.
    auto upper_then_lower = [&](size_t j) -> size_t {
        size_t k = j;
        while (U(k)) ++k;
        for (size_t p = k + 1; p-- > j;) {
            if (!W(p)) continue;
            size_t e = p;
            while (W(e)) ++e;
            return e;
        }
        return 0;
    };

    std::vector<std::string> words;
    size_t i = 0;
    while (i < n) {
        size_t end = i;
        if (tekken) {
            // the optional prefix is tried first, as the greedy '?' would
            const bool prefix = !CRLF(i) && !L(i) && !N(i);
            for (size_t j : {prefix ? i + 1 : i, i}) {
                if (end != i) break;
                if (const size_t e = upper_then_lower(j); e > j) end = e;
                if (end == i && U(j)) { // U+ W*
                    size_t e = j;
                    while (U(e)) ++e;
                    while (W(e)) ++e;
                    end = e;
                }
                if (!prefix) break;
            }
        }
        if (!tekken && cps[i] == '\'') { // contractions
            const uint32_t a = lower(i + 1), b = lower(i + 2);
            if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
                end = i + 3;
            else if (a == 's' || a == 't' || a == 'm' || a == 'd')
                end = i + 2;
        }
        if (gpt2) {
            // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+', each after an optional space
            const size_t j = i + (cps[i] == ' ' ? 1 : 0);
            for (auto cls : {+[](bool l, bool, bool) { return l; }, +[](bool, bool d, bool) { return d; },
                             +[](bool, bool, bool o) { return o; }}) {
                if (end != i) break;
                auto in = [&](size_t k) { return cls(L(k), N(k), other(k)); };
                if (in(j)) {
                    size_t k = j;
                    while (in(k)) ++k;
                    end = k;
                }
            }
        }
        if (!gpt2 && !tekken && end == i) { // [^\r\n\p{L}\p{N}]?\p{L}+
            size_t j = i;
            if (!CRLF(j) && !L(j) && !N(j) && L(j + 1)) ++j;
            if (L(j)) {
                while (L(j)) ++j;
                end = j;
            }
        }
        if (!gpt2 && end == i && N(i)) { // \p{N}{1,3} or \p{N}
            end = i;
            while (end < i + max_digits && N(end)) ++end;
        }
        if (!gpt2 && end == i) { //  ?[^\s\p{L}\p{N}]+[\r\n]* (tekken: [\r\n/]*)
            size_t j = i + (cps[i] == ' ' ? 1 : 0);
            if (other(j)) {
                while (other(j)) ++j;
                while (CRLF(j) || (tekken && j < n && cps[j] == '/')) ++j;
                end = j;
            }
        }
        if (end == i && S(i)) {
            size_t run = i;
            while (S(run)) ++run;
            size_t last_newline = i;
            for (size_t k = i; k < run; ++k)
                if (CRLF(k)) last_newline = k + 1;
            if (!gpt2 && last_newline > i)
                end = last_newline; // \s*[\r\n]+
            else if (run == n)
                end = run; // \s+(?!\S) at the end
            else if (run - i >= 2)
                end = run - 1; // \s+(?!\S): leave one
            else
                end = run; // \s+
        }
        if (end == i) end = i + 1; // unreachable by the pattern's construction; never stall
        words.emplace_back(text.substr(at[i], at[end] - at[i]));
        i = end;
    }
    return words;
}

// GPT-2's reversible map from bytes to printable code points: printable Latin-1 bytes map
// to themselves, the rest to 256, 257, ... in byte order.
struct ByteMap {
    std::array<std::string, 256> to_text;
    std::unordered_map<uint32_t, uint8_t> to_byte;
    ByteMap() {
        uint32_t next = 256;
        for (uint32_t b = 0; b < 256; ++b) {
            const bool printable =
                (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            const uint32_t cp = printable ? b : next++;
            append_utf8(to_text[b], cp);
            to_byte[cp] = uint8_t(b);
        }
    }
};

const ByteMap& byte_map() {
    static const ByteMap m;
    return m;
}

} // namespace

// ---- construction -------------------------------------------------------------------------

Tokenizer Tokenizer::from_gguf(const gguf::Metadata& md) {
    Tokenizer t;
    const std::string model = md.at("tokenizer.ggml.model").as_string();
    if (model == "no_vocab" || model == "none")
        fail("the model file has no vocabulary (tokenizer.ggml.model is '" + model +
             "'); give prompts as token ids");
    if (model == "llama")
        t.model_ = Model::SentencePiece;
    else if (model == "gpt2")
        t.model_ = Model::BytePairGpt2;
    else
        fail("tokenizer.ggml.model '" + model + "' is not supported (llama or gpt2)");

    const gguf::Array& tokens = md.at("tokenizer.ggml.tokens").as_array();
    if (tokens.items.empty()) fail("tokenizer.ggml.tokens is empty");
    if (tokens.items.size() > size_t(INT32_MAX)) fail("tokenizer.ggml.tokens is too long");
    const size_t n = tokens.items.size();
    t.tokens_.reserve(n);
    for (const gguf::Value& v : tokens.items) t.tokens_.push_back(v.as_string());
    t.scores_.assign(n, 0.0f);
    if (const gguf::Value* s = md.find("tokenizer.ggml.scores")) {
        const gguf::Array& a = s->as_array();
        if (a.items.size() != n)
            fail("tokenizer.ggml.scores has " + std::to_string(a.items.size()) + " entries for " +
                 std::to_string(n) + " tokens");
        for (size_t i = 0; i < n; ++i) t.scores_[i] = float(a.items[i].as_float());
    } else if (t.model_ == Model::SentencePiece) {
        fail("tokenizer.ggml.scores is required by the llama tokenizer");
    }
    t.types_.assign(n, TokenType::Normal);
    if (const gguf::Value* s = md.find("tokenizer.ggml.token_type")) {
        const gguf::Array& a = s->as_array();
        if (a.items.size() != n)
            fail("tokenizer.ggml.token_type has " + std::to_string(a.items.size()) + " entries for " +
                 std::to_string(n) + " tokens");
        for (size_t i = 0; i < n; ++i) {
            const int64_t ty = a.items[i].as_int();
            if (ty < 1 || ty > 6)
                fail("tokenizer.ggml.token_type[" + std::to_string(i) + "] = " + std::to_string(ty));
            t.types_[i] = TokenType(ty);
        }
    }
    for (size_t i = 0; i < n; ++i) t.ids_.try_emplace(t.tokens_[i], int32_t(i));

    auto token_id = [&](const char* key) -> int32_t {
        const gguf::Value* v = md.find(key);
        if (!v) return -1;
        const int64_t id = v->as_int();
        if (id < 0 || size_t(id) >= n)
            fail(std::string(key) + " = " + std::to_string(id) + " is not a token id (vocabulary of " +
                 std::to_string(n) + ")");
        return int32_t(id);
    };
    t.bos_ = token_id("tokenizer.ggml.bos_token_id");
    t.eos_ = token_id("tokenizer.ggml.eos_token_id");
    t.unk_ = token_id("tokenizer.ggml.unknown_token_id");
    if (const gguf::Value* v = md.find("tokenizer.ggml.add_space_prefix"))
        t.add_space_prefix_ = v->as<bool>();

    t.byte_tokens_.fill(-1);
    if (t.model_ == Model::SentencePiece) {
        for (int b = 0; b < 256; ++b) {
            char name[8];
            std::snprintf(name, sizeof name, "<0x%02X>", b);
            auto it = t.ids_.find(name);
            if (it != t.ids_.end() && t.types_[size_t(it->second)] == TokenType::Byte)
                t.byte_tokens_[b] = it->second;
        }
    } else {
        if (const gguf::Value* pre = md.find("tokenizer.ggml.pre")) {
            const std::string& p = pre->as_string();
            if (p == "qwen2" || p == "deepseek-r1-qwen")
                t.pre_split_ = PreSplit::Qwen2;
            else if (p == "gpt-2" || p == "phi-2")
                t.pre_split_ = PreSplit::Gpt2;
            else if (p == "smollm")
                t.pre_split_ = PreSplit::Gpt2Digits;
            else if (p == "tekken")
                t.pre_split_ = PreSplit::Tekken;
            else if (p != "llama-bpe" && p != "llama3" && p != "default")
                fail("tokenizer.ggml.pre '" + p +
                     "' is not supported (llama-bpe, qwen2, deepseek-r1-qwen, gpt-2, phi-2, smollm and "
                     "tekken are)");
        }
        const gguf::Array& merges = md.at("tokenizer.ggml.merges").as_array();
        for (size_t r = 0; r < merges.items.size(); ++r) {
            const std::string& m = merges.items[r].as_string();
            if (m.find(' ') == std::string::npos || m.front() == ' ')
                fail("tokenizer.ggml.merges[" + std::to_string(r) + "] '" + m + "' is not 'left right'");
            t.merge_ranks_.try_emplace(m, int32_t(r));
        }
        const ByteMap& bm = byte_map();
        for (int b = 0; b < 256; ++b) t.byte_tokens_[b] = t.find(bm.to_text[b]);
    }

    for (size_t i = 0; i < n; ++i)
        if ((t.types_[i] == TokenType::Control || t.types_[i] == TokenType::UserDefined) &&
            !t.tokens_[i].empty())
            t.specials_.push_back(int32_t(i));
    std::stable_sort(t.specials_.begin(), t.specials_.end(), [&](int32_t a, int32_t b) {
        return t.tokens_[size_t(a)].size() > t.tokens_[size_t(b)].size();
    });
    return t;
}

void Tokenizer::write_byte_vocabulary(gguf::Metadata& md) {
    gguf::Array tokens{gguf::ValueType::String, {}}, types{gguf::ValueType::I32, {}};
    for (int b = 0; b < 256; ++b) {
        tokens.items.emplace_back(byte_map().to_text[size_t(b)]);
        types.items.emplace_back(int32_t(TokenType::Normal));
    }
    md.set("tokenizer.ggml.model", "gpt2");
    md.set("tokenizer.ggml.pre", "default");
    md.set("tokenizer.ggml.tokens", gguf::Value(std::move(tokens)));
    md.set("tokenizer.ggml.token_type", gguf::Value(std::move(types)));
    md.set("tokenizer.ggml.merges", gguf::Value(gguf::Array{gguf::ValueType::String, {}}));
    md.set("tokenizer.ggml.add_bos_token", false);
}

int32_t Tokenizer::find(std::string_view piece) const {
    auto it = ids_.find(std::string(piece));
    return it == ids_.end() ? -1 : it->second;
}

const std::string& Tokenizer::token_text(int32_t id) const {
    if (id < 0 || size_t(id) >= tokens_.size()) fail("token id " + std::to_string(id) + " is out of range");
    return tokens_[size_t(id)];
}

Tokenizer::TokenType Tokenizer::token_type(int32_t id) const {
    token_text(id); // range check
    return types_[size_t(id)];
}

// ---- encoding -----------------------------------------------------------------------------

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos, bool parse_special) const {
    std::vector<int32_t> out;
    if (add_bos) {
        if (bos_ < 0) fail("the vocabulary has no BOS token (tokenizer.ggml.bos_token_id)");
        out.push_back(bos_);
    }
    auto encode_plain = [&](std::string_view part, bool first) {
        if (part.empty()) return;
        if (model_ == Model::SentencePiece) {
            // Only the start of the text gets the space prefix, not text after a special token.
            std::string s = add_space_prefix_ && first ? " " : "";
            s += part;
            encode_spm(s, out);
        } else {
            encode_bpe(part, out);
        }
    };
    if (!parse_special) {
        encode_plain(text, true);
        return out;
    }
    size_t start = 0, i = 0;
    bool first = true;
    while (i < text.size()) {
        int32_t hit = -1;
        for (int32_t id : specials_)
            if (text.compare(i, tokens_[size_t(id)].size(), tokens_[size_t(id)]) == 0) {
                hit = id;
                break;
            }
        if (hit < 0) {
            ++i;
            continue;
        }
        encode_plain(text.substr(start, i - start), first);
        first = false;
        out.push_back(hit);
        i += tokens_[size_t(hit)].size();
        start = i;
    }
    encode_plain(text.substr(start), first);
    return out;
}

void Tokenizer::encode_spm(std::string_view raw, std::vector<int32_t>& out) const {
    std::string s;
    for (char c : raw) c == ' ' ? void(s += kSpmSpace) : void(s += c);

    // One symbol per character, in a linked list so merges are O(1).
    struct Symbol {
        size_t start, len;
        int prev, next;
    };
    std::vector<Symbol> sym;
    for (size_t i = 0; i < s.size();) {
        const size_t n = utf8_len(s, i);
        sym.push_back({i, n, int(sym.size()) - 1, int(sym.size()) + 1});
        i += n;
    }
    if (sym.empty()) return;
    sym.back().next = -1;

    // Highest score first; among equal scores the leftmost pair.
    struct Pair {
        int left, right;
        float score;
        size_t len;
    };
    auto worse = [](const Pair& a, const Pair& b) {
        return a.score < b.score || (a.score == b.score && a.left > b.left);
    };
    std::priority_queue<Pair, std::vector<Pair>, decltype(worse)> queue(worse);
    auto try_pair = [&](int left, int right) {
        if (left < 0 || right < 0) return;
        const size_t len = sym[size_t(left)].len + sym[size_t(right)].len;
        const int32_t id = find(std::string_view(s).substr(sym[size_t(left)].start, len));
        if (id < 0) return;
        const TokenType ty = types_[size_t(id)];
        if (ty != TokenType::Normal && ty != TokenType::UserDefined) return;
        queue.push({left, right, scores_[size_t(id)], len});
    };
    for (size_t i = 1; i < sym.size(); ++i) try_pair(int(i) - 1, int(i));

    while (!queue.empty()) {
        const Pair p = queue.top();
        queue.pop();
        Symbol& l = sym[size_t(p.left)];
        Symbol& r = sym[size_t(p.right)];
        // Skip pairs made stale by an earlier merge of either side.
        if (l.len == 0 || r.len == 0 || l.next != p.right || l.len + r.len != p.len) continue;
        l.len += r.len;
        r.len = 0;
        l.next = r.next;
        if (r.next >= 0) sym[size_t(r.next)].prev = p.left;
        try_pair(l.prev, p.left);
        try_pair(p.left, l.next);
    }

    for (int i = 0; i >= 0; i = sym[size_t(i)].next) {
        const std::string_view piece = std::string_view(s).substr(sym[size_t(i)].start, sym[size_t(i)].len);
        const int32_t id = find(piece);
        if (id >= 0) {
            out.push_back(id);
            continue;
        }
        for (unsigned char b : piece) { // byte fallback
            if (byte_tokens_[b] >= 0)
                out.push_back(byte_tokens_[b]);
            else if (unk_ >= 0)
                out.push_back(unk_);
            else
                fail("cannot encode byte " + std::to_string(b) + ": no byte token and no unknown token");
        }
    }
}

void Tokenizer::encode_bpe(std::string_view text, std::vector<int32_t>& out) const {
    const ByteMap& bm = byte_map();
    for (const std::string& word : split_words(text, pre_split_)) {
        std::string mapped;
        for (unsigned char b : word) mapped += bm.to_text[b];
        bpe_word(mapped, out);
    }
}

void Tokenizer::bpe_word(const std::string& word, std::vector<int32_t>& out) const {
    if (const int32_t whole = find(word); whole >= 0 && types_[size_t(whole)] == TokenType::Normal) {
        out.push_back(whole); // common words are one token: skip the merge loop
        return;
    }
    std::vector<std::string> parts;
    for (size_t i = 0; i < word.size();) {
        const size_t n = utf8_len(word, i);
        parts.emplace_back(word.substr(i, n));
        i += n;
    }
    // Merge the lowest-ranked adjacent pair (leftmost on ties) until no pair has a rank.
    while (parts.size() > 1) {
        int32_t best_rank = INT32_MAX;
        size_t best = 0;
        for (size_t i = 0; i + 1 < parts.size(); ++i) {
            auto it = merge_ranks_.find(parts[i] + " " + parts[i + 1]);
            if (it != merge_ranks_.end() && it->second < best_rank) best_rank = it->second, best = i;
        }
        if (best_rank == INT32_MAX) break;
        parts[best] += parts[best + 1];
        parts.erase(parts.begin() + std::ptrdiff_t(best + 1));
    }
    const ByteMap& bm = byte_map();
    for (const std::string& p : parts) {
        if (const int32_t id = find(p); id >= 0) {
            out.push_back(id);
            continue;
        }
        // A piece missing from the vocabulary: fall back to its single-byte tokens.
        for (size_t i = 0; i < p.size();) {
            const size_t n = utf8_len(p, i);
            auto b = bm.to_byte.find(decode_cp(p, i, n));
            const int32_t id = b != bm.to_byte.end() ? byte_tokens_[b->second] : -1;
            if (id >= 0)
                out.push_back(id);
            else if (unk_ >= 0)
                out.push_back(unk_);
            else
                fail("cannot encode '" + p + "': not in the vocabulary and no unknown token");
            i += n;
        }
    }
}

// ---- decoding -----------------------------------------------------------------------------

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
    std::string out;
    const ByteMap& bm = byte_map();
    bool at_start = true;
    for (int32_t id : ids) {
        const std::string& text = token_text(id);
        const TokenType ty = types_[size_t(id)];
        if (ty == TokenType::Control) continue;
        if (model_ == Model::SentencePiece) {
            if (ty == TokenType::Byte && text.size() == 6) {
                out += char(std::stoi(text.substr(3, 2), nullptr, 16));
            } else {
                for (size_t i = 0; i < text.size();) {
                    if (text.compare(i, kSpmSpace.size(), kSpmSpace) == 0) {
                        // The space the encoder prefixed is not part of the text.
                        if (!(at_start && out.empty() && add_space_prefix_)) out += ' ';
                        i += kSpmSpace.size();
                    } else {
                        out += text[i++];
                    }
                }
            }
        } else if (ty == TokenType::UserDefined) {
            out += text;
        } else {
            for (size_t i = 0; i < text.size();) {
                const size_t n = utf8_len(text, i);
                auto b = bm.to_byte.find(decode_cp(text, i, n));
                if (b != bm.to_byte.end())
                    out += char(b->second);
                else
                    out.append(text, i, n);
                i += n;
            }
        }
        at_start = false;
    }
    return out;
}

} // namespace gfa
