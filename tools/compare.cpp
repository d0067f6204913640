// compare: runs the built-in suite of small graphs on each device and on the reference
// evaluator, prints the worst normalized error per graph, and exits non-zero when any
// graph is above its tolerance (or fails to run). With --model, runs a GGUF model's forward
// pass on each device and on the CPU and compares every node, naming the first that departs.
//
//   compare [--device NAME]... [--case SUBSTRING] [--seed N] [--verbose] [--list]
//   compare --model FILE.gguf [--device NAME]... [--tokens a,b,...] [--decode N] [--kv-type T]
//           [--tol X] [--seed N] [--verbose]
#include <ggml-fa/backend.h>
#include <ggml-fa/error.h>
#include <ggml-fa/model.h>

#include "compare.h"
#include "tools/cli.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

void usage(const char* argv0) {
    std::fprintf(stderr,
                 "usage: %s [--device NAME]... [--case SUBSTRING] [--seed N] [--verbose] [--list]\n"
                 "  --device   a device to test (default: every device found); repeatable\n"
                 "  --case     run only the cases whose name contains SUBSTRING\n"
                 "  --seed     random seed for the inputs (default: random, printed)\n"
                 "  --verbose  print every node's error, and the scheduler's fallbacks\n"
                 "  --list     list the devices and cases and exit\n"
                 "usage: %s --model FILE.gguf [--device NAME]... [--tokens a,b,...] [--decode N]\n"
                 "          [--kv-type f32|f16|q8_0] [--tol X] [--seed N] [--verbose]\n"
                 "  --model    run the model's forward pass (prompt, then --decode single tokens, default\n"
                 "             2) on each device (default: every device but the CPU) and on the CPU, and\n"
                 "             compare every node with the CPU's; reports the first node above --tol\n"
                 "             (default 1e-3) and the worst\n"
                 "  --tokens   the prompt's token ids (default: 16 drawn from the seed)\n",
                 argv0, argv0);
}

// The --model mode: one line per device and eval, every node with --verbose.
int compare_model(const std::string& path, const std::vector<gfa::Device*>& targets,
                  std::vector<int32_t> tokens, int decode_steps, gfa::Type kv_type, double tol, uint32_t seed,
                  bool verbose) {
    using namespace gfa;
    if (tokens.empty()) {
        const int64_t vocab = Model::load(path)->config().n_vocab;
        std::mt19937 rng(seed);
        for (int i = 0; i < 16; ++i) tokens.push_back(int32_t(rng() % uint64_t(vocab)));
        std::printf("seed %u\n", seed);
    }
    std::printf("%-8s %-24s %6s  %-44s %10s  %s\n", "device", "eval", "nodes", "first node above tolerance",
                "worst", "status");
    int failures = 0;
    for (Device* dev : targets) {
        const compare::ModelComparison c =
            compare::compare_model(path, dev, tokens, decode_steps, kv_type, /*n_threads=*/0);
        for (size_t e = 0; e < c.reports.size(); ++e) {
            const compare::Report& rep = c.reports[e];
            const compare::NodeResult* first = nullptr;
            int on_device = 0;
            for (const auto& n : rep.nodes) {
                if (!first && !(n.error <= tol)) first = &n;
                on_device += n.backend == dev->name();
            }
            failures += first != nullptr;
            std::printf("%-8s %-24s %6zu  %-44.44s %10.2e  %s (%d nodes on %s)\n", dev->name(),
                        c.evals[e].c_str(), rep.nodes.size(), first ? first->label.c_str() : "-", rep.worst,
                        first ? "FAIL" : "ok", on_device, dev->name());
            if (verbose || first)
                for (const auto& n : rep.nodes)
                    std::printf("    %-56s on %-8s %10.2e%s\n", n.label.c_str(), n.backend.c_str(), n.error,
                                n.error <= tol ? "" : "  <-- above tolerance");
        }
    }
    return failures ? 1 : 0;
}

} // namespace

int main(int argc, char** argv) {
    using namespace gfa;
    std::vector<std::string> device_names;
    std::string filter, model_path;
    std::vector<int32_t> tokens;
    int decode_steps = 2;
    Type kv_type = Type::F16;
    double tol = 1e-3;
    uint32_t seed = std::random_device{}();
    bool verbose = false, list = false;
    try {
        for (int i = 1; i < argc; ++i) {
            const std::string arg = argv[i];
            auto value = [&]() -> std::string {
                if (i + 1 >= argc) {
                    std::fprintf(stderr, "compare: %s needs a value\n", arg.c_str());
                    std::exit(2);
                }
                return argv[++i];
            };
            if (arg == "--device")
                device_names.push_back(value());
            else if (arg == "--case")
                filter = value();
            else if (arg == "--seed")
                seed = uint32_t(cli::integer_of(arg, value(), 0, UINT32_MAX));
            else if (arg == "--verbose")
                verbose = true;
            else if (arg == "--list")
                list = true;
            else if (arg == "--model")
                model_path = value();
            else if (arg == "--decode")
                decode_steps = int(cli::integer_of(arg, value(), 0, 4096));
            else if (arg == "--tol")
                tol = cli::real_of(arg, value());
            else if (arg == "--tokens") {
                tokens = cli::token_ids(value());
            } else if (arg == "--kv-type") {
                kv_type = cli::kv_type(value());
            } else {
                usage(argv[0]);
                return arg == "--help" || arg == "-h" ? 0 : 2;
            }
        }
    } catch (const Error& e) { // an option's value that does not parse or name a type
        std::fprintf(stderr, "compare: %s\n", e.what());
        return 2;
    }

    const std::vector<compare::Case>& suite = compare::builtin_suite();
    if (list) {
        for (Device* d : devices()) std::printf("device %s: %s\n", d->name(), d->description().c_str());
        for (const auto& c : suite) std::printf("case %s (tolerance %.0e)\n", c.name, c.tol);
        return 0;
    }

    std::vector<Device*> targets;
    if (device_names.empty()) targets = devices();
    for (const std::string& name : device_names) {
        Device* d = find_device(name);
        if (!d) {
            std::fprintf(stderr, "compare: no device named '%s'; found:", name.c_str());
            for (Device* x : devices()) std::fprintf(stderr, " %s", x->name());
            std::fprintf(stderr, "\n");
            return 2;
        }
        targets.push_back(d);
    }

    if (!model_path.empty()) {
        if (device_names.empty()) {
            targets.clear();
            for (Device* d : devices())
                if (d != &cpu_device()) targets.push_back(d);
        }
        if (targets.empty()) {
            std::fprintf(stderr, "compare: --model needs a device besides the CPU; none found\n");
            return 2;
        }
        try {
            return compare_model(model_path, targets, tokens, decode_steps, kv_type, tol, seed, verbose);
        } catch (const Error& e) {
            std::fprintf(stderr, "compare: %s\n", e.what());
            return 2;
        }
    }

    std::printf("seed %u\n", seed);
    std::printf("%-18s %-8s %6s %6s  %-40s %10s %8s  %s\n", "case", "device", "nodes", "splits", "worst node",
                "error", "tol", "status");
    int failures = 0, ran = 0;
    std::unique_ptr<Backend> cpu = make_cpu_backend();
    for (Device* dev : targets) {
        std::unique_ptr<Backend> own = dev == &cpu_device() ? nullptr : dev->create_backend();
        Backend& backend = own ? *own : *cpu;
        for (const auto& c : suite) {
            if (!filter.empty() && std::string(c.name).find(filter) == std::string::npos) continue;
            ++ran;
            const compare::CaseResult r = compare::run_case(c, backend, cpu.get(), seed);
            const bool pass = r.passed();
            failures += !pass;
            if (!r.error.empty()) {
                std::printf("%-18s %-8s %6s %6s  %-40s %10s %8.0e  FAIL: %s\n", c.name, dev->name(), "-", "-",
                            "-", "-", c.tol, r.error.c_str());
                continue;
            }
            const compare::Report& rep = r.report;
            const std::string worst =
                rep.worst_index >= 0 ? rep.nodes[size_t(rep.worst_index)].label : "(no nodes)";
            std::printf("%-18s %-8s %6zu %6d  %-40.40s %10.2e %8.0e  %s\n", c.name, dev->name(),
                        rep.nodes.size(), rep.n_splits, worst.c_str(), rep.worst, c.tol,
                        pass ? "ok" : "FAIL");
            if (verbose || !pass) {
                for (const auto& n : rep.nodes)
                    std::printf("    %-50s on %-8s %10.2e%s\n", n.label.c_str(), n.backend.c_str(), n.error,
                                n.error <= c.tol ? "" : "  <-- above tolerance");
                for (const auto& line : rep.log) std::printf("    %s\n", line.c_str());
            }
        }
    }
    if (ran == 0) {
        std::fprintf(stderr, "compare: no case matches '%s'\n", filter.c_str());
        return 2;
    }
    std::printf("%d of %d graphs within tolerance\n", ran - failures, ran);
    return failures ? 1 : 0;
}
