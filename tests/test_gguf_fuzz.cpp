// Mutation fuzzing of the GGUF reader: valid files are damaged at random (bit flips, random
// bytes, hostile integers written over fields, truncation, inserted and deleted bytes) and
// every result must either load or raise gfa::Error. A file that loads is then read in full
// (metadata rendered, every tensor decoded) so that a bounds mistake shows up under the
// address sanitizer. The time-boxed loop runs about two seconds; "[.slow]" runs thirty.
#include <catch2/catch.hpp>

#include "gguf_test_util.h"

#include <ggml-fa/error.h>
#include <ggml-fa/gguf.h>

#include <chrono>
#include <cmath>
#include <random>

using namespace gfa;
using namespace gfa::gguf;

namespace {

std::vector<std::vector<uint8_t>> seed_files(std::mt19937& rng) {
    std::vector<std::vector<uint8_t>> seeds;
    {
        Writer w;
        w.metadata() = gguf_test::sample_metadata();
        std::vector<float> x(256 * 2);
        std::normal_distribution<float> dist;
        for (float& v : x) v = dist(rng);
        const Type types[] = {Type::F32, Type::F16, Type::Q4_0, Type::Q5_1, Type::Q4_K, Type::Q6_K};
        for (Type t : types) {
            std::vector<uint8_t> q(row_size(t, 256) * 2);
            type_traits(t).from_float(x.data(), q.data(), 512);
            w.add_tensor(std::string("w.") + std::string(type_name(t)), t, {256, 2}, q.data(), q.size());
        }
        seeds.push_back(w.to_bytes());
    }
    {
        // Small, version 2, custom alignment: mutations reach the tensor table more often.
        Writer w;
        w.set(kAlignmentKey, uint32_t(8));
        w.set("a", Array{ValueType::String, {"x", "yz"}});
        const float v[3] = {1, 2, 3};
        w.add_tensor("a", Type::F32, {3}, v, sizeof v);
        w.add_tensor("b", Type::F32, {1, 1, 1, 2}, v, 8);
        std::vector<uint8_t> bytes = w.to_bytes();
        bytes[4] = 2;
        seeds.push_back(std::move(bytes));
    }
    return seeds;
}

void mutate(std::vector<uint8_t>& b, std::mt19937& rng) {
    auto pick = [&](size_t n) { return n ? size_t(rng() % n) : 0; };
    const int n_mutations = 1 + int(rng() % 4);
    for (int m = 0; m < n_mutations && !b.empty(); ++m) {
        switch (rng() % 6) {
        case 0:
            b[pick(b.size())] ^= uint8_t(1u << (rng() % 8));
            break; // bit flip
        case 1:
            b[pick(b.size())] = uint8_t(rng());
            break; // random byte
        case 2: {
            // A hostile integer over a (probably) 4- or 8-byte field: lengths, counts,
            // dims, offsets and type ids all live at such positions.
            static constexpr uint64_t interesting[] = {
                0,          1,          2,          3,     4,          12,
                13,         31,         32,         255,   0x7fffffff, 0xffffffff,
                1ull << 32, 1ull << 62, ~0ull >> 1, ~0ull, ~0ull - 31, 0x100000000ull - 1};
            uint64_t v = interesting[rng() % std::size(interesting)];
            if (rng() % 4 == 0) v = (uint64_t(rng()) << 32) | rng();
            const size_t width = rng() % 2 ? 8 : 4;
            if (b.size() < width) break;
            const size_t at = pick(b.size() - width + 1) & ~size_t(3);
            std::memcpy(b.data() + at, &v, width);
            break;
        }
        case 3:
            b.resize(pick(b.size()));
            break; // truncate
        case 4: {
            const size_t at = pick(b.size() + 1), n = 1 + pick(16);
            std::vector<uint8_t> junk(n);
            for (uint8_t& j : junk) j = uint8_t(rng());
            b.insert(b.begin() + std::ptrdiff_t(at), junk.begin(), junk.end());
            break;
        }
        case 5: {
            const size_t at = pick(b.size()), n = std::min(b.size() - at, 1 + pick(16));
            b.erase(b.begin() + std::ptrdiff_t(at), b.begin() + std::ptrdiff_t(at + n));
            break;
        }
        }
    }
}

// Reads everything a loaded file offers; returns a checksum so nothing is optimized away.
double consume(const File& f) {
    double sum = 0;
    for (const KeyValue& kv : f.metadata().entries()) sum += double(kv.value.to_string(4).size());
    std::vector<float> out;
    for (const TensorInfo& t : f.tensors()) {
        const TypeTraits& tt = type_traits(t.type);
        const uint8_t* p = static_cast<const uint8_t*>(t.data);
        for (size_t i = 0; i < t.nbytes; ++i) sum += p[i];
        if (tt.to_float && t.n_elements() > 0 && t.n_elements() <= (1 << 20)) {
            out.resize(size_t(t.n_elements()));
            tt.to_float(t.data, out.data(), t.n_elements());
            for (float v : out) sum += std::isfinite(v) ? 0.0 : 1.0;
        }
    }
    return sum;
}

void fuzz_for(std::chrono::milliseconds budget) {
    const unsigned seed = std::random_device{}();
    INFO("seed " << seed);
    std::mt19937 rng(seed);
    const auto seeds = seed_files(rng);
    for (const auto& s : seeds) REQUIRE_NOTHROW(File::parse(s.data(), s.size()));

    size_t loaded = 0, rejected = 0;
    double checksum = 0;
    const auto deadline = std::chrono::steady_clock::now() + budget;
    while (std::chrono::steady_clock::now() < deadline) {
        for (int k = 0; k < 64; ++k) {
            std::vector<uint8_t> b = seeds[rng() % seeds.size()];
            mutate(b, rng);
            try {
                const File f = File::parse(b.data(), b.size(), "fuzz");
                checksum += consume(f);
                ++loaded;
            } catch (const Error& e) {
                // A rejection must say where.
                if (std::string(e.what()).find("at byte") == std::string::npos)
                    FAIL("no offset in: " << e.what());
                ++rejected;
            } catch (const std::exception& e) {
                FAIL("not a gfa::Error: " << e.what());
            }
        }
    }
    INFO("loaded " << loaded << ", rejected " << rejected << ", checksum " << checksum);
    CHECK(loaded > 0);
    CHECK(rejected > 0);
}

} // namespace

TEST_CASE("GGUF reader survives mutated files", "[gguf][fuzz]") {
    fuzz_for(std::chrono::milliseconds(2000));
}

TEST_CASE("GGUF reader survives mutated files, long run", "[gguf][fuzz][.slow]") {
    fuzz_for(std::chrono::milliseconds(30000));
}
