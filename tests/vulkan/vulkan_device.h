// The Vulkan device the tests use (main.cpp skips the program when there is none).
#pragma once

#include <catch2/catch.hpp>

#include <ggml-fa/backend.h>

inline gfa::Device* vulkan0() {
    gfa::Device* d = gfa::find_device("Vulkan0");
    REQUIRE(d != nullptr);
    return d;
}
