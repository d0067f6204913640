// ggml-fa-run: generate text with a Llama-family GGUF model.
//
//   ggml-fa-run -m MODEL.gguf (-p PROMPT | --tokens 1,2,3) [-n 128] [options]
//
// Prints the prompt and the generated text, then the prompt and generation speeds
// (tokens/s). With --tokens the prompt is given as token ids (needed when the file has no
// vocabulary) and the generated ids are printed, comma-separated. --logits-out FILE writes the logits of
// every prompt position as raw f32, [n_prompt][n_vocab] row-major, for comparisons with other
// implementations. --profile prints where the decoding time went, per generated token.
#include "tools/cli.h"
#include "tools/sampling.h"

#include <ggml-fa/backend.h>
#include <ggml-fa/error.h>
#include <ggml-fa/model.h>
#include <ggml-fa/tokenizer.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

using namespace gfa;

namespace {

struct Options {
    std::string model_path, prompt, logits_out, backend = "cpu";
    std::vector<int32_t> tokens;
    bool have_tokens = false;
    int n_predict = 128;
    float temperature = 0.0f; // 0: greedy
    int top_k = 40;
    float top_p = 0.95f;
    uint64_t seed = 0;
    bool have_seed = false;
    int gpu_layers = -1; // -1: all of them when a GPU backend is chosen
    int64_t n_ctx = 0, n_batch = 256, decode_window = SessionOptions{}.decode_window_step;
    int n_threads = 0;
    Type kv_type = Type::F16;
    MatMulPrecision precision = MatMulPrecision::F32;
    FlashAttnPrecision attention_precision = FlashAttnPrecision::F32;
    bool ignore_eos = false, verbose = false, profile = false, warmup = false;
    bool pick_on_host = false;    // picks from logits copied to the host
    bool wait_each_token = false; // the host waits for each pick before the next step
};

void usage() {
    std::fprintf(stderr,
                 "usage: ggml-fa-run -m MODEL.gguf (-p PROMPT | --tokens ID,ID,...) [options]\n"
                 "  -n N               tokens to generate (default 128; 0: only run the prompt)\n"
                 "  --temp T           sampling temperature (default 0: greedy)\n"
                 "  --top-k K          keep the K most likely tokens (default 40; 0: all)\n"
                 "  --top-p P          keep the smallest set with probability >= P (default 0.95)\n"
                 "  --seed S           sampling seed (default: random); a token drawn at position p\n"
                 "                     depends on the seed, p and the logits alone\n"
                 "  --pick-on-host     copy the logits and pick on the host (by default the backend\n"
                 "                     holding the logits picks, and only the id comes back; the host\n"
                 "                     picks anyway when sampling with --top-k 0 or above 128)\n"
                 "  --wait-each-token  wait for each pick before queuing the next step (by default the\n"
                 "                     device passes each pick on by itself; for comparisons)\n"
                 "  --backend cpu|cuda|vulkan  where the weights live (default cpu)\n"
                 "  --gpu-layers N     blocks on the GPU backend (default -1: all)\n"
                 "  -c, --ctx N        KV cache length (default 0: min(training context, 4096)); grown\n"
                 "                     to the prompt plus -n where that is longer\n"
                 "  -b, --batch N      prompt tokens per graph (default 256)\n"
                 "  -t, --threads N    CPU threads (default 0: all cores)\n"
                 "  --kv-type T        f16 (default), f32 or q8_0\n"
                 "  --matmul-precision P  f32 (default), tf32, q8 or bf16: q8 rounds a prompt's columns\n"
                 "                     to 8 bits against quantized weights on the CPU, as decoding\n"
                 "                     does (faster prompts, logits about 1e-2 further from exact);\n"
                 "                     bf16 also multiplies f32/f16/bf16 weights as bf16 pairs\n"
                 "  --attention-precision P  f32 (default) or bf16: bf16 pair products in a prompt's\n"
                 "                     attention on CPUs with AVX512-BF16 (outputs about 3e-3 from exact)\n"
                 "  --decode-window N  decoding attends over cache windows grown N rows at a time, so\n"
                 "                     a step reuses the last graph (default 256; 0: exact, rebuilt)\n"
                 "  --logits-out FILE  write the prompt positions' logits (f32, [n_prompt][n_vocab])\n"
                 "  --ignore-eos       keep generating after the end-of-sequence token\n"
                 "  -v, --verbose      print the schedule and memory use\n"
                 "  --profile          print where decoding time goes, per generated token\n"
                 "  --warmup           run the prompt and one decoding step once, untimed, before the\n"
                 "                     timed run (kernels load and libraries set up outside the timing)\n");
}

Options parse(int argc, char** argv) {
    Options o;
    cli::Args args(argc, argv);
    using cli::kIntMax;
    while (args.next()) {
        const std::string a = args.option();
        if (a == "-m" || a == "--model")
            o.model_path = args.value();
        else if (a == "-p" || a == "--prompt")
            o.prompt = args.value();
        else if (a == "--tokens") {
            o.tokens = cli::token_ids(args.value());
            o.have_tokens = true;
        } else if (a == "-n" || a == "--n-predict")
            o.n_predict = int(args.integer(0, kIntMax));
        else if (a == "--temp") {
            o.temperature = args.real();
            if (o.temperature < 0.0f) fail("--temp must be >= 0 (0: greedy)");
        } else if (a == "--top-k")
            o.top_k = int(args.integer(0, kIntMax));
        else if (a == "--top-p")
            o.top_p = args.real();
        else if (a == "--seed") {
            o.seed = uint64_t(args.integer(0, INT64_MAX));
            o.have_seed = true;
        } else if (a == "--backend")
            o.backend = args.value();
        else if (a == "--gpu-layers" || a == "-ngl")
            o.gpu_layers = int(args.integer(-1, kIntMax)); // -1: all
        else if (a == "-c" || a == "--ctx")
            o.n_ctx = args.integer(0, kIntMax); // 0: the default
        else if (a == "-b" || a == "--batch")
            o.n_batch = args.integer(1, kIntMax);
        else if (a == "-t" || a == "--threads")
            o.n_threads = int(args.integer(0, 4096)); // 0: all cores
        else if (a == "--decode-window") {
            o.decode_window = args.integer(0, kIntMax);
        } else if (a == "--kv-type")
            o.kv_type = cli::kv_type(args.value());
        else if (a == "--matmul-precision")
            o.precision = cli::precision(args.value());
        else if (a == "--attention-precision")
            o.attention_precision = cli::attention_precision(args.value());
        else if (a == "--logits-out")
            o.logits_out = args.value();
        else if (a == "--ignore-eos")
            o.ignore_eos = true;
        else if (a == "-v" || a == "--verbose")
            o.verbose = true;
        else if (a == "--profile")
            o.profile = true;
        else if (a == "--pick-on-host")
            o.pick_on_host = true;
        else if (a == "--wait-each-token")
            o.wait_each_token = true;
        else if (a == "--warmup")
            o.warmup = true;
        else if (a == "-h" || a == "--help") {
            usage();
            std::exit(0);
        } else
            fail("unknown option " + a + " (see --help)");
    }
    if (o.model_path.empty()) fail("no model given (-m MODEL.gguf)");
    if (o.have_tokens == !o.prompt.empty()) fail("give either a prompt (-p) or token ids (--tokens)");
    if (o.top_p <= 0.0f || o.top_p > 1.0f) fail("--top-p must be in (0, 1]");
    return o;
}

double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// Decoding time per generated token, by phase. "other" is the rest of the loop (printing,
// detokenizing, the eval() call's own bookkeeping).
// Sampling runs once more than eval (for the first generated token); its total is shown.
void print_profile(const Session& session, int n_decoded, double t_gen, double sampling) {
    if (n_decoded == 0) {
        std::fprintf(stderr, "profile: no token was decoded\n");
        return;
    }
    const EvalProfile& p = session.profile();
    const double per = 1e3 / n_decoded; // ms per decoded token
    const double known = p.build + p.allocate + p.upload + p.submit + p.wait + p.readback + sampling;
    std::fprintf(
        stderr,
        "profile: %d decoded tokens, %.0f graph nodes each, %lld of %lld graphs reused, %lld steps fed "
        "on the device; ms per token (host time; a step fed on the device overlaps the one before):\n",
        n_decoded, double(p.nodes) / double(std::max<int64_t>(p.graphs, 1)), (long long)p.reused,
        (long long)p.graphs, (long long)p.fed_on_device);
    const std::pair<const char*, double> rows[] = {
        {"graph build", p.build},       {"scheduler plan/allocate", p.allocate},
        {"input upload", p.upload},     {"compute submit", p.submit},
        {"wait (synchronize)", p.wait}, {"readback (logits/id)", p.readback},
        {"sampling", sampling},         {"other", t_gen - known}};
    for (const auto& [name, seconds] : rows)
        std::fprintf(stderr, "  %-24s %8.3f  %5.1f%%\n", name, seconds * per, 100.0 * seconds / t_gen);
    std::fprintf(stderr, "  %-24s %8.3f\n", "total", t_gen * per);
    const std::string counters = session.describe_backend_counters();
    if (!counters.empty()) std::fprintf(stderr, "backend counters:\n%s", counters.c_str());
}

int run(int argc, char** argv) {
    const Options o = parse(argc, argv);

    ModelLoadOptions load;
    if (Device* d = cli::device_for_backend(o.backend); d != &cpu_device()) {
        load.gpu = d;
        load.gpu_layers = o.gpu_layers < 0 ? INT32_MAX : o.gpu_layers;
    } else if (o.gpu_layers > 0) {
        fail("--gpu-layers needs --backend cuda or vulkan");
    }
    auto t_load = std::chrono::steady_clock::now();
    std::unique_ptr<Model> model = Model::load(o.model_path, load);
    const ModelConfig& c = model->config();
    // The vocabulary, when the file carries one.
    std::optional<Tokenizer> tokenizer;
    if (model->file().metadata().find("tokenizer.ggml.tokens"))
        tokenizer = Tokenizer::from_gguf(model->file().metadata());
    std::fprintf(
        stderr,
        "model: %s, %lld layers, %lld heads (%lld kv) of %lld, vocab %lld, %.1f MiB, loaded in %.2f s"
        " (%d projection groups merged)\n",
        c.arch.c_str(), (long long)c.n_layer, (long long)c.n_head, (long long)c.n_head_kv,
        (long long)c.head_dim, (long long)c.n_vocab, double(model->weight_bytes()) / (1 << 20),
        seconds_since(t_load), model->merged_projections());
    if (!model->kept_on_host().empty())
        std::fprintf(
            stderr,
            "model: %zu matrices (%s, ...) stay in host memory: the GPU cannot multiply by their type, so "
            "their products run on the CPU\n",
            model->kept_on_host().size(), model->kept_on_host().front().c_str());

    std::vector<int32_t> prompt = o.tokens;
    if (!o.have_tokens) {
        if (!tokenizer)
            fail("the model file has no vocabulary (tokenizer.ggml.*); give the prompt as ids with --tokens");
        bool add_bos = tokenizer->bos() >= 0;
        if (const gguf::Value* v = model->file().metadata().find("tokenizer.ggml.add_bos_token"))
            add_bos = add_bos && v->as<bool>();
        prompt = tokenizer->encode(o.prompt, add_bos, true);
        if (prompt.empty()) fail("the prompt encodes to no tokens");
        if (o.verbose) {
            std::fprintf(stderr, "prompt tokens:");
            for (int32_t t : prompt) std::fprintf(stderr, " %d", t);
            std::fprintf(stderr, "\n");
        }
        std::fputs(o.prompt.c_str(), stdout);
    }

    SessionOptions so;
    so.n_ctx = o.n_ctx > 0 ? o.n_ctx : std::min<int64_t>(std::max<int64_t>(c.n_ctx_train, 1), 4096);
    so.n_ctx = std::max<int64_t>(so.n_ctx, int64_t(prompt.size()) + o.n_predict);
    so.n_batch = o.n_batch;
    so.n_threads = o.n_threads;
    so.kv_type = o.kv_type;
    so.matmul_precision = o.precision;
    so.attention_precision = o.attention_precision;
    so.decode_window_step = o.decode_window;
    so.log_fallbacks = o.verbose;
    Session session(*model, so);
    if (o.verbose)
        std::fprintf(stderr, "session: context %lld, KV cache %.1f MiB, compute buffers %.1f MiB\n",
                     (long long)session.n_ctx(), double(session.kv_bytes()) / (1 << 20),
                     double(session.compute_bytes()) / (1 << 20));

    // Warm-up: the first use of each kernel and library call pays one-time costs (module
    // loading, library handles, the first eager run before launch graphs); keep them out of
    // the figures. The cache is overwritten from position 0 afterwards.
    // The session draws with top_k 1 to 128 (where a GPU draws itself); every token (top_k 0)
    // or more candidates go through the host's sampler, which sorts only the prefix it needs.
    const bool pick_in_session =
        !o.pick_on_host && (o.temperature <= 0.0f || (o.top_k >= 1 && o.top_k <= 128));
    const Sampling sampling{.temperature = std::max(o.temperature, 0.0f),
                            .top_k = o.top_k,
                            .top_p = o.top_p,
                            .seed = o.have_seed ? o.seed : std::random_device{}()};
    if (o.warmup) {
        const int32_t one[1] = {prompt.back()};
        if (pick_in_session) { // the same graphs and transfers as the timed run
            const int32_t first = session.eval_pick(prompt, sampling);
            if (session.n_past() + 2 <= session.n_ctx())
                session.decode(first, 2, sampling, [](int32_t) { return true; });
        } else {
            session.eval(prompt);
            if (session.n_past() < session.n_ctx()) session.eval(one);
        }
        session.reset();
    }

    // Prompt. The session picks the next token where the logits are and returns the id alone
    // (Session::eval_pick), unless the prompt's logits are wanted.
    const bool all_logits = !o.logits_out.empty();
    int32_t next = -1; // the session's pick, when it made one
    std::vector<float> logits;
    auto t0 = std::chrono::steady_clock::now();
    if (pick_in_session && !all_logits)
        next = session.eval_pick(prompt, sampling);
    else
        logits = session.eval(prompt, all_logits);
    const double t_prompt = seconds_since(t0);
    if (o.verbose)
        std::fprintf(stderr, "schedule of the prompt graph:\n%s", session.describe_schedule().c_str());
    if (all_logits) {
        FILE* f = std::fopen(o.logits_out.c_str(), "wb");
        if (!f) fail("--logits-out: cannot open " + o.logits_out);
        const size_t written = std::fwrite(logits.data(), sizeof(float), logits.size(), f);
        std::fclose(f);
        if (written != logits.size()) fail("--logits-out: short write to " + o.logits_out);
    }
    std::vector<float> step; // the logits to sample the next token from
    if (next < 0) step.assign(logits.end() - std::ptrdiff_t(c.n_vocab), logits.end());

    // Generation.
    cli::Sampler sampler{o.temperature, o.top_k, o.top_p,
                         std::mt19937_64(o.have_seed ? o.seed : std::random_device{}())};
    std::vector<int32_t> generated;
    const bool print_ids = !tokenizer || o.have_tokens;
    int64_t eos = tokenizer ? tokenizer->eos() : -1;
    if (const gguf::Value* v = model->file().metadata().find("tokenizer.ggml.eos_token_id"); v && eos < 0)
        eos = v->as_int();
    session.reset_profile(); // the profile covers decoding only
    double t_sampling = 0;
    auto t1 = std::chrono::steady_clock::now();
    int n_decoded = 0;
    auto emit = [&](int32_t id) { // prints a pick; false where generation ends with it
        const bool first = generated.empty();
        generated.push_back(id);
        if (print_ids)
            std::printf("%s%d", first ? "" : ",", id);
        else
            std::fputs(tokenizer->decode({id}).c_str(), stdout);
        std::fflush(stdout);
        return (o.ignore_eos || id != eos) && int64_t(generated.size()) < o.n_predict;
    };
    if (next >= 0) {
        // Picks in the session: each goes on to the next step on the device, which never
        // waits for the host between tokens (Session::decode).
        if (o.n_predict > 0 && emit(next)) {
            if (!o.wait_each_token) {
                n_decoded = int(session.decode(next, o.n_predict - 1, sampling, emit));
            } else {
                do {
                    const int32_t one[1] = {next};
                    next = session.eval_pick(one, sampling);
                    ++n_decoded;
                } while (emit(next));
            }
        }
    } else {
        for (int i = 0; i < o.n_predict; ++i) {
            const auto t_sample = std::chrono::steady_clock::now();
            const int32_t id = sampler.sample(step.data(), c.n_vocab);
            t_sampling += seconds_since(t_sample);
            if (!emit(id)) break;
            const int32_t one[1] = {id};
            step = session.eval(one);
            ++n_decoded;
        }
    }
    const double t_gen = seconds_since(t1);
    if (o.n_predict > 0) std::printf("\n");
    std::fprintf(stderr, "prompt: %zu tokens in %.3f s (%.1f tokens/s)\n", prompt.size(), t_prompt,
                 double(prompt.size()) / t_prompt);
    if (n_decoded > 0)
        std::fprintf(stderr, "generation: %d tokens in %.3f s (%.1f tokens/s)\n", n_decoded, t_gen,
                     double(n_decoded) / t_gen);
    if (o.verbose)
        std::fprintf(stderr, "compute buffer allocations: %d (reserved once at session start)\n",
                     session.n_compute_allocations());
    if (o.profile) print_profile(session, n_decoded, t_gen, t_sampling);
    return 0;
}

} // namespace

int main(int argc, char** argv) {
    return gfa::cli::main_of("ggml-fa-run: error", run, argc, argv);
}
