// perplexity: how well a llama-family GGUF model predicts a text, measured as llama.cpp's
// llama-perplexity measures it, so the two can be compared on the same file and text (and
// quantized files against the model they came from).
//
//   perplexity -m MODEL.gguf -f TEXT [-c 512] [--chunks N] [--backend cpu|cuda|vulkan] [options]
//
// The text is tokenized with the file's vocabulary (a BOS token first when the vocabulary
// adds one) and cut into chunks of -c tokens. Each chunk runs from an empty cache, its first
// token replaced by BOS when the vocabulary adds one; the tokens of its second half are scored,
// each by the log-probability the model gave it from the tokens before. Prints the running
// perplexity after each chunk and the final estimate with its standard error.
#include "tools/cli.h"

#include <ggml-fa/backend.h>
#include <ggml-fa/error.h>
#include <ggml-fa/model.h>
#include <ggml-fa/tokenizer.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

using namespace gfa;

namespace {

struct Options {
    std::string model, text, backend = "cpu";
    int64_t n_ctx = 512, n_batch = 512, chunks = -1;
    int gpu_layers = -1, threads = 0;
    Type kv_type = Type::F16;
    MatMulPrecision precision = MatMulPrecision::F32;
};

void usage() {
    std::fprintf(stderr, "usage: perplexity -m MODEL.gguf -f TEXT [options]\n"
                         "  -c, --ctx N              tokens per chunk (default 512)\n"
                         "  -b, --batch N            tokens per graph (default 512)\n"
                         "  --chunks N               score the first N chunks only (default: all)\n"
                         "  --backend cpu|cuda|vulkan, --gpu-layers N   where the weights live\n"
                         "  --kv-type f16|f32|q8_0   the KV cache (default f16)\n"
                         "  --matmul-precision f32|tf32|q8|bf16   what products may give up for speed\n"
                         "  -t, --threads N          CPU threads (default: all cores)\n");
}

Options parse(int argc, char** argv) {
    Options o;
    cli::Args args(argc, argv);
    while (args.next()) {
        const std::string a = args.option();
        if (a == "-m" || a == "--model")
            o.model = args.value();
        else if (a == "-f" || a == "--file")
            o.text = args.value();
        else if (a == "-c" || a == "--ctx")
            o.n_ctx = args.integer(4, cli::kIntMax);
        else if (a == "-b" || a == "--batch")
            o.n_batch = args.integer(1, cli::kIntMax);
        else if (a == "--chunks")
            o.chunks = args.integer(-1, cli::kIntMax); // -1: all
        else if (a == "--backend")
            o.backend = args.value();
        else if (a == "--gpu-layers")
            o.gpu_layers = int(args.integer(-1, cli::kIntMax)); // -1: all
        else if (a == "-t" || a == "--threads")
            o.threads = int(args.integer(0, 4096)); // 0: all cores
        else if (a == "--kv-type")
            o.kv_type = cli::kv_type(args.value());
        else if (a == "--matmul-precision")
            o.precision = cli::precision(args.value());
        else if (a == "-h" || a == "--help") {
            usage();
            std::exit(0);
        } else {
            fail("unknown argument " + a + " (--help lists them)");
        }
    }
    if (o.model.empty() || o.text.empty())
        fail("-m MODEL.gguf and -f TEXT are required (--help lists the options)");
    return o;
}

int run(int argc, char** argv) {
    const Options o = parse(argc, argv);
    ModelLoadOptions load;
    if (Device* d = cli::device_for_backend(o.backend); d != &cpu_device()) {
        load.gpu = d;
        load.gpu_layers = o.gpu_layers < 0 ? INT32_MAX : o.gpu_layers;
    }
    std::unique_ptr<Model> model = Model::load(o.model, load);
    const Tokenizer tokenizer = Tokenizer::from_gguf(model->file().metadata());
    bool add_bos = tokenizer.bos() >= 0;
    if (const gguf::Value* v = model->file().metadata().find("tokenizer.ggml.add_bos_token"))
        add_bos = add_bos && v->as<bool>();

    std::ifstream in(o.text, std::ios::binary);
    if (!in) fail("-f " + o.text + ": cannot open the file");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto t_tok = std::chrono::steady_clock::now();
    const std::vector<int32_t> tokens = tokenizer.encode(text, add_bos, false);
    const double tok_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t_tok).count();
    int64_t n_chunks = int64_t(tokens.size()) / o.n_ctx;
    if (o.chunks >= 0) n_chunks = std::min(n_chunks, o.chunks);
    if (n_chunks == 0)
        fail(o.text + ": " + std::to_string(tokens.size()) + " tokens do not fill one chunk of " +
             std::to_string(o.n_ctx) + " (-c)");
    std::printf(
        "%s: %zu tokens (tokenized in %.2f s), %lld chunks of %lld, scoring the second half of each\n",
        o.text.c_str(), tokens.size(), tok_seconds, (long long)n_chunks, (long long)o.n_ctx);

    SessionOptions so;
    so.n_ctx = o.n_ctx;
    so.n_batch = std::min(o.n_batch, o.n_ctx);
    so.kv_type = o.kv_type;
    so.matmul_precision = o.precision;
    so.n_threads = o.threads;
    Session session(*model, so);
    const int64_t V = model->config().n_vocab, first = o.n_ctx / 2;
    double nll = 0.0, nll2 = 0.0; // sums of -log p and its square over scored tokens
    int64_t count = 0;
    double seconds = 0.0;
    for (int64_t c = 0; c < n_chunks; ++c) {
        std::vector<int32_t> chunk(tokens.begin() + c * o.n_ctx, tokens.begin() + (c + 1) * o.n_ctx);
        if (add_bos) chunk[0] = tokenizer.bos();
        session.reset();
        const auto t0 = std::chrono::steady_clock::now();
        const std::vector<float> logits = session.eval(chunk, true);
        seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        for (int64_t j = first; j + 1 < o.n_ctx; ++j) {
            const float* row = logits.data() + j * V;
            double max = row[0];
            for (int64_t v = 1; v < V; ++v) max = std::max(max, double(row[v]));
            double sum = 0.0;
            for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - max);
            const double loss = std::log(sum) + max - double(row[chunk[size_t(j + 1)]]);
            nll += loss;
            nll2 += loss * loss;
            ++count;
        }
        std::printf("[%lld]%.4f%s", (long long)(c + 1), std::exp(nll / double(count)),
                    c + 1 < n_chunks ? "," : "\n");
        std::fflush(stdout);
    }
    const double mean = nll / double(count);
    const double var =
        count > 1 ? (nll2 / double(count) - mean * mean) * double(count) / double(count - 1) : 0.0;
    const double ppl = std::exp(mean);
    std::printf("Final estimate: PPL = %.4f +/- %.5f (%lld tokens scored; %.1f tokens/s)\n", ppl,
                ppl * std::sqrt(std::max(var, 0.0) / double(count)), (long long)count,
                double(n_chunks * o.n_ctx) / seconds);
    return 0;
}

} // namespace

int main(int argc, char** argv) {
    return gfa::cli::main_of("perplexity", run, argc, argv);
}
