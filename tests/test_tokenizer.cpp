// Hand-made vocabularies; agreement with the reference tokenizers on trained vocabularies is
// checked by tests/interop/tokenizer_interop.py.
#include <catch2/catch.hpp>

#include <ggml-fa/error.h>
#include <ggml-fa/gguf.h>
#include <ggml-fa/tokenizer.h>

using namespace gfa;
using gguf::Array;
using gguf::ValueType;

namespace {

gguf::Metadata spm_vocab() {
    // ids: 0 <unk>, 1 <s>, 2 </s>, 3 ▁, 4 a, 5 b, 6 ▁a, 7 ab, 8 ▁ab, 9 <0x63> ("c")
    const char* sp = "\xE2\x96\x81";
    gguf::Metadata m;
    m.set("tokenizer.ggml.model", "llama");
    m.set("tokenizer.ggml.tokens", Array{ValueType::String,
                                         {"<unk>", "<s>", "</s>", sp, "a", "b", std::string(sp) + "a", "ab",
                                          std::string(sp) + "ab", "<0x63>"}});
    // "ab" outranks "▁a", so "▁ab" forms as ▁ + ab -> ▁ab.
    m.set("tokenizer.ggml.scores",
          Array{ValueType::F32, {0.f, 0.f, 0.f, -1.f, -1.f, -1.f, -3.f, -2.f, -4.f, 0.f}});
    m.set("tokenizer.ggml.token_type", Array{ValueType::I32,
                                             {int32_t(2), int32_t(3), int32_t(3), int32_t(1), int32_t(1),
                                              int32_t(1), int32_t(1), int32_t(1), int32_t(1), int32_t(6)}});
    m.set("tokenizer.ggml.bos_token_id", uint32_t(1));
    m.set("tokenizer.ggml.eos_token_id", uint32_t(2));
    m.set("tokenizer.ggml.unknown_token_id", uint32_t(0));
    return m;
}

} // namespace

TEST_CASE("SentencePiece-style tokenizer merges by score and falls back to bytes", "[tokenizer]") {
    const Tokenizer tok = Tokenizer::from_gguf(spm_vocab());
    CHECK(tok.encode("ab") == std::vector<int32_t>{8});
    CHECK(tok.encode("ab", true) == std::vector<int32_t>{1, 8});
    CHECK(tok.encode("a b") == std::vector<int32_t>{6, 3, 5});
    CHECK(tok.encode("abc") == std::vector<int32_t>{8, 9}); // c: byte token
    CHECK(tok.encode("ad") == std::vector<int32_t>{6, 0});  // d: no byte token, unknown
    CHECK(tok.decode({1, 8, 9, 3, 5, 2}) == "abc b");
    CHECK(tok.encode("</s>a", false, true) == std::vector<int32_t>{2, 4});
    CHECK_THROWS_AS(tok.token_text(10), Error);
}

TEST_CASE("Tokenizer metadata errors name the key", "[tokenizer]") {
    gguf::Metadata m = spm_vocab();
    m.set("tokenizer.ggml.scores", Array{ValueType::F32, {0.f}});
    CHECK_THROWS_WITH(Tokenizer::from_gguf(m), Catch::Contains("tokenizer.ggml.scores has 1 entries"));
    m = spm_vocab();
    m.set("tokenizer.ggml.bos_token_id", uint32_t(99));
    CHECK_THROWS_WITH(Tokenizer::from_gguf(m), Catch::Contains("bos_token_id = 99"));
    m = spm_vocab();
    m.set("tokenizer.ggml.model", "bert");
    CHECK_THROWS_WITH(Tokenizer::from_gguf(m), Catch::Contains("'bert' is not supported"));
    m.set("tokenizer.ggml.model", "no_vocab"); // what convert writes without tokenizer.json
    CHECK_THROWS_WITH(Tokenizer::from_gguf(m), Catch::Contains("has no vocabulary"));
    m = spm_vocab();
    m.set("tokenizer.ggml.model", "gpt2");
    CHECK_THROWS_WITH(Tokenizer::from_gguf(m), Catch::Contains("tokenizer.ggml.merges"));
    m.erase("tokenizer.ggml.tokens");
    CHECK_THROWS_WITH(Tokenizer::from_gguf(m), Catch::Contains("tokenizer.ggml.tokens"));
}
