// Entry point of the Vulkan tests: they need a Vulkan device (Mesa's lavapipe is one, on the
// CPU). Without one the program exits with code 4, which CTest reports as "skipped"
// (SKIP_RETURN_CODE), so machines without Vulkan build and list the tests but do not fail them.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <ggml-fa/backend.h>

#include <cstdio>
#include <string_view>

int main(int argc, char** argv) {
    Catch::Session session;
    if (const int rc = session.applyCommandLine(argc, argv); rc != 0) return rc;
    const auto& cfg = session.configData();
    const bool listing =
        cfg.listTests || cfg.listTestNamesOnly || cfg.listTags || cfg.listReporters || cfg.showHelp;
    if (!listing && !gfa::find_device("Vulkan0")) {
        std::fprintf(stderr, "no Vulkan device: Vulkan tests skipped\n");
        return 4;
    }
    return session.run();
}
