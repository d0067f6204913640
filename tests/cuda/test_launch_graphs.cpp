// CUDA graphs in the CUDA backend: node lists that repeat exactly are captured once and then
// replayed, and the graph of a list that moved in memory is updated in place. Every run is
// compared with an eager run (GFA_CUDA_GRAPHS=0) bit for bit and with the CPU within
// tolerance, inputs change between replays, and the backend's counters prove the graphs
// were really used.
#include "op_check.h"
#include "reference.h"

#include <ggml-fa/alloc.h>
#include <ggml-fa/backend.h>
#include <ggml-fa/gguf.h>
#include <ggml-fa/model.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <vector>

using namespace gfa;

namespace {

Device* cuda0() {
    Device* d = find_device("CUDA0");
    REQUIRE(d != nullptr);
    return d;
}

// Sets an environment switch (GFA_CUDA_GRAPHS, GFA_CUDA_FUSION, GFA_CUDA_EARLY_LAUNCH) to 1
// or 0 for the scope; backends read the first two when they are created, the last at every
// kernel launch.
class EnvSetting {
  public:
    EnvSetting(const char* name, bool on) : EnvSetting(name, on ? "1" : "0") {}
    EnvSetting(const char* name, const char* value) : name_(name) {
        if (const char* v = std::getenv(name)) previous_ = v;
        setenv(name, value, 1);
    }
    ~EnvSetting() {
        if (previous_)
            setenv(name_, previous_->c_str(), 1);
        else
            unsetenv(name_);
    }
    EnvSetting(const EnvSetting&) = delete;
    EnvSetting& operator=(const EnvSetting&) = delete;

  private:
    const char* name_;
    std::optional<std::string> previous_;
};

// A CUDA backend created while the switch `name` is on or off.
std::unique_ptr<Backend> backend_with(const char* name, bool on) {
    EnvSetting setting(name, on);
    return cuda0()->create_backend();
}

int64_t counter(const std::vector<std::pair<std::string, int64_t>>& counters, const std::string& name) {
    for (const auto& [n, v] : counters)
        if (n == name) return v;
    FAIL("the backend keeps no counter " << name);
    return -1;
}

// A counter from Session::describe_backend_counters() ("CUDA0: name value name value ...").
int64_t counter(const std::string& described, const std::string& name) {
    const size_t at = described.find(" " + name + " ");
    if (at == std::string::npos) {
        FAIL("no counter " << name << " in: " << described);
        return -1;
    }
    return std::stoll(described.substr(at + name.size() + 2));
}

bool bit_identical(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

bool all_finite(const std::vector<float>& v) {
    for (float x : v)
        if (!std::isfinite(x)) return false;
    return true;
}

// ---- a block run directly on the backend, with fresh memory every call ---------------------

struct Block {
    Context ctx{ContextParams{.alloc_data = true}}; // host copies for the reference
    Tensor *x = nullptr, *w = nullptr, *gain = nullptr, *out = nullptr;
    Graph graph;
};

// rms_norm, a gain, an f16 matrix product (cuBLAS, scratch packing), then a chain of
// element-wise ops: 20 nodes, enough for the backend to use a graph.
std::unique_ptr<Block> make_block(int64_t K, int64_t M, int64_t N) {
    auto b = std::make_unique<Block>();
    b->x = b->ctx.new_tensor(Type::F32, {K, N});
    b->w = b->ctx.new_tensor(Type::F16, {K, M});
    b->gain = b->ctx.new_tensor(Type::F32, {K});
    set_name(b->x, "x");
    for (Tensor* t : {b->x, b->w, b->gain}) test::fill_uniform(t);
    Tensor* h = mul(b->ctx, rms_norm(b->ctx, b->x, 1e-5f), b->gain);
    Tensor* y = mul_mat(b->ctx, b->w, h);
    Tensor* skip = y;
    for (int i = 0; i < 16; ++i) {
        switch (i % 4) {
        case 0:
            y = silu(b->ctx, y);
            break;
        case 1:
            y = scale(b->ctx, y, 0.75f, 0.125f);
            break;
        case 2:
            y = add(b->ctx, y, skip);
            break;
        default:
            y = mul(b->ctx, y, scale(b->ctx, skip, 0.5f));
            break;
        }
    }
    b->out = y;
    b->graph = build_forward(b->out);
    return b;
}

// The tensors of a graph that need memory of their own, and the views among its tensors.
struct Layout {
    std::vector<Tensor*> owners, views;
    size_t bytes = 0; // for the owners, each aligned
};

Layout layout_of(const Graph& g) {
    const size_t align = cuda0()->buffer_type()->alignment();
    Layout l;
    for (const auto* list : {&g.leafs(), &g.nodes()})
        for (Tensor* t : *list) {
            // Weights the caller placed in a weights buffer (in the GPU's layout) stay there.
            if (t->buffer && t->buffer->usage() == BufferUsage::Weights) continue;
            (t->view_src ? l.views : l.owners).push_back(t);
        }
    for (Tensor* v : l.views)
        if (!g.contains(v->view_src) &&
            std::find(l.owners.begin(), l.owners.end(), v->view_src) == l.owners.end())
            l.owners.push_back(v->view_src);
    for (Tensor* t : l.owners) l.bytes += (t->alloc_bytes() + align - 1) / align * align;
    return l;
}

// Places every tensor of the graph in `buf`, `shift` bytes in, uploads the leaves, poisons
// the nodes, computes and returns `out`. The host placement is restored afterwards for the
// reference.
std::vector<float> run_graph(Backend& backend, const Graph& g, Tensor* out, Buffer& buf, size_t shift) {
    const size_t align = cuda0()->buffer_type()->alignment();
    const Layout l = layout_of(g);
    REQUIRE(shift + l.bytes <= buf.size());
    struct Saved {
        Tensor* t;
        void* data;
        Buffer* buffer;
    };
    std::vector<Saved> saved;
    size_t offset = shift;
    for (Tensor* t : l.owners) {
        saved.push_back({t, t->data, t->buffer});
        std::vector<std::byte> host;
        if (t->op == Op::None && t->data) {
            host.resize(t->alloc_bytes());
            tensor_get(t, host.data(), 0, host.size());
        }
        buf.place(t, offset);
        offset += (t->alloc_bytes() + align - 1) / align * align;
        if (!host.empty()) tensor_set(t, host.data(), 0, host.size());
    }
    for (Tensor* v : l.views) {
        saved.push_back({v, v->data, v->buffer});
        place_view(v);
    }
    test::poison_nodes(g);
    backend.compute(g.nodes());
    backend.synchronize();
    std::vector<float> result = tensor_get_f32(out);
    for (auto it = saved.rbegin(); it != saved.rend(); ++it) {
        it->t->data = it->data;
        it->t->buffer = it->buffer;
    }
    return result;
}

// The same in a buffer of its own.
std::vector<float> run_graph(Backend& backend, const Graph& g, Tensor* out, size_t shift) {
    std::unique_ptr<Buffer> buf = cuda0()->buffer_type()->allocate(shift + layout_of(g).bytes);
    return run_graph(backend, g, out, *buf, shift);
}

// Computes g up to `node` with fusion on and off: the fused run must take `launches` fused
// launches, write every element of the (poisoned) node and match the separate kernels bit for
// bit. Returns the fused result, for the caller's check against the reference.
std::vector<float> fused_as_separate(Backend& fused, Backend& separate, const Graph& g, Tensor* node,
                                     int64_t launches) {
    const int64_t before = counter(fused.counters(), "fused_launches");
    std::vector<float> got = run_graph(fused, g, node, 0);
    const std::vector<float> want = run_graph(separate, g, node, 0);
    CHECK(counter(fused.counters(), "fused_launches") - before == launches);
    CHECK(all_finite(got));
    CHECK(bit_identical(got, want));
    return got;
}

// ---- a model decoded token by token -------------------------------------------------------

// A random llama-shaped model with f16 matrices: head size 64, grouped-query attention.
std::string write_f16_model(uint32_t seed) {
    const int64_t vocab = 97, embd = 256, ff = 352, layers = 3, heads = 4, heads_kv = 2, D = 64;
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    gguf::Writer w;
    w.set("general.architecture", std::string("llama"));
    w.set("llama.context_length", uint32_t(512));
    w.set("llama.embedding_length", uint32_t(embd));
    w.set("llama.block_count", uint32_t(layers));
    w.set("llama.feed_forward_length", uint32_t(ff));
    w.set("llama.attention.head_count", uint32_t(heads));
    w.set("llama.attention.head_count_kv", uint32_t(heads_kv));
    w.set("llama.attention.layer_norm_rms_epsilon", 1e-5f);
    w.set("llama.rope.freq_base", 10000.0f);
    auto add = [&](const std::string& name, std::vector<int64_t> dims, float scale, float offset, bool f16) {
        int64_t n = 1;
        for (int64_t d : dims) n *= d;
        std::vector<float> v(static_cast<size_t>(n));
        for (float& x : v) x = offset + scale * normal(rng);
        if (!f16) {
            w.add_tensor(name, Type::F32, dims, v.data(), v.size() * sizeof(float));
            return;
        }
        std::vector<uint16_t> h(v.size());
        for (size_t i = 0; i < v.size(); ++i) h[i] = fp32_to_fp16(v[i]);
        w.add_tensor(name, Type::F16, dims, h.data(), h.size() * sizeof(uint16_t));
    };
    const float s = 1.0f / std::sqrt(float(embd));
    add("token_embd.weight", {embd, vocab}, 1.0f, 0.0f, false);
    add("output_norm.weight", {embd}, 0.1f, 1.0f, false);
    add("output.weight", {embd, vocab}, s, 0.0f, true);
    for (int64_t l = 0; l < layers; ++l) {
        const std::string b = "blk." + std::to_string(l) + ".";
        add(b + "attn_norm.weight", {embd}, 0.1f, 1.0f, false);
        add(b + "attn_q.weight", {embd, heads * D}, 2 * s, 0.0f, true);
        add(b + "attn_k.weight", {embd, heads_kv * D}, 2 * s, 0.0f, true);
        add(b + "attn_v.weight", {embd, heads_kv * D}, s, 0.0f, true);
        add(b + "attn_output.weight", {heads * D, embd}, 1.0f / std::sqrt(float(heads * D)), 0.0f, true);
        add(b + "ffn_norm.weight", {embd}, 0.1f, 1.0f, false);
        add(b + "ffn_gate.weight", {embd, ff}, s, 0.0f, true);
        add(b + "ffn_up.weight", {embd, ff}, s, 0.0f, true);
        add(b + "ffn_down.weight", {ff, embd}, 1.0f / std::sqrt(float(ff)), 0.0f, true);
    }
    const std::string path =
        (std::filesystem::temp_directory_path() /
         ("gfa-graphs-model-" + std::to_string(seed) + "-" + std::to_string(rng()) + ".gguf"))
            .string();
    w.write(path);
    return path;
}

struct DecodeRun {
    std::vector<std::vector<float>> logits; // per eval
    std::string counters;
    int64_t reused = 0; // evals that ran the session's previous graph again
};

// A prompt, then `steps` evals of one token, every fifth of two tokens (a second kind of
// graph, so the backend keeps two). The tokens are fixed, not sampled, so every
// run sees the same inputs.
DecodeRun decode(const std::string& path, bool on_cuda, const std::vector<int32_t>& prompt,
                 const std::vector<int32_t>& stream, int steps) {
    ModelLoadOptions load;
    if (on_cuda) {
        load.gpu = cuda0();
        load.gpu_layers = 1000; // every block and the output head
    }
    std::unique_ptr<Model> model = Model::load(path, load);
    SessionOptions so;
    so.n_ctx = 256;
    so.n_batch = 16;
    so.n_threads = 2;
    so.decode_window_step = 48; // windows of 48, 96 and 144 rows over the run
    Session session(*model, so);
    DecodeRun run;
    run.logits.push_back(session.eval(prompt));
    size_t next = 0;
    for (int i = 0; i < steps; ++i) {
        const size_t n = i % 5 == 4 ? 2 : 1;
        std::vector<int32_t> tokens(stream.begin() + std::ptrdiff_t(next),
                                    stream.begin() + std::ptrdiff_t(next + n));
        next += n;
        run.logits.push_back(session.eval(tokens));
    }
    run.counters = session.describe_backend_counters();
    run.reused = session.profile().reused;
    return run;
}

} // namespace

TEST_CASE("CUDA graphs: repeated node lists replay with new inputs, moved ones are captured again",
          "[cuda][graphs]") {
    INFO("seed " << test::seed());
    const std::unique_ptr<Backend> graphs = backend_with("GFA_CUDA_GRAPHS", true);
    const std::unique_ptr<Backend> eager = backend_with("GFA_CUDA_GRAPHS", false);
    REQUIRE(counter(graphs->counters(), "graphs_enabled") == 1);
    REQUIRE(counter(eager->counters(), "graphs_enabled") == 0);

    // Two shapes in turn, each in memory of its own: two executable graphs.
    std::unique_ptr<Block> blocks[2] = {make_block(96, 77, 3), make_block(96, 77, 5)};
    std::unique_ptr<Buffer> memory[2];
    for (int i = 0; i < 2; ++i)
        memory[i] = cuda0()->buffer_type()->allocate(4096 + layout_of(blocks[i]->graph).bytes);
    // Rounds 0-5 in place; from round 6 the tensors sit 512 bytes further in.
    const int rounds = 9;
    for (int round = 0; round < rounds; ++round)
        for (int i = 0; i < 2; ++i) {
            Block& b = *blocks[i];
            INFO("round " << round << ", columns " << b.x->ne[1]);
            // New inputs every round: a graph replaying stale data would show.
            test::fill_uniform(b.x);
            const std::vector<double> expected = ref::evaluate(b.graph, b.out);
            const std::vector<float> got =
                run_graph(*graphs, b.graph, b.out, *memory[i], round < 6 ? 0 : 512);
            const std::vector<float> want = run_graph(*eager, b.graph, b.out, 256);
            CHECK(all_finite(got));
            CHECK(bit_identical(got, want));
            const double err = test::rel_error(got, expected);
            INFO("relative error against the reference " << err);
            CHECK(err <= 5e-3); // f16 weights and an f16 copy of the activations
        }
    const auto c = graphs->counters();
    INFO("eager " << counter(c, "eager_runs") << ", captures " << counter(c, "graph_captures") << ", replays "
                  << counter(c, "graph_replays"));
    CHECK(counter(c, "capture_failures") == 0);
    CHECK(counter(c, "eager_runs") + counter(c, "graph_captures") + counter(c, "graph_replays") ==
          2 * rounds);
    // Per block: round 0 and round 6 eager (new lists), rounds 1 and 7 captured, the rest
    // replayed; scratch memory growing in round 0 may cost one more eager run.
    CHECK(counter(c, "graph_replays") >= 2 * (rounds - 4) - 2);
    CHECK(counter(c, "graph_captures") >= 4);
    CHECK(counter(c, "graph_instantiations") >= 2);
    CHECK(counter(c, "graph_updates") >= 1); // the moved lists: same shape, new pointers
    CHECK(counter(eager->counters(), "graph_launches") == 0);
}

// A list handed over again unchanged reuses the last call's checks, fusions and fingerprints
// (decoding steps); anything a kernel reads that changes in place (here a scale node's
// parameters, then a source's memory) must be seen. Every run is compared with the reference.
TEST_CASE("CUDA backend: a repeated node list is checked once, a changed parameter or pointer is seen",
          "[cuda][graphs]") {
    INFO("seed " << test::seed());
    for (const bool graphs_on : {true, false}) {
        INFO("graphs " << (graphs_on ? "on" : "off"));
        const std::unique_ptr<Backend> backend = backend_with("GFA_CUDA_GRAPHS", graphs_on);
        std::unique_ptr<Block> b = make_block(64, 45, 3);
        Tensor* scaled = nullptr; // the first scale node of the chain
        for (Tensor* n : b->graph.nodes())
            if (n->op == Op::Scale && !scaled) scaled = n;
        REQUIRE(scaled != nullptr);
        std::unique_ptr<Buffer> memory = cuda0()->buffer_type()->allocate(1024 + layout_of(b->graph).bytes);
        for (int round = 0; round < 8; ++round) {
            INFO("round " << round);
            if (round == 4) scaled->set_params(ScaleParams{-1.5f, 0.25f}); // in place: same list otherwise
            test::fill_uniform(b->x);
            const std::vector<double> expected = ref::evaluate(b->graph, b->out);
            const std::vector<float> got =
                run_graph(*backend, b->graph, b->out, *memory, round < 6 ? 0 : 512);
            CHECK(all_finite(got));
            const double err = test::rel_error(got, expected);
            INFO("relative error against the reference " << err);
            CHECK(err <= 5e-3);
        }
    }
}

TEST_CASE("CUDA graphs: decoding a model, graphs on and off agree bit for bit and match the CPU",
          "[cuda][graphs][model]") {
    const uint32_t seed = test::seed();
    INFO("seed " << seed);
    const std::string path = write_f16_model(seed);
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int32_t> token(0, 96);
    std::vector<int32_t> prompt(7), stream(160);
    for (int32_t& t : prompt) t = token(rng);
    for (int32_t& t : stream) t = token(rng);
    // Enough steps for the KV length (past 100) to cross two attention windows and the
    // attention kernel's key tiles, which changes its split-KV plan.
    const int steps = 80;

    DecodeRun with_graphs, without, plain_launches, cpu;
    {
        EnvSetting on("GFA_CUDA_GRAPHS", true);
        with_graphs = decode(path, true, prompt, stream, steps);
    }
    {
        EnvSetting off("GFA_CUDA_GRAPHS", false);
        without = decode(path, true, prompt, stream, steps);
    }
    {
        // Early launch (early_launch.cuh) off: every kernel waits for the one in front the
        // plain way. Graphs on and off above both launched early.
        EnvSetting on("GFA_CUDA_GRAPHS", true);
        EnvSetting off("GFA_CUDA_EARLY_LAUNCH", false);
        plain_launches = decode(path, true, prompt, stream, steps);
    }
    cpu = decode(path, false, prompt, stream, steps);
    std::filesystem::remove(path);

    INFO("graphs on: " << with_graphs.counters);
    INFO("graphs off: " << without.counters);
    REQUIRE(with_graphs.logits.size() == cpu.logits.size());
    REQUIRE(without.logits.size() == cpu.logits.size());
    REQUIRE(plain_launches.logits.size() == cpu.logits.size());
    for (size_t i = 0; i < cpu.logits.size(); ++i) {
        INFO("eval " << i);
        CHECK(all_finite(with_graphs.logits[i]));
        CHECK(bit_identical(with_graphs.logits[i], without.logits[i]));
        CHECK(bit_identical(with_graphs.logits[i], plain_launches.logits[i]));
        const std::vector<double> ref(cpu.logits[i].begin(), cpu.logits[i].end());
        const double err = test::rel_error(with_graphs.logits[i], ref);
        INFO("relative error against the CPU " << err);
        CHECK(err <= 1e-2); // f16 weights and KV cache, different summation orders
    }
    CHECK(counter(with_graphs.counters, "graphs_enabled") == 1);
    CHECK(counter(with_graphs.counters, "early_launch_enabled") == 1);
    CHECK(counter(plain_launches.counters, "early_launch_enabled") == 0);
    CHECK(counter(with_graphs.counters, "capture_failures") == 0);
    CHECK(counter(plain_launches.counters, "capture_failures") == 0);
    // The session keeps its last graph: of every five evals (1, 1, 1, 1, 2 tokens) three
    // reuse it, less a rebuild per window. Rebuilt graphs of a kind seen before land in the
    // same memory, so the backend replays those as well.
    INFO("reused graphs: " << with_graphs.reused);
    CHECK(with_graphs.reused >= steps * 3 / 5 - 6);
    CHECK(counter(with_graphs.counters, "graph_replays") >= steps / 2);
    CHECK(counter(with_graphs.counters, "graph_captures") >= 2);
    CHECK(counter(without.counters, "graphs_enabled") == 0);
    CHECK(counter(without.counters, "graph_launches") == 0);
}

TEST_CASE("CUDA fused add -> rms_norm -> mul: every node written, bit for bit the separate kernels",
          "[cuda][fusion]") {
    INFO("seed " << test::seed());
    const std::unique_ptr<Backend> fused = backend_with("GFA_CUDA_FUSION", true);
    const std::unique_ptr<Backend> separate = backend_with("GFA_CUDA_FUSION", false);
    REQUIRE(counter(fused->counters(), "fusion_enabled") == 1);
    REQUIRE(counter(separate->counters(), "fusion_enabled") == 0);
    // 5000 and 5001: longer than one pass of the kernel's register chunks (in blocks of 1024
    // and of 256 threads), so the second pass reads the sums back from memory.
    for (const int64_t n : {1, 333, 2048, 5000, 5001}) {
        // 10 rows take blocks of up to 256 threads, 6 rows (a few, as decoding has) up to 1024.
        const int64_t rows = n % 2 == 1 ? 5 : 3;
        INFO("row length " << n << ", " << 2 * rows << " rows");
        Context ctx{ContextParams{.alloc_data = true}};
        Tensor* x = ctx.new_tensor(Type::F32, {n, rows, 2});
        Tensor* r = ctx.new_tensor(Type::F32, {n, rows, 2});
        Tensor* w1 = ctx.new_tensor(Type::F32, {n});
        Tensor* w2 = ctx.new_tensor(Type::F32, {n});
        for (Tensor* t : {x, r, w1, w2}) test::fill_uniform(t);
        // Constant weights are read before the kernel waits for its inputs (early launch).
        if (n % 2 == 1) w1->flags |= kFlagConstant, w2->flags |= kFlagConstant;
        // A block's two pre-norms: rms_norm -> mul on the input, then the residual add and
        // the next pre-norm; the sums and norms are read again afterwards, as a residual
        // stream is.
        Tensor* n1 = rms_norm(ctx, x, 1e-5f);
        Tensor* h1 = mul(ctx, n1, w1);
        Tensor* s = add(ctx, r, h1);
        Tensor* n2 = rms_norm(ctx, s, 1e-6f);
        Tensor* h2 = mul(ctx, n2, w2);
        Tensor* out = add(ctx, add(ctx, h2, s), mul(ctx, n2, n1));
        const Graph g = build_forward(out);
        const int64_t before = counter(fused->counters(), "fused_launches");
        for (Tensor* node : {n1, h1, s, n2, h2, out}) {
            INFO("node " << op_name(node->op) << " " << node->shape_str());
            const std::vector<float> got = run_graph(*fused, g, node, 0);
            const std::vector<float> want = run_graph(*separate, g, node, 0);
            CHECK(all_finite(got)); // the nodes were poisoned: every element was written
            CHECK(bit_identical(got, want));
            CHECK(test::rel_error(got, ref::evaluate(g, node)) <= 1e-5);
        }
        CHECK(counter(fused->counters(), "fused_launches") - before == 2 * 6); // per run: both pre-norms
    }
    CHECK(counter(separate->counters(), "fused_launches") == 0);
}

// A merged gate/up product followed by swiglu of its halves, as the model builder makes it:
// with fusion the product's rows go in gate/up pairs and the same kernel writes swiglu. The
// product and swiglu must be bit for bit the separate kernels' (q4_K at K = 8448 splits its
// rows over 4 warps and is not fused: the check covers the fallback too).
TEST_CASE("CUDA fused gate/up product -> swiglu: both nodes written, bit for bit the separate kernels",
          "[cuda][fusion]") {
    INFO("seed " << test::seed());
    const std::unique_ptr<Backend> fused = backend_with("GFA_CUDA_FUSION", true);
    const std::unique_ptr<Backend> separate = backend_with("GFA_CUDA_FUSION", false);
    struct Case {
        Type type;
        int64_t K;
        bool fuses;
    };
    // q4_K at K = 4096 with 4100 pairs (8200 rows) takes the 4-deep pass, one warp a row, at
    // one column (quant_matmul.cu).
    for (const Case& c :
         {Case{Type::F16, 256, true}, Case{Type::F16, 2056, true}, Case{Type::BF16, 1000, true},
          Case{Type::F16, 4104, false}, Case{Type::Q8_0, 2048, true}, Case{Type::Q4_K, 512, true},
          Case{Type::Q4_K, 8448, false}, Case{Type::Q6_K, 2048, true}, Case{Type::Q4_K, 4096, true}})
        for (const int64_t n_ff : c.K == 4096 ? std::vector<int64_t>{4100} : std::vector<int64_t>{37, 300})
            for (const int64_t n : {1, 3}) {
                INFO(type_name(c.type) << " K " << c.K << ", n_ff " << n_ff << ", columns " << n);
                Context ctx{ContextParams{.alloc_data = true}};
                Tensor* w = ctx.new_tensor(c.type, {c.K, 2 * n_ff});
                Tensor* x = ctx.new_tensor(Type::F32, {c.K, n});
                test::fill_uniform(w);
                test::fill_uniform(x);
                if (n_ff >= 300) w->flags |= kFlagConstant; // fetched before the kernel waits
                Tensor* gu = mul_mat(ctx, w, x);
                const size_t half = size_t(n_ff) * sizeof(float);
                Tensor* f = swiglu(ctx, view(ctx, gu, {n_ff, n}, {gu->nb[1]}, 0),
                                   view(ctx, gu, {n_ff, n}, {gu->nb[1]}, half));
                Tensor* out = scale(ctx, f, 2.0f); // a reader behind the fused pair
                const Graph g = build_forward(out);
                for (Tensor* node : {gu, f, out}) {
                    INFO("node " << op_name(node->op));
                    const std::vector<float> got =
                        fused_as_separate(*fused, *separate, g, node, c.fuses ? 1 : 0);
                    // Against the exact product: the int8 rounding of x in the quantized path.
                    const double tol = c.type == Type::F16 || c.type == Type::BF16 ? 1e-4 : 3e-2;
                    CHECK(test::rel_error(got, ref::evaluate(g, node)) <= tol);
                }
            }
    CHECK(counter(separate->counters(), "fused_launches") == 0);
}

// A pre-norm and the quantized products that read it, as the model builder makes them: with
// fusion the pre-norm's kernel also writes the products' int8 columns and the product takes
// them from there (and a second product on the same input reuses them, or joins the first's
// launch where the pair of block types has a paired kernel: q4_K and q6_K here). Every node
// bit for bit the separate kernels'; with and without the residual add, with a fused swiglu
// behind the product and with a second product instead, one and three columns, block types
// whose rows take one, two and four warps.
TEST_CASE(
    "CUDA fused pre-norm -> quantized product: int8 columns from the norm, bit for bit the separate kernels",
    "[cuda][fusion]") {
    INFO("seed " << test::seed());
    const std::unique_ptr<Backend> fused = backend_with("GFA_CUDA_FUSION", true);
    const std::unique_ptr<Backend> separate = backend_with("GFA_CUDA_FUSION", false);
    struct Case {
        Type type, second; // second: the weights of the second product
        int64_t K;
        bool pairs;     // the two products' block types have a paired launch (at one column)
        bool glu_fuses; // the gate/up product takes swiglu into its launch (rows of <= 2 warps)
    };
    for (const Case& c :
         {Case{Type::Q8_0, Type::Q8_0, 96, false, true}, Case{Type::Q4_K, Type::Q6_K, 2048, true, true},
          Case{Type::Q6_K, Type::Q4_K, 512, true, true}, Case{Type::Q4_0, Type::Q4_0, 4096, false, true},
          Case{Type::Q5_K, Type::Q5_K, 5632, false, false}, Case{Type::Q6_K, Type::Q5_K, 512, false, true}})
        for (const bool with_add : {false, true})
            for (const bool gated : {false, true})
                for (const int64_t n : {1, 3}) {
                    INFO(type_name(c.type) << " K " << c.K << (with_add ? ", add" : "")
                                           << (gated ? ", swiglu" : ", two products, the second ")
                                           << (gated ? "" : type_name(c.second)) << ", columns " << n);
                    const int64_t n_ff = 37, M = 2 * n_ff;
                    Context ctx{ContextParams{.alloc_data = true}};
                    Tensor* x = ctx.new_tensor(Type::F32, {c.K, n});
                    Tensor* r = ctx.new_tensor(Type::F32, {c.K, n});
                    Tensor* gain = ctx.new_tensor(Type::F32, {c.K});
                    Tensor* w1 = ctx.new_tensor(c.type, {c.K, M});
                    Tensor* w2 = ctx.new_tensor(c.second, {c.K, M});
                    for (Tensor* t : {x, r, gain, w1, w2}) test::fill_uniform(t);
                    for (Tensor* t : {gain, w1, w2}) t->flags |= kFlagConstant;
                    Tensor* in = with_add ? add(ctx, r, x) : x;
                    Tensor* h = mul(ctx, rms_norm(ctx, in, 1e-5f), gain);
                    Tensor* p = mul_mat(ctx, w1, h);
                    Tensor* out = nullptr;
                    std::vector<Tensor*> checked = {h, p};
                    if (gated) {
                        const size_t half = size_t(n_ff) * sizeof(float);
                        Tensor* f = swiglu(ctx, view(ctx, p, {n_ff, n}, {p->nb[1]}, 0),
                                           view(ctx, p, {n_ff, n}, {p->nb[1]}, half));
                        out = scale(ctx, f, 2.0f);
                        checked.push_back(f);
                    } else {
                        Tensor* p2 = mul_mat(ctx, w2, h); // right behind p: reuses the columns
                        out = add(ctx, p, p2);
                        checked.push_back(p2);
                    }
                    checked.push_back(out);
                    if (with_add) checked.push_back(in);
                    const Graph g = build_forward(out);
                    // The fused launch: the pre-norm's nodes, the product, and its swiglu or
                    // (paired) the second product.
                    const int64_t fused_nodes =
                        (with_add ? 3 : 2) + 1 +
                        ((gated && c.glu_fuses) || (!gated && c.pairs && n == 1) ? 1 : 0);
                    for (Tensor* node : checked) {
                        INFO("node " << op_name(node->op) << " " << node->shape_str());
                        const int64_t before = counter(fused->counters(), "fused_launches");
                        const int64_t nodes_before = counter(fused->counters(), "fused_nodes");
                        const std::vector<float> got = run_graph(*fused, g, node, 0);
                        const std::vector<float> want = run_graph(*separate, g, node, 0);
                        CHECK(counter(fused->counters(), "fused_launches") - before == 1);
                        CHECK(counter(fused->counters(), "fused_nodes") - nodes_before == fused_nodes);
                        CHECK(all_finite(got)); // the nodes were poisoned: every element was written
                        CHECK(bit_identical(got, want));
                        CHECK(test::rel_error(got, ref::evaluate(g, node)) <= 3e-2);
                    }
                }
    CHECK(counter(separate->counters(), "fused_launches") == 0);
}

// The paired launch as a model's weights meet it: in a weights buffer, where q6_K rows keep
// their scales last (cuda_common.h), so the kernels are the ones a Q4_K_M or Q5_K_M file's
// layers run (v in q6_K in front of the merged q/k product, as the model builder orders them,
// and the other way round). Both products bit for bit two launches', every element written,
// near the reference; with GFA_CUDA_PAIRED_PRODUCTS=0 the second product is a launch of its own.
TEST_CASE("CUDA paired products of two block types: weights in the GPU's layout, bit for bit two launches",
          "[cuda][fusion]") {
    INFO("seed " << test::seed());
    const std::unique_ptr<Backend> fused = backend_with("GFA_CUDA_FUSION", true);
    const std::unique_ptr<Backend> separate = backend_with("GFA_CUDA_FUSION", false);
    struct Case {
        Type first, second;
        int64_t K, M1, M2;
    };
    // 8B's v and q/k (1024 and 5120 rows of 4096: two warps a row), 1.1B's the other way
    // round (one warp a row), odd row counts, and rows of four warps (K = 6144). The kernels
    // take rows 16-byte aligned: q6_K's with the scales last (210 bytes a block) at K a
    // multiple of 2048.
    for (const Case& c :
         {Case{Type::Q6_K, Type::Q4_K, 4096, 1024, 5120}, Case{Type::Q4_K, Type::Q6_K, 2048, 2304, 256},
          Case{Type::Q5_K, Type::Q6_K, 2048, 37, 301}, Case{Type::Q6_K, Type::Q5_K, 6144, 299, 45}})
        for (const bool with_add : {false, true}) {
            INFO(type_name(c.first) << " " << c.M1 << " rows, then " << type_name(c.second) << " " << c.M2
                                    << " rows, K " << c.K << (with_add ? ", residual add" : ""));
            Context ctx{ContextParams{.alloc_data = true}};
            Tensor* x = ctx.new_tensor(Type::F32, {c.K, 1});
            Tensor* r = ctx.new_tensor(Type::F32, {c.K, 1});
            Tensor* gain = ctx.new_tensor(Type::F32, {c.K});
            Tensor* w1 = ctx.new_tensor(c.first, {c.K, c.M1});
            Tensor* w2 = ctx.new_tensor(c.second, {c.K, c.M2});
            for (Tensor* t : {x, r, gain, w1, w2}) test::fill_uniform(t);
            gain->flags |= kFlagConstant;

            // The weights' copies in a weights buffer, for the CUDA graph.
            Context dev_ctx(ContextParams{});
            Tensor* d1 = dev_ctx.new_tensor(c.first, {c.K, c.M1});
            Tensor* d2 = dev_ctx.new_tensor(c.second, {c.K, c.M2});
            const size_t align = cuda0()->buffer_type()->alignment();
            const size_t at2 = (w1->nbytes() + align - 1) / align * align;
            std::unique_ptr<Buffer> weights = cuda0()->buffer_type()->allocate(at2 + w2->nbytes());
            weights->set_usage(BufferUsage::Weights);
            weights->place(d1, 0);
            weights->place(d2, at2);
            for (auto [host, dev] : {std::pair{w1, d1}, std::pair{w2, d2}}) {
                std::vector<uint8_t> bytes(host->nbytes());
                tensor_get(host, bytes.data(), 0, bytes.size());
                tensor_set(dev, bytes.data(), 0, bytes.size());
                dev->flags |= kFlagConstant;
            }

            auto products = [&](Tensor* a1, Tensor* a2) {
                Tensor* in = with_add ? add(ctx, r, x) : x;
                Tensor* h = mul(ctx, rms_norm(ctx, in, 1e-5f), gain);
                Graph g;
                Tensor* p1 = mul_mat(ctx, a1, h);
                Tensor* p2 = mul_mat(ctx, a2, h);
                g.expand(p1);
                g.expand(p2);
                return std::tuple{g, p1, p2};
            };
            const auto [g, p1, p2] = products(d1, d2);
            const auto [g_ref, r1, r2] = products(w1, w2);
            const int64_t norm_nodes = with_add ? 3 : 2;
            for (auto [node, ref_node] : {std::pair{p1, r1}, std::pair{p2, r2}}) {
                INFO("product " << (node == p1 ? "first" : "second"));
                const int64_t launches = counter(fused->counters(), "fused_launches");
                const int64_t nodes = counter(fused->counters(), "fused_nodes");
                const std::vector<float> got = run_graph(*fused, g, node, 0);
                CHECK(counter(fused->counters(), "fused_launches") - launches == 1);
                CHECK(counter(fused->counters(), "fused_nodes") - nodes == norm_nodes + 2);
                CHECK(all_finite(got)); // poisoned before the run: every element written
                CHECK(bit_identical(got, run_graph(*separate, g, node, 0)));
                CHECK(test::rel_error(got, ref::evaluate(g_ref, ref_node)) <= 3e-2);
                // Paired launches off: the pre-norm and the first product fused, the second apart.
                EnvSetting off("GFA_CUDA_PAIRED_PRODUCTS", false);
                const std::unique_ptr<Backend> unpaired = cuda0()->create_backend();
                CHECK(bit_identical(got, run_graph(*unpaired, g, node, 0)));
                CHECK(counter(unpaired->counters(), "fused_nodes") == norm_nodes + 1);
            }
        }
}

// A decoding step's rope over q and k and the cache writes of k and v, as the model builder
// makes them (then attention over the caches): with fusion one kernel writes the rope's
// output and both caches, recomputing the rotated k it stores. Every node bit for bit the
// separate kernels'; caches in f16 and f32, one and five tokens, normal and NeoX rope.
TEST_CASE(
    "CUDA fused rope -> set_rows -> set_rows: rope output and both caches bit for bit the separate kernels",
    "[cuda][fusion]") {
    INFO("seed " << test::seed());
    const std::unique_ptr<Backend> fused = backend_with("GFA_CUDA_FUSION", true);
    const std::unique_ptr<Backend> separate = backend_with("GFA_CUDA_FUSION", false);
    const int64_t D = 64, Hq = 4, Hkv = 2, n_ctx = 40;
    for (const Type cache_type : {Type::F16, Type::F32})
        for (const int64_t T : {1, 5})
            for (const RopeMode mode : {RopeMode::Normal, RopeMode::NeoX}) {
                INFO(type_name(cache_type) << " caches, " << T << " tokens, "
                                           << (mode == RopeMode::NeoX ? "NeoX" : "normal") << " rope");
                Context ctx{ContextParams{.alloc_data = true}};
                Tensor* qkv = ctx.new_tensor(Type::F32, {D * (Hq + 2 * Hkv), T});
                Tensor* pos = ctx.new_tensor(Type::I32, {T});
                Tensor* cache_k = ctx.new_tensor(cache_type, {D, n_ctx, Hkv});
                Tensor* cache_v = ctx.new_tensor(cache_type, {D, n_ctx, Hkv});
                for (Tensor* t : {qkv, cache_k, cache_v}) test::fill_uniform(t);
                std::vector<int32_t> positions(static_cast<size_t>(T));
                for (int64_t t = 0; t < T; ++t) positions[size_t(t)] = int32_t(3 + 7 * t); // apart
                tensor_set(pos, positions.data(), 0, positions.size() * sizeof(int32_t));
                const size_t f = sizeof(float), row = qkv->nb[1];
                const RopeParams rp{int32_t(D), mode, 10000.0f, 1.0f};
                Tensor* qk = rope(ctx, view(ctx, qkv, {D, Hq + Hkv, T}, {D * f, row}, 0), pos, rp);
                Tensor* q = view(ctx, qk, {D, Hq, T}, {qk->nb[1], qk->nb[2]}, 0);
                Tensor* k = view(ctx, qk, {D, Hkv, T}, {qk->nb[1], qk->nb[2]}, size_t(Hq) * qk->nb[1]);
                Tensor* v = view(ctx, qkv, {D, Hkv, T}, {D * f, row}, size_t(D * (Hq + Hkv)) * f);
                Tensor* k_all = set_rows(ctx, cache_k, permute(ctx, k, 0, 2, 1, 3), pos);
                Tensor* v_all = set_rows(ctx, cache_v, permute(ctx, v, 0, 2, 1, 3), pos);
                FlashAttnParams attn{};
                attn.scale = 0.125f;
                Tensor* o = flash_attn_ext(ctx, permute(ctx, q, 0, 2, 1, 3), k_all, v_all, nullptr, attn);
                const Graph g = build_forward(o);
                for (Tensor* node : {qk, k_all, v_all, o}) {
                    INFO("node " << op_name(node->op));
                    const int64_t before = counter(fused->counters(), "fused_launches");
                    const std::vector<float> got = run_graph(*fused, g, node, 0);
                    const std::vector<float> want = run_graph(*separate, g, node, 0);
                    CHECK(counter(fused->counters(), "fused_launches") - before == 1);
                    CHECK(all_finite(got));
                    CHECK(bit_identical(got, want));
                    const double tol = node == o ? 1e-2 : cache_type == Type::F16 && node != qk ? 1e-3 : 1e-5;
                    CHECK(test::rel_error(got, ref::evaluate(g, node)) <= tol);
                }
            }
}

// Decoding's attention and the output projection behind it, as the model builder makes them:
// with fusion, the attention's split-KV combine also writes the product's int8 columns and
// the product reads them there (with too few keys to split, the fused launch rounds them the
// plain way). Both nodes bit for bit the separate kernels'; one and three tokens, GQA, head
// dims 64 and 128, weights whose rows take one to four warps.
TEST_CASE("CUDA fused attention -> quantized product: int8 columns from the combine, bit for bit the "
          "separate kernels",
          "[cuda][fusion]") {
    INFO("seed " << test::seed());
    const std::unique_ptr<Backend> fused = backend_with("GFA_CUDA_FUSION", true);
    const std::unique_ptr<Backend> separate = backend_with("GFA_CUDA_FUSION", false);
    struct Case {
        int64_t D, Hq, Hkv, Skv;
        Type type;
    };
    for (const Case& c : {Case{64, 32, 4, 640, Type::Q4_K}, Case{64, 8, 8, 300, Type::Q8_0},
                          Case{128, 16, 2, 1000, Type::Q6_K}, Case{64, 32, 4, 9, Type::Q4_0},
                          Case{128, 44, 4, 700, Type::Q5_K}})
        for (const int64_t T : {1, 3}) {
            INFO("D " << c.D << " Hq " << c.Hq << " Hkv " << c.Hkv << " keys " << c.Skv << ", " << T
                      << " tokens, weights " << type_name(c.type));
            const int64_t K = c.D * c.Hq, M = 96;
            Context ctx{ContextParams{.alloc_data = true}};
            Tensor* q = ctx.new_tensor(Type::F32, {c.D, T, c.Hq});
            Tensor* k = ctx.new_tensor(Type::F16, {c.D, c.Skv, c.Hkv});
            Tensor* v = ctx.new_tensor(Type::F16, {c.D, c.Skv, c.Hkv});
            Tensor* w = ctx.new_tensor(c.type, {K, M});
            for (Tensor* t : {q, k, v, w}) test::fill_uniform(t);
            w->flags |= kFlagConstant;
            FlashAttnParams attn{};
            attn.scale = 1.0f / std::sqrt(float(c.D));
            Tensor* o = flash_attn_ext(ctx, q, k, v, nullptr, attn); // [D, Hq, T]
            Tensor* p = mul_mat(ctx, w, reshape(ctx, o, {K, T}));
            Tensor* out = scale(ctx, p, 2.0f); // a reader behind the fused pair
            const Graph g = build_forward(out);
            for (Tensor* node : {o, p, out}) {
                INFO("node " << op_name(node->op));
                const std::vector<float> got = fused_as_separate(*fused, *separate, g, node, 1);
                // f16 K/V (q rounded to f16 too), then the int8 rounding of o in the product.
                CHECK(test::rel_error(got, ref::evaluate(g, node)) <= (node == o ? 1e-2 : 3e-2));
            }
        }
    CHECK(counter(separate->counters(), "fused_launches") == 0);
}

// GFA_CUDA_SKIP_OPS, a timing aid: the backend launches an empty kernel in place of each
// listed op and counts it, the op's result stays unwritten (still the poison), the other ops
// run as usual, and an unknown op name is an error that names it.
TEST_CASE("CUDA GFA_CUDA_SKIP_OPS leaves out exactly the listed ops and rejects unknown names",
          "[cuda][graphs]") {
    Context ctx{ContextParams{.alloc_data = true}};
    Tensor* x = ctx.new_tensor(Type::F32, {64, 3});
    test::fill_uniform(x);
    Tensor* scaled = scale(ctx, x, 2.0f);
    Tensor* activated = silu(ctx, scaled);
    const Graph g = build_forward(activated);
    std::unique_ptr<Backend> skipping;
    {
        EnvSetting skip("GFA_CUDA_SKIP_OPS", "silu");
        skipping = cuda0()->create_backend();
    }
    CHECK(test::rel_error(run_graph(*skipping, g, scaled, 0), ref::evaluate(g, scaled)) <= 1e-6);
    const std::vector<float> left_out = run_graph(*skipping, g, activated, 0);
    for (float v : left_out) REQUIRE(std::isnan(v));
    CHECK(counter(skipping->counters(), "skipped_launches") == 2);
    const std::unique_ptr<Backend> plain = cuda0()->create_backend();
    CHECK(test::rel_error(run_graph(*plain, g, activated, 0), ref::evaluate(g, activated)) <= 1e-5);
    EnvSetting unknown("GFA_CUDA_SKIP_OPS", "scale,no_such_op");
    CHECK_THROWS_WITH(cuda0()->create_backend(), Catch::Contains("no_such_op"));
}

// mul_mat:KxM in GFA_CUDA_SKIP_OPS leaves out only the products whose weights are K x M; the
// product with other weights runs, and an entry that is neither an op nor mul_mat:KxM is an
// error that names it.
TEST_CASE("CUDA GFA_CUDA_SKIP_OPS leaves out the products of listed weight shapes", "[cuda][graphs]") {
    Context ctx{ContextParams{.alloc_data = true}};
    Tensor* x = ctx.new_tensor(Type::F32, {64, 3});
    Tensor* w_listed = ctx.new_tensor(Type::F32, {64, 40});
    Tensor* w_other = ctx.new_tensor(Type::F32, {64, 24});
    for (Tensor* t : {x, w_listed, w_other}) test::fill_uniform(t);
    Tensor* listed = mul_mat(ctx, w_listed, x);
    Tensor* other = mul_mat(ctx, w_other, x);
    const Graph g = build_forward(add(ctx, sum_rows(ctx, listed), sum_rows(ctx, other)));
    std::unique_ptr<Backend> skipping;
    {
        EnvSetting skip("GFA_CUDA_SKIP_OPS", "mul_mat:64x40");
        skipping = cuda0()->create_backend();
    }
    CHECK(test::rel_error(run_graph(*skipping, g, other, 0), ref::evaluate(g, other)) <= 1e-5);
    for (float v : run_graph(*skipping, g, listed, 0)) REQUIRE(std::isnan(v));
    CHECK(counter(skipping->counters(), "skipped_launches") == 2);
    for (const char* bad : {"mul_mat:64", "mul_mat:64x0", "mul_mat:64x40x2", "silu:64x40"}) {
        INFO(bad);
        EnvSetting setting("GFA_CUDA_SKIP_OPS", bad);
        CHECK_THROWS_WITH(cuda0()->create_backend(), Catch::Contains(bad));
    }
}

TEST_CASE("CUDA graphs: training graphs and short node lists run eagerly", "[cuda][graphs]") {
    INFO("seed " << test::seed());
    EnvSetting on("GFA_CUDA_GRAPHS", true);
    std::unique_ptr<Backend> backend = cuda0()->create_backend();

    // A short list, run several times: below the size where graphs pay off.
    Context ctx{ContextParams{.alloc_data = true}};
    Tensor* a = ctx.new_tensor(Type::F32, {33});
    test::fill_uniform(a);
    Tensor* small = silu(ctx, scale(ctx, a, 2.0f));
    const Graph g = build_forward(small);
    for (int i = 0; i < 4; ++i)
        CHECK(test::rel_error(run_graph(*backend, g, small, size_t(i) * 256), ref::evaluate(g, small)) <=
              1e-6);

    // A long list with its gradient: the backward ops keep it eager.
    Tensor* x = ctx.new_tensor(Type::F32, {40, 3});
    Tensor* gain = ctx.new_tensor(Type::F32, {40});
    test::fill_uniform(x);
    test::fill_uniform(gain);
    Tensor* y = mul(ctx, rms_norm(ctx, x, 1e-5f), gain);
    for (int i = 0; i < 8; ++i) y = i % 2 ? silu(ctx, y) : scale(ctx, y, 0.9f, 0.05f);
    Tensor* loss = sum(ctx, y);
    set_param(gain);
    Graph train = build_forward(loss);
    build_backward(ctx, train, loss);
    Tensor* grad = train.grad(gain);
    REQUIRE(grad != nullptr);
    REQUIRE(train.nodes().size() >= 16);
    const std::vector<double> expected = ref::evaluate(train, grad);
    for (int i = 0; i < 3; ++i)
        CHECK(test::rel_error(run_graph(*backend, train, grad, size_t(i) * 256), expected) <= 1e-5);

    const auto c = backend->counters();
    CHECK(counter(c, "graph_launches") == 0);
    CHECK(counter(c, "eager_runs") == 0); // never handed to the graph machinery at all
}

// Backend::write_async, copy_async and read_async on the CUDA stream: queued around compute()
// calls that replay a launch graph, without waiting in between. Every input buffer is spoiled
// right after its write is queued (the backend must have taken its bytes), results land in
// NaN-poisoned host memory, reads outnumber the staging slots (slots are reused before their
// reads are waited for) and tensors larger than a slot take several. Values are small
// integers halved a few times: exact in f32, so every result must match bit for bit.
TEST_CASE("CUDA backend: queued writes, copies and reads keep their order with compute", "[cuda][graphs]") {
    const uint32_t seed = std::random_device{}();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    const int64_t n = GENERATE(1, 37, 40000); // 40000 f32: 160 KB, three 64 KiB slots
    INFO("n " << n);
    Context ctx;
    Tensor* x = ctx.new_tensor(Type::F32, {n});
    Tensor* bias = ctx.new_tensor(Type::F32, {n});
    Tensor* kept = ctx.new_tensor(Type::F32, {n});
    Tensor* y = x;
    for (int i = 0; i < 18; ++i) y = i % 3 == 2 ? scale(ctx, y, 0.5f) : add(ctx, y, bias);
    Graph g = build_forward(y);
    std::unique_ptr<Buffer> memory = allocate_context_tensors(ctx, cuda0()->buffer_type());
    std::unique_ptr<Backend> backend = cuda0()->create_backend();

    auto draw = [&](std::vector<float>& v) {
        for (float& f : v) f = float(int(rng() % 2001) - 1000);
    };
    std::vector<float> bias_values(static_cast<size_t>(n));
    draw(bias_values);
    tensor_set(bias, bias_values.data(), 0, size_t(n) * sizeof(float));
    auto expected_of = [&](const std::vector<float>& in) {
        std::vector<float> out = in;
        for (size_t j = 0; j < out.size(); ++j)
            for (int i = 0; i < 18; ++i) out[j] = i % 3 == 2 ? out[j] * 0.5f : out[j] + bias_values[j];
        return out;
    };

    const int rounds = 24;
    const size_t bytes = size_t(n) * sizeof(float), half = size_t(n / 2) * sizeof(float);
    std::vector<std::vector<float>> expected, results(rounds), copies(rounds);
    std::vector<Backend::Ticket> result_tickets, copy_tickets;
    std::vector<float> input(static_cast<size_t>(n));
    for (int r = 0; r < rounds; ++r) {
        draw(input);
        expected.push_back(expected_of(input));
        // In two parts at offsets, the first half then the rest.
        backend->write_async(x, input.data(), 0, half);
        backend->write_async(x, reinterpret_cast<const char*>(input.data()) + half, half, bytes - half);
        std::fill(input.begin(), input.end(), std::nanf("")); // the queued write took its bytes
        backend->compute(g.nodes());
        backend->copy_async(y, 0, kept, 0, bytes);
        results[size_t(r)].assign(size_t(n), std::nanf(""));
        copies[size_t(r)].assign(size_t(n), std::nanf(""));
        result_tickets.push_back(backend->read_async(y, results[size_t(r)].data(), 0, bytes));
        copy_tickets.push_back(backend->read_async(kept, copies[size_t(r)].data(), 0, bytes));
    }
    // Every other round waited for out of order; a later ticket lands the earlier reads too.
    for (int r = rounds - 1; r >= 0; r -= 2) backend->wait_for(copy_tickets[size_t(r)]);
    for (int r = 0; r < rounds; ++r) {
        INFO("round " << r);
        CHECK(bit_identical(results[size_t(r)], expected[size_t(r)]));
        CHECK(bit_identical(copies[size_t(r)], expected[size_t(r)]));
    }
    CHECK(counter(backend->counters(), "graph_launches") > 0);

    // A kernel's error report reaches the host through wait_for, as through synchronize.
    Context bad;
    Tensor* table = bad.new_tensor(Type::F32, {4, 3});
    Tensor* ids = bad.new_tensor(Type::I32, {2});
    Tensor* rows = get_rows(bad, table, ids);
    std::unique_ptr<Buffer> bad_memory = allocate_context_tensors(bad, cuda0()->buffer_type());
    const int32_t outside[2] = {0, 7};
    backend->write_async(ids, outside, 0, sizeof(outside));
    backend->compute(build_forward(rows).nodes());
    std::vector<float> got(8);
    const Backend::Ticket t = backend->read_async(rows, got.data(), 0, got.size() * sizeof(float));
    CHECK_THROWS_WITH(backend->wait_for(t), Catch::Contains("out of range"));
}
