// compare: runs the built-in suite of small graphs on each device and on the reference
// evaluator, prints the worst normalized error per graph, and exits non-zero when any
// graph is above its tolerance (or fails to run).
//
//   compare [--device NAME]... [--case SUBSTRING] [--seed N] [--verbose] [--list]
#include <ggml-fa/backend.h>
#include <ggml-fa/error.h>

#include "compare.h"

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
                 "  --list     list the devices and cases and exit\n",
                 argv0);
}

} // namespace

int main(int argc, char** argv) {
    using namespace gfa;
    std::vector<std::string> device_names;
    std::string filter;
    uint32_t seed = std::random_device{}();
    bool verbose = false, list = false;
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
            seed = uint32_t(std::strtoul(value().c_str(), nullptr, 10));
        else if (arg == "--verbose")
            verbose = true;
        else if (arg == "--list")
            list = true;
        else {
            usage(argv[0]);
            return arg == "--help" || arg == "-h" ? 0 : 2;
        }
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
