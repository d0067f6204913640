// tokenize: runs the tokenizer stored in a GGUF file.
//
//   tokenize MODEL.gguf [--bos] [--special] [--cases FILE]
//
// Reads text from stdin (or, with --cases, a file of NUL-separated texts) and prints, per
// text, a line of token ids and a line with the hex bytes of their decoding.
#include <ggml-fa/error.h>
#include <ggml-fa/gguf.h>
#include <ggml-fa/tokenizer.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

using namespace gfa;

int main(int argc, char** argv) {
    std::vector<std::string> args(argv + 1, argv + argc);
    if (args.empty()) {
        std::fprintf(stderr, "usage: tokenize MODEL.gguf [--bos] [--special] [--cases FILE]\n");
        return 2;
    }
    bool bos = false, special = false;
    std::string cases_path;
    for (size_t i = 1; i < args.size(); ++i) {
        if (args[i] == "--bos")
            bos = true;
        else if (args[i] == "--special")
            special = true;
        else if (args[i] == "--cases" && i + 1 < args.size())
            cases_path = args[++i];
        else {
            std::fprintf(stderr, "tokenize: unknown argument %s\n", args[i].c_str());
            return 2;
        }
    }
    try {
        const Tokenizer tok = Tokenizer::from_gguf(gguf::File::open(args[0]).metadata());
        std::string input;
        if (cases_path.empty()) {
            input.assign(std::istreambuf_iterator<char>(std::cin), {});
        } else {
            std::ifstream f(cases_path, std::ios::binary);
            if (!f) fail("cannot read " + cases_path);
            input.assign(std::istreambuf_iterator<char>(f), {});
        }
        std::vector<std::string> texts;
        if (cases_path.empty())
            texts.push_back(input);
        else
            for (size_t start = 0; start <= input.size();) {
                size_t end = input.find('\0', start);
                if (end == std::string::npos) end = input.size();
                texts.push_back(input.substr(start, end - start));
                start = end + 1;
            }
        for (const std::string& text : texts) {
            const std::vector<int32_t> ids = tok.encode(text, bos, special);
            std::string line;
            for (size_t i = 0; i < ids.size(); ++i) {
                if (i) line += ' ';
                line += std::to_string(ids[i]);
            }
            std::string hex;
            char buf[4];
            for (unsigned char c : tok.decode(ids)) {
                std::snprintf(buf, sizeof buf, "%02x", c);
                hex += buf;
            }
            std::printf("%s\n%s\n", line.c_str(), hex.c_str());
        }
    } catch (const Error& e) {
        std::fprintf(stderr, "tokenize: %s\n", e.what());
        return 1;
    }
    return 0;
}
