// Text <-> token ids from the vocabulary stored in a GGUF file's metadata.
//
// Two models, chosen by tokenizer.ggml.model:
//   "llama": SentencePiece-style. Spaces become U+2581, a space is prefixed
//            (tokenizer.ggml.add_space_prefix, default true), then adjacent pieces are merged
//            greedily by the score of the merged piece (tokenizer.ggml.scores); characters
//            left without a piece fall back to <0xXX> byte tokens.
//   "gpt2":  byte-level BPE. Text is split by the pre-tokenizer pattern of llama-3 style
//            models, each word's bytes are mapped to printable characters, and
//            tokenizer.ggml.merges (rank = position) are applied lowest rank first.
// Control and user-defined tokens (tokenizer.ggml.token_type 3 and 4) are matched literally
// in the input when special-token parsing is on.
#pragma once

#include <ggml-fa/gguf.h>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace gfa {

class Tokenizer {
  public:
    enum class Model { SentencePiece, BytePairGpt2 };
    // How byte-level BPE splits text into words before merging (tokenizer.ggml.pre): the
    // llama-3 pattern ("llama-bpe"), Qwen2's (the same with one digit per word: "qwen2",
    // "deepseek-r1-qwen"), GPT-2's ("gpt-2", "phi-2"), GPT-2's after splitting off every
    // digit ("smollm"), or Mistral's tekken (words split by letter case: "tekken").
    enum class PreSplit { Llama3, Qwen2, Gpt2, Gpt2Digits, Tekken };
    // Token kinds, numbered as in tokenizer.ggml.token_type.
    enum class TokenType : int32_t {
        Normal = 1,
        Unknown = 2,
        Control = 3,
        UserDefined = 4,
        Unused = 5,
        Byte = 6
    };

    // Reads tokenizer.ggml.*; a gfa::Error names a missing or malformed key.
    static Tokenizer from_gguf(const gguf::Metadata& metadata);
    // Writes the tokenizer.ggml.* keys of a byte-level vocabulary into `metadata`: 256
    // tokens, token i being byte i ("gpt2" model, no merges, no special tokens). Any text
    // encodes to its bytes, and llama.cpp reads the same vocabulary. For models trained
    // from scratch on raw text (the train program).
    static void write_byte_vocabulary(gguf::Metadata& metadata);

    std::vector<int32_t> encode(std::string_view text, bool add_bos = false,
                                bool parse_special = false) const;
    // Control tokens decode to nothing; byte tokens to their byte.
    std::string decode(const std::vector<int32_t>& ids) const;

    Model model() const { return model_; }
    PreSplit pre_split() const { return pre_split_; }
    size_t vocab_size() const { return tokens_.size(); }
    const std::string& token_text(int32_t id) const;
    TokenType token_type(int32_t id) const;
    int32_t bos() const { return bos_; }
    int32_t eos() const { return eos_; }
    int32_t unk() const { return unk_; }

  private:
    void encode_spm(std::string_view text, std::vector<int32_t>& out) const;
    void encode_bpe(std::string_view text, std::vector<int32_t>& out) const;
    void bpe_word(const std::string& word, std::vector<int32_t>& out) const;
    int32_t find(std::string_view piece) const;

    Model model_ = Model::SentencePiece;
    PreSplit pre_split_ = PreSplit::Llama3;
    std::vector<std::string> tokens_;
    std::vector<float> scores_;
    std::vector<TokenType> types_;
    std::unordered_map<std::string, int32_t> ids_;
    std::unordered_map<std::string, int32_t> merge_ranks_; // "left right" -> rank
    std::vector<int32_t> specials_;                        // longest text first
    std::array<int32_t, 256> byte_tokens_{};
    int32_t bos_ = -1, eos_ = -1, unk_ = -1;
    bool add_space_prefix_ = true;
};

} // namespace gfa
