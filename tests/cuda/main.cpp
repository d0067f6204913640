// Entry point of the GPU tests: they need a CUDA device. Without one the program exits
// with code 4, which CTest reports as "skipped" (SKIP_RETURN_CODE), so machines without a
// GPU build and list the tests but do not fail them.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cstdio>

int main(int argc, char** argv) {
    Catch::Session session;
    if (const int rc = session.applyCommandLine(argc, argv); rc != 0) return rc;
    const auto& cfg = session.configData();
    const bool listing =
        cfg.listTests || cfg.listTestNamesOnly || cfg.listTags || cfg.listReporters || cfg.showHelp;
    if (!listing) {
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
            std::fprintf(stderr, "no CUDA device: GPU tests skipped\n");
            return 4;
        }
    }
    return session.run();
}
