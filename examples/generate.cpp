// generate: the smallest program that runs a GGUF model through the library: load it (on a GPU
// when one is there), tokenize a prompt with the file's own vocabulary, and stream the
// generated text. The session picks each token where the logits are and feeds it to the next
// step itself (Session::decode), so the loop below only prints.
//
//   generate MODEL.gguf "prompt" [n_tokens] [temperature] [seed]
#include <ggml-fa/backend.h>
#include <ggml-fa/error.h>
#include <ggml-fa/gguf.h>
#include <ggml-fa/model.h>
#include <ggml-fa/tokenizer.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: generate MODEL.gguf \"prompt\" [n_tokens] [temperature] [seed]\n");
        return 2;
    }
    try {
        const int n_tokens = argc > 3 ? std::atoi(argv[3]) : 64;
        gfa::Sampling sampling; // greedy unless a temperature is given
        if (argc > 4) sampling.temperature = float(std::atof(argv[4]));
        if (argc > 5) sampling.seed = std::strtoull(argv[5], nullptr, 10);

        // Every block on the first GPU, if there is one.
        gfa::ModelLoadOptions load;
        for (gfa::Device* d : gfa::devices())
            if (d->kind() == gfa::DeviceKind::GPU && !load.gpu) load.gpu = d;
        if (load.gpu) load.gpu_layers = 1 << 20;
        const std::unique_ptr<gfa::Model> model = gfa::Model::load(argv[1], load);
        const gfa::Tokenizer tokenizer = gfa::Tokenizer::from_gguf(model->file().metadata());
        // A BOS token first where the vocabulary has one and the file does not say otherwise.
        bool add_bos = tokenizer.bos() >= 0;
        if (const gfa::gguf::Value* v = model->file().metadata().find("tokenizer.ggml.add_bos_token"))
            add_bos = add_bos && v->as<bool>();
        const std::vector<int32_t> prompt = tokenizer.encode(argv[2], add_bos);
        if (prompt.empty()) throw gfa::Error("the prompt has no tokens");

        // The model's training context (at most 4096), or longer where prompt and output need it.
        gfa::SessionOptions options;
        options.n_ctx =
            std::max<int64_t>(std::min<int64_t>(std::max<int64_t>(model->config().n_ctx_train, 1), 4096),
                              int64_t(prompt.size()) + n_tokens);
        gfa::Session session(*model, options);

        std::fputs(argv[2], stdout);
        int32_t next = session.eval_pick(prompt, sampling); // the prompt's next token
        int printed = 0;
        auto print = [&](int32_t id) {
            std::fputs(tokenizer.decode({id}).c_str(), stdout);
            std::fflush(stdout);
            return ++printed < n_tokens && id != tokenizer.eos();
        };
        if (n_tokens > 0 && print(next)) session.decode(next, n_tokens - 1, sampling, print);
        std::printf("\n");
        return 0;
    } catch (const gfa::Error& e) {
        std::fprintf(stderr, "generate: %s\n", e.what());
        return 1;
    }
}
