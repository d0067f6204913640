// The CUDA FlashAttention kernels against a double-precision reference of the descriptor's
// semantics (attention/problem.h), on fresh random inputs, with outputs poisoned by NaN
// before every run and odd sizes that do not fill the tiles.
#include <catch2/catch.hpp>

#include "../../backends/cuda/flash_attn_cuda.h"
#include "../scoped_env.h"
#include "attention/problem.h"
#include "attention/reference.h"
#include "quants.h"

#include <ggml-fa/error.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

using namespace gfa;
using attn::BackwardProblem;
using attn::Problem;
using attn::View;

namespace {

void cuda_ok(cudaError_t e, const char* what) {
    if (e != cudaSuccess) FAIL(std::string(what) + ": " + cudaGetErrorString(e));
}

struct DeviceBuffer {
    void* ptr = nullptr;
    size_t bytes = 0;
    explicit DeviceBuffer(size_t n) : bytes(n) {
        cuda_ok(cudaMalloc(&ptr, std::max<size_t>(n, 16)), "cudaMalloc");
    }
    ~DeviceBuffer() { cudaFree(ptr); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    void poison() { cuda_ok(cudaMemset(ptr, 0xff, bytes), "cudaMemset"); } // NaN in f32, f16 and bf16
    void upload(const std::vector<uint8_t>& h) {
        cuda_ok(cudaMemcpy(ptr, h.data(), h.size(), cudaMemcpyHostToDevice), "upload");
    }
    std::vector<uint8_t> download() const {
        std::vector<uint8_t> h(bytes);
        cuda_ok(cudaMemcpy(h.data(), ptr, bytes, cudaMemcpyDeviceToHost), "download");
        return h;
    }
};

// A host tensor kept as the float values the device sees (after rounding/quantization) and
// as its storage bytes.
struct HostTensor {
    Type type = Type::F32;
    int64_t ne[4] = {1, 1, 1, 1};
    std::vector<float> values;
    std::vector<uint8_t> bytes;
    size_t row_bytes() const { return row_size(type, ne[0]); }
    int64_t rows() const { return ne[1] * ne[2] * ne[3]; }
};

void encode(HostTensor& t) {
    const int64_t n = t.ne[0];
    t.bytes.assign(t.row_bytes() * t.rows(), 0);
    for (int64_t r = 0; r < t.rows(); ++r) {
        float* src = t.values.data() + r * n;
        uint8_t* dst = t.bytes.data() + r * t.row_bytes();
        switch (t.type) {
        case Type::F32:
            std::memcpy(dst, src, n * 4);
            break;
        case Type::F16:
            quant::f32_to_f16(src, dst, n);
            quant::f16_to_f32(dst, src, n);
            break;
        case Type::BF16:
            quant::f32_to_bf16(src, dst, n);
            quant::bf16_to_f32(dst, src, n);
            break;
        case Type::Q8_0:
            quant::quantize_q8_0(src, dst, n);
            quant::dequantize_q8_0(dst, src, n);
            break;
        case Type::Q4_0:
            quant::quantize_q4_0(src, dst, n);
            quant::dequantize_q4_0(dst, src, n);
            break;
        default:
            FAIL("unexpected type");
        }
    }
}

HostTensor random_tensor(Type type, int64_t n0, int64_t n1, int64_t n2, int64_t n3, std::mt19937& rng,
                         float lo = -1.0f, float hi = 1.0f) {
    HostTensor t;
    t.type = type;
    t.ne[0] = n0, t.ne[1] = n1, t.ne[2] = n2, t.ne[3] = n3;
    std::uniform_real_distribution<float> u(lo, hi);
    t.values.resize(size_t(n0 * n1 * n2 * n3));
    for (float& x : t.values) x = u(rng);
    encode(t);
    return t;
}

View view_of(const HostTensor& t, void* data) {
    View v;
    v.type = t.type;
    v.data = data;
    for (int i = 0; i < 4; ++i) v.ne[i] = t.ne[i];
    v.nb[0] = int64_t(type_traits(t.type).type_size);
    v.nb[1] = int64_t(t.row_bytes());
    v.nb[2] = v.nb[1] * t.ne[1];
    v.nb[3] = v.nb[2] * t.ne[2];
    return v;
}

View output_view(Type type, int64_t n0, int64_t n1, int64_t n2, int64_t n3, void* data) {
    HostTensor t;
    t.type = type;
    t.ne[0] = n0, t.ne[1] = n1, t.ne[2] = n2, t.ne[3] = n3;
    return view_of(t, data);
}

size_t bytes_of(Type type, int64_t n0, int64_t n1, int64_t n2, int64_t n3) {
    return row_size(type, n0) * n1 * n2 * n3;
}

std::vector<float> to_floats(const std::vector<uint8_t>& bytes, Type type, size_t n) {
    std::vector<float> out(n);
    if (type == Type::F32)
        std::memcpy(out.data(), bytes.data(), n * 4);
    else if (type == Type::F16)
        quant::f16_to_f32(bytes.data(), out.data(), int64_t(n));
    else
        quant::bf16_to_f32(bytes.data(), out.data(), int64_t(n));
    return out;
}

// ---- the reference (double precision, straight from the descriptor's definition) -------

struct Config {
    int64_t Dk = 64, Dv = 64, Sq = 1, Skv = 1, Hq = 1, Hkv = 1, B = 1;
    attn::Params params;
    Type compute = Type::F16; // type of k, v (unless kv_type says otherwise) and of q by default
    Type q_type = Type::F16, kv_type = Type::F16, o_type = Type::F32;
    int mask = 0; // 0 none, 1 f32, 2 f16
    bool mask_per_head = false;
    bool mask_per_batch = false;
    bool mask_structured = false; // hidden ends, zero middle, values near the diagonal (structured_mask)
    bool fully_masked_rows = false;
    bool sinks = false;
    bool deterministic = false;
    int64_t kv_row_pad = 0; // bytes after each K/V row: strided rows, as in a cache with heads interleaved
    int64_t q_offset = 0;   // bytes before Q in its buffer: rows that do not start 16-byte aligned

    std::string describe() const {
        std::ostringstream s;
        s << "Dk " << Dk << " Dv " << Dv << " Sq " << Sq << " Skv " << Skv << " Hq " << Hq << " Hkv " << Hkv
          << " B " << B << " q " << type_name(q_type) << " kv " << type_name(kv_type) << " o "
          << type_name(o_type) << " causal " << params.causal << " window " << params.window_left << "/"
          << params.window_right << " mask " << mask << (mask_per_head ? " per-head" : "")
          << (mask_per_batch ? " per-batch" : "") << (mask_structured ? " structured" : "")
          << (fully_masked_rows ? " +masked rows" : "") << " alibi " << params.max_bias << " softcap "
          << params.logit_softcap << " sinks " << sinks << " deterministic " << deterministic
          << " kv row pad " << kv_row_pad << " q offset " << q_offset;
        return s.str();
    }
};

struct Inputs {
    HostTensor q, k, v, mask, sinks, dO;
};

// A mask as graphs build them for causal attention, windows, padding and packed documents,
// with its own random shape in every slice (head, batch entry): key j is hidden from query i
// beyond an offset from the diagonal d = j - (i + Skv - Sq), outside a window, in the padded
// last keys, or in another document; visible scores get 0, except a band of random values
// near the diagonal. Its tiles are then hidden at the ends of rows and columns, hidden
// between documents, zero in the middle and mixed along the diagonal, at sizes that are no
// multiple of any tile.
void structure_mask(HostTensor& m, const Config& c, std::mt19937& rng) {
    std::uniform_int_distribution<int64_t> offset(-40, 40), band(0, 24), coin(0, 1);
    std::uniform_real_distribution<float> value(-2.0f, 2.0f);
    const int64_t slices = m.ne[2] * m.ne[3];
    for (int64_t z = 0; z < slices; ++z) {
        const int64_t hi = offset(rng);
        const int64_t lo = coin(rng) ? -(c.Skv / 3 + offset(rng)) : std::numeric_limits<int64_t>::min();
        const int64_t width = band(rng);
        const int64_t pad = std::uniform_int_distribution<int64_t>(0, c.Skv / 5)(rng);
        const int64_t doc = coin(rng) ? std::uniform_int_distribution<int64_t>(40, 300)(rng) : 0;
        for (int64_t i = 0; i < c.Sq; ++i) {
            const int64_t qpos = i + c.Skv - c.Sq;
            for (int64_t j = 0; j < c.Skv; ++j) {
                const int64_t d = j - qpos;
                const bool other_doc = doc > 0 && (qpos < 0 || qpos / doc != j / doc);
                const bool hidden = d > hi || d < lo || j >= c.Skv - pad || other_doc;
                m.values[size_t((z * c.Sq + i) * c.Skv + j)] =
                    hidden ? -INFINITY : (hi - d < width ? value(rng) : 0.0f);
            }
        }
    }
}

Inputs make_inputs(const Config& c, std::mt19937& rng) {
    Inputs in;
    in.q = random_tensor(c.q_type, c.Dk, c.Sq, c.Hq, c.B, rng);
    in.k = random_tensor(c.kv_type, c.Dk, c.Skv, c.Hkv, c.B, rng);
    in.v = random_tensor(c.kv_type, c.Dv, c.Skv, c.Hkv, c.B, rng);
    if (c.mask) {
        const int64_t hm = c.mask_per_head ? c.Hq : 1, bm = c.mask_per_batch ? c.B : 1;
        in.mask = random_tensor(c.mask == 1 ? Type::F32 : Type::F16, c.Skv, c.Sq, hm, bm, rng, -2.0f, 2.0f);
        std::bernoulli_distribution hole(0.1);
        if (c.mask_structured)
            structure_mask(in.mask, c, rng);
        else
            for (size_t idx = 0; idx < in.mask.values.size(); ++idx)
                if (hole(rng)) in.mask.values[idx] = -INFINITY;
        if (c.fully_masked_rows)
            for (int64_t h = 0; h < hm; ++h)
                for (int64_t i = 0; i < c.Sq; i += 3)
                    for (int64_t j = 0; j < c.Skv; ++j)
                        in.mask.values[(h * c.Sq + i) * c.Skv + j] = -INFINITY;
        encode(in.mask);
    }
    if (c.sinks) in.sinks = random_tensor(Type::F32, c.Hq, 1, 1, 1, rng, -1.0f, 2.0f);
    in.dO = random_tensor(c.compute, c.Dv, c.Hq, c.Sq, c.B, rng);
    return in;
}

struct Reference {
    std::vector<double> o, lse, dq, dk, dv, dsinks;
    // Sum over rows of |each row's term| of dsinks: dsinks is a sum of terms of either sign,
    // so its error is measured against their size, not against the (possibly cancelled) sum.
    std::vector<double> dsinks_scale;
};

// With o_stored (the output the forward wrote), the backward's D = rowsum(dO * O) uses it, as
// the kernels do: with a 16-bit O its rounding enters dS = P (dP - D) and, in rows that see one
// or two keys (dP close to D), can outweigh the small gradients themselves. The test then
// checks the kernels' arithmetic, not the precision the caller chose for O.
Reference reference(const Config& c, const Inputs& in, bool backward,
                    const std::vector<float>* o_stored = nullptr) {
    Reference r;
    r.o.assign(size_t(c.B * c.Sq * c.Hq * c.Dv), 0.0);
    r.lse.assign(size_t(c.B * c.Hq * c.Sq), 0.0);
    if (backward) {
        r.dq.assign(in.q.values.size(), 0.0);
        r.dk.assign(in.k.values.size(), 0.0);
        r.dv.assign(in.v.values.size(), 0.0);
        r.dsinks.assign(size_t(c.Hq), 0.0);
        r.dsinks_scale.assign(size_t(c.Hq), 0.0);
    }
    const int64_t G = c.Hq / c.Hkv;
    std::vector<double> s(size_t(c.Skv)), dscore(size_t(c.Skv)), p(size_t(c.Skv));
    std::vector<char> vis(size_t(c.Skv));
    for (int64_t b = 0; b < c.B; ++b)
        for (int64_t h = 0; h < c.Hq; ++h) {
            const int64_t hk = h / G;
            const double slope = attn::alibi_slope(c.params.max_bias, h, c.Hq);
            for (int64_t i = 0; i < c.Sq; ++i) {
                const float* q = &in.q.values[size_t(((b * c.Hq + h) * c.Sq + i) * c.Dk)];
                double m = -INFINITY;
                for (int64_t j = 0; j < c.Skv; ++j) {
                    const float* k = &in.k.values[size_t(((b * c.Hkv + hk) * c.Skv + j) * c.Dk)];
                    double qk = 0.0;
                    for (int64_t d = 0; d < c.Dk; ++d) qk += double(q[d]) * double(k[d]);
                    double x = c.params.scale * qk;
                    dscore[j] = c.params.scale;
                    if (c.params.logit_softcap > 0.0f) {
                        const double t = std::tanh(x / c.params.logit_softcap);
                        x = c.params.logit_softcap * t;
                        dscore[j] = c.params.scale * (1.0 - t * t);
                    }
                    bool visible = attn::visible(c.params, i, j, c.Sq, c.Skv);
                    if (c.mask) {
                        const int64_t hm = c.mask_per_head ? h : 0, bm = c.mask_per_batch ? b : 0;
                        const int64_t slice = bm * (c.mask_per_head ? c.Hq : 1) + hm;
                        const double mv = in.mask.values[size_t((slice * c.Sq + i) * c.Skv + j)];
                        if (std::isinf(mv) && mv < 0)
                            visible = false;
                        else
                            x += slope * mv;
                    }
                    vis[j] = visible;
                    s[j] = x;
                    if (visible) m = std::max(m, x);
                }
                const double sink = c.sinks ? double(in.sinks.values[size_t(h)]) : -INFINITY;
                m = std::max(m, sink);
                double denom = c.sinks ? std::exp(sink - m) : 0.0;
                for (int64_t j = 0; j < c.Skv; ++j) denom += vis[j] ? std::exp(s[j] - m) : 0.0;
                double* o = &r.o[size_t(((b * c.Sq + i) * c.Hq + h) * c.Dv)];
                const double lse = denom > 0.0 ? m + std::log(denom) : -INFINITY;
                r.lse[size_t((b * c.Hq + h) * c.Sq + i)] = lse;
                for (int64_t j = 0; j < c.Skv; ++j) {
                    p[j] = vis[j] && denom > 0.0 ? std::exp(s[j] - lse) : 0.0;
                    if (p[j] == 0.0) continue;
                    const float* v = &in.v.values[size_t(((b * c.Hkv + hk) * c.Skv + j) * c.Dv)];
                    for (int64_t d = 0; d < c.Dv; ++d) o[d] += p[j] * v[d];
                }
                if (!backward || denom == 0.0) continue;
                const float* dO = &in.dO.values[size_t(((b * c.Sq + i) * c.Hq + h) * c.Dv)];
                const float* o_used =
                    o_stored ? &(*o_stored)[size_t(((b * c.Sq + i) * c.Hq + h) * c.Dv)] : nullptr;
                double delta = 0.0;
                for (int64_t d = 0; d < c.Dv; ++d)
                    delta += double(dO[d]) * (o_used ? double(o_used[d]) : o[d]);
                if (c.sinks) {
                    r.dsinks[size_t(h)] -= std::exp(sink - lse) * delta;
                    r.dsinks_scale[size_t(h)] += std::abs(std::exp(sink - lse) * delta);
                }
                double* dq = &r.dq[size_t(((b * c.Hq + h) * c.Sq + i) * c.Dk)];
                for (int64_t j = 0; j < c.Skv; ++j) {
                    if (p[j] == 0.0) continue;
                    const size_t kv_row = size_t((b * c.Hkv + hk) * c.Skv + j);
                    const float* v = &in.v.values[kv_row * c.Dv];
                    const float* k = &in.k.values[kv_row * c.Dk];
                    double dp = 0.0;
                    for (int64_t d = 0; d < c.Dv; ++d) dp += double(dO[d]) * v[d];
                    const double ds = p[j] * (dp - delta) * dscore[j];
                    for (int64_t d = 0; d < c.Dv; ++d) r.dv[kv_row * c.Dv + d] += p[j] * dO[d];
                    for (int64_t d = 0; d < c.Dk; ++d) {
                        dq[d] += ds * k[d];
                        r.dk[kv_row * c.Dk + d] += ds * q[d];
                    }
                }
            }
        }
    return r;
}

// ||out - ref|| / max(||ref||, floor) over all elements; NaN anywhere fails, infinities must
// match. floor keeps values near zero (an LSE of a single key, say) from turning rounding of
// the inputs into a large relative error.
double rel_error(const std::vector<float>& out, const std::vector<double>& ref, std::string& problem,
                 double floor = 0.0) {
    double num = 0.0, den = 0.0;
    for (size_t idx = 0; idx < ref.size(); ++idx) {
        const double o = out[idx], r = ref[idx];
        if (std::isnan(o)) {
            problem = "NaN (unwritten or invalid) at element " + std::to_string(idx);
            return INFINITY;
        }
        if (std::isinf(r) || std::isinf(o)) {
            if (o != r) {
                problem = "infinity mismatch at element " + std::to_string(idx) + ": " + std::to_string(o) +
                          " vs " + std::to_string(r);
                return INFINITY;
            }
            continue;
        }
        num += (o - r) * (o - r);
        den += r * r;
    }
    den = std::max(den, floor * floor);
    return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

double tolerance(const Config& c) {
    const bool quantized = c.kv_type == Type::Q8_0 || c.kv_type == Type::Q4_0;
    if (c.compute == Type::BF16) return 1e-2;
    return quantized ? 5e-3 : 4e-3;
}

struct DeviceProblem {
    std::unique_ptr<DeviceBuffer> q, k, v, mask, sinks, o, lse, dO, dq, dk, dv, dsinks;
    Problem p;
    BackwardProblem bp;
};

std::unique_ptr<DeviceBuffer> upload(const HostTensor& t) {
    auto buf = std::make_unique<DeviceBuffer>(t.bytes.size());
    buf->upload(t.bytes);
    return buf;
}

// Uploads t with each row followed by `pad` unused bytes and returns its strided view.
View upload_padded(const HostTensor& t, int64_t pad, std::unique_ptr<DeviceBuffer>& buf) {
    const size_t row = t.row_bytes(), pitch = row + size_t(pad);
    std::vector<uint8_t> bytes(pitch * size_t(t.rows()), 0xff);
    for (int64_t r = 0; r < t.rows(); ++r)
        std::memcpy(&bytes[size_t(r) * pitch], &t.bytes[size_t(r) * row], row);
    buf = std::make_unique<DeviceBuffer>(bytes.size());
    buf->upload(bytes);
    View v = view_of(t, buf->ptr);
    v.nb[1] = int64_t(pitch);
    v.nb[2] = v.nb[1] * t.ne[1];
    v.nb[3] = v.nb[2] * t.ne[2];
    return v;
}

DeviceProblem device_problem(const Config& c, const Inputs& in) {
    DeviceProblem d;
    Problem& p = d.p;
    p.Dk = c.Dk, p.Dv = c.Dv, p.Sq = c.Sq, p.Skv = c.Skv, p.Hq = c.Hq, p.Hkv = c.Hkv, p.B = c.B;
    p.params = c.params;
    d.q = upload(in.q), d.k = upload(in.k), d.v = upload(in.v);
    p.q = view_of(in.q, d.q->ptr), p.k = view_of(in.k, d.k->ptr), p.v = view_of(in.v, d.v->ptr);
    if (c.q_offset) {
        std::vector<uint8_t> bytes(size_t(c.q_offset), 0xff);
        bytes.insert(bytes.end(), in.q.bytes.begin(), in.q.bytes.end());
        d.q = std::make_unique<DeviceBuffer>(bytes.size());
        d.q->upload(bytes);
        p.q = view_of(in.q, static_cast<uint8_t*>(d.q->ptr) + c.q_offset);
    }
    if (c.kv_row_pad) {
        p.k = upload_padded(in.k, c.kv_row_pad, d.k);
        p.v = upload_padded(in.v, c.kv_row_pad, d.v);
    }
    if (c.mask) d.mask = upload(in.mask), p.mask = view_of(in.mask, d.mask->ptr);
    if (c.sinks) d.sinks = upload(in.sinks), p.sinks = view_of(in.sinks, d.sinks->ptr);
    d.o = std::make_unique<DeviceBuffer>(bytes_of(c.o_type, c.Dv, c.Hq, c.Sq, c.B));
    p.o = output_view(c.o_type, c.Dv, c.Hq, c.Sq, c.B, d.o->ptr);
    d.lse = std::make_unique<DeviceBuffer>(bytes_of(Type::F32, c.Sq, c.Hq, c.B, 1));
    p.lse = output_view(Type::F32, c.Sq, c.Hq, c.B, 1, d.lse->ptr);
    d.o->poison();
    d.lse->poison();
    return d;
}

// The library's CPU reference (attention/reference.h) on the same host bytes: O and LSE in
// the layouts of Reference.
Reference library_reference(const Config& c, const Inputs& in) {
    Problem p;
    p.Dk = c.Dk, p.Dv = c.Dv, p.Sq = c.Sq, p.Skv = c.Skv, p.Hq = c.Hq, p.Hkv = c.Hkv, p.B = c.B;
    p.params = c.params;
    auto host = [](const HostTensor& t) { return view_of(t, const_cast<uint8_t*>(t.bytes.data())); };
    p.q = host(in.q), p.k = host(in.k), p.v = host(in.v);
    if (c.mask) p.mask = host(in.mask);
    if (c.sinks) p.sinks = host(in.sinks);
    std::vector<uint8_t> o_bytes(bytes_of(Type::F32, c.Dv, c.Hq, c.Sq, c.B));
    std::vector<uint8_t> lse_bytes(bytes_of(Type::F32, c.Sq, c.Hq, c.B, 1));
    p.o = output_view(Type::F32, c.Dv, c.Hq, c.Sq, c.B, o_bytes.data());
    p.lse = output_view(Type::F32, c.Sq, c.Hq, c.B, 1, lse_bytes.data());
    Reference r;
    r.o = attn::reference_forward_f64(p, &r.lse);
    return r;
}

// expect_decode: 1 (0) checks that the problem does (does not) take the decoding kernel;
// expect_hopper likewise for the warpgroup (wgmma) kernel.
void check_forward(const Config& c, std::mt19937& rng, uint32_t seed, bool library_ref = false,
                   int expect_decode = -1, int expect_hopper = -1) {
    INFO("seed " << seed << ": " << c.describe() << (library_ref ? " (library reference)" : ""));
    const Inputs in = make_inputs(c, rng);
    DeviceProblem d = device_problem(c, in);
    if (expect_decode >= 0) CHECK(cuda::flash_attn_forward_uses_decode_kernel(d.p) == bool(expect_decode));
    if (expect_hopper >= 0) CHECK(cuda::flash_attn_forward_uses_hopper_kernel(d.p) == bool(expect_hopper));
    cuda::flash_attn_forward(d.p, nullptr);
    cuda_ok(cudaDeviceSynchronize(), "forward");
    const Reference ref = library_ref ? library_reference(c, in) : reference(c, in, false);
    std::string problem;
    const auto o = to_floats(d.o->download(), c.o_type, ref.o.size());
    const double err_o = rel_error(o, ref.o, problem);
    INFO("o: rel error " << err_o << " " << problem);
    CHECK(err_o < tolerance(c));
    problem.clear();
    const auto lse = to_floats(d.lse->download(), Type::F32, ref.lse.size());
    // LSE is about 1 per row: floor the norm at sqrt(rows). Its error comes from q and k in
    // 16 bits (f32 q is rounded to the compute type), not from the softmax sums, which are fp32.
    const double err_lse = rel_error(lse, ref.lse, problem, std::sqrt(double(ref.lse.size())));
    INFO("lse: rel error " << err_lse << " " << problem);
    CHECK(err_lse < (c.compute == Type::BF16 ? 5e-3 : 2e-3));
}

struct BackwardResult {
    std::vector<uint8_t> dq, dk, dv, dsinks;
    std::vector<float> o; // the forward's output, as stored
};

BackwardResult run_backward(const Config& c, const Inputs& in, DeviceProblem& d) {
    cuda::flash_attn_forward(d.p, nullptr);
    BackwardProblem& bp = d.bp;
    bp.fwd = d.p;
    d.dO = upload(in.dO);
    bp.dO = view_of(in.dO, d.dO->ptr);
    d.dq = std::make_unique<DeviceBuffer>(bytes_of(c.compute, c.Dk, c.Sq, c.Hq, c.B));
    d.dk = std::make_unique<DeviceBuffer>(bytes_of(Type::F32, c.Dk, c.Skv, c.Hkv, c.B));
    d.dv = std::make_unique<DeviceBuffer>(bytes_of(c.compute, c.Dv, c.Skv, c.Hkv, c.B));
    bp.dq = output_view(c.compute, c.Dk, c.Sq, c.Hq, c.B, d.dq->ptr);
    bp.dk = output_view(Type::F32, c.Dk, c.Skv, c.Hkv, c.B, d.dk->ptr);
    bp.dv = output_view(c.compute, c.Dv, c.Skv, c.Hkv, c.B, d.dv->ptr);
    if (c.sinks) {
        d.dsinks = std::make_unique<DeviceBuffer>(bytes_of(Type::F32, c.Hq, 1, 1, 1));
        bp.dsinks = output_view(Type::F32, c.Hq, 1, 1, 1, d.dsinks->ptr);
        d.dsinks->poison();
    }
    bp.deterministic = c.deterministic;
    d.dq->poison(), d.dk->poison(), d.dv->poison();
    const size_t ws_bytes = cuda::flash_attn_backward_workspace_size(bp);
    DeviceBuffer ws(ws_bytes);
    ws.poison(); // the backward must initialise everything it reads
    cuda::flash_attn_backward(bp, nullptr, ws.ptr, ws.bytes);
    cuda_ok(cudaDeviceSynchronize(), "backward");
    BackwardResult r{d.dq->download(), d.dk->download(), d.dv->download(), {}, {}};
    r.o = to_floats(d.o->download(), c.o_type, size_t(c.B * c.Sq * c.Hq * c.Dv));
    if (c.sinks) r.dsinks = d.dsinks->download();
    return r;
}

// expect_hopper: 1 (0) checks that the dK/dV kernel is (is not) the warpgroup one.
void check_backward(const Config& c, std::mt19937& rng, uint32_t seed, int expect_hopper = -1) {
    INFO("seed " << seed << ": " << c.describe());
    const Inputs in = make_inputs(c, rng);
    DeviceProblem d = device_problem(c, in);
    const BackwardResult got = run_backward(c, in, d);
    if (expect_hopper >= 0) CHECK(cuda::flash_attn_backward_uses_hopper_kernel(d.bp) == bool(expect_hopper));
    const Reference ref = reference(c, in, true, &got.o);
    const double tol = c.compute == Type::BF16 ? 1.5e-2 : 5e-3;
    struct Item {
        const char* name;
        std::vector<float> out;
        const std::vector<double>* ref;
    };
    std::vector<Item> items = {{"dq", to_floats(got.dq, c.compute, ref.dq.size()), &ref.dq},
                               {"dk", to_floats(got.dk, Type::F32, ref.dk.size()), &ref.dk},
                               {"dv", to_floats(got.dv, c.compute, ref.dv.size()), &ref.dv}};
    for (const Item& it : items) {
        std::string problem;
        const double err = rel_error(it.out, *it.ref, problem);
        INFO(it.name << ": rel error " << err << " " << problem);
        CHECK(err < tol);
    }
    if (c.sinks) {
        const std::vector<float> ds = to_floats(got.dsinks, Type::F32, ref.dsinks.size());
        double num = 0.0, den = 0.0;
        bool finite = true;
        for (size_t h = 0; h < ds.size(); ++h) {
            finite = finite && std::isfinite(ds[h]);
            num += (double(ds[h]) - ref.dsinks[h]) * (double(ds[h]) - ref.dsinks[h]);
            den += ref.dsinks_scale[h] * ref.dsinks_scale[h];
        }
        const double err = std::sqrt(num / std::max(den, 1e-30));
        INFO("dsinks: error " << err << " relative to the size of its terms");
        CHECK(finite);
        CHECK(err < tol);
    }
}

Type pick(std::mt19937& rng, std::initializer_list<Type> types) {
    std::uniform_int_distribution<size_t> u(0, types.size() - 1);
    return *(types.begin() + u(rng));
}

// A random mix of features on top of the given sizes.
Config random_config(std::mt19937& rng, int64_t D, Type compute, int64_t Sq, int64_t Skv) {
    Config c;
    c.Dk = c.Dv = D;
    c.Sq = Sq, c.Skv = Skv;
    std::uniform_int_distribution<int> coin(0, 1), die(0, 5);
    const int groups[] = {1, 2, 4, 8};
    c.Hkv = 1 + coin(rng);
    c.Hq = c.Hkv * groups[die(rng) % 4];
    c.B = 1 + (Sq * Skv < 20000 ? coin(rng) : 0);
    c.compute = compute;
    c.kv_type = compute;
    c.q_type = die(rng) == 0 ? Type::F32 : compute;
    c.o_type = pick(rng, {Type::F32, Type::F16, Type::BF16});
    c.params.scale = 1.0f / std::sqrt(float(D));
    c.params.causal = coin(rng);
    if (die(rng) == 0) c.params.window_left = int(Skv / 3);
    if (die(rng) == 0) c.params.window_right = int(Skv / 4);
    c.mask = die(rng) < 2 ? 1 + coin(rng) : 0;
    c.mask_per_head = c.mask && coin(rng);
    if (c.mask && die(rng) == 0) c.params.max_bias = 8.0f;
    if (die(rng) == 0) c.params.logit_softcap = 5.0f;
    c.sinks = die(rng) == 0;
    return c;
}

uint32_t fresh_seed() {
    return std::random_device{}();
}

} // namespace

TEST_CASE("CUDA forward matches the reference across head dims, dtypes and sizes", "[cuda][fa]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    const int64_t dims[] = {64, 80, 96, 128, 192, 256};
    const std::pair<int64_t, int64_t> sizes[] = {{1, 1},     {3, 17},    {17, 3},  {113, 127},
                                                 {129, 113}, {127, 129}, {1, 1000}};
    for (int64_t D : dims)
        for (Type t : {Type::F16, Type::BF16})
            for (auto [Sq, Skv] : sizes) check_forward(random_config(rng, D, t, Sq, Skv), rng, seed);
}

TEST_CASE("CUDA forward matches the library's CPU reference", "[cuda][fa]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    for (int64_t D : {64, 96, 128, 256})
        for (Type t : {Type::F16, Type::BF16})
            for (auto [Sq, Skv] : {std::pair<int64_t, int64_t>{17, 113}, {129, 64}})
                check_forward(random_config(rng, D, t, Sq, Skv), rng, seed, true);
}

TEST_CASE("CUDA forward features one at a time", "[cuda][fa]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    for (Type t : {Type::F16, Type::BF16})
        for (int64_t D : {64, 128, 256}) {
            Config base;
            base.Dk = base.Dv = D, base.compute = base.q_type = base.kv_type = t;
            base.Sq = 113, base.Skv = 1000, base.Hq = 4, base.Hkv = 2;
            base.params.scale = 1.0f / std::sqrt(float(D));
            Config c = base;
            check_forward(c, rng, seed); // plain
            c = base, c.params.causal = true;
            check_forward(c, rng, seed); // causal, Sq < Skv
            c = base, c.params.causal = true, c.Sq = 1000, c.Skv = 113;
            check_forward(c, rng, seed); // causal, Sq > Skv: the first rows see nothing
            c = base, c.mask = 1, c.fully_masked_rows = true;
            check_forward(c, rng, seed); // fully masked rows: O = 0, LSE = -inf
            c = base, c.mask = 2, c.mask_per_head = true, c.params.max_bias = 8.0f, c.Hq = 6, c.Hkv = 3;
            check_forward(c, rng, seed); // f16 per-head mask with ALiBi (non-power-of-2 heads)
            c = base, c.params.logit_softcap = 3.0f;
            check_forward(c, rng, seed); // softcap
            c = base, c.sinks = true, c.params.causal = true, c.Sq = 1000, c.Skv = 113;
            check_forward(c, rng, seed); // sinks, also on rows with nothing visible
            c = base, c.params.window_left = 50, c.params.window_right = 10;
            check_forward(c, rng, seed); // sliding window
            c = base, c.params.window_left = 30, c.params.causal = true;
            check_forward(c, rng, seed); // causal sliding window
            c = base, c.q_type = Type::F32, c.o_type = t;
            check_forward(c, rng, seed); // f32 q, 16-bit o
            c = base, c.Hq = 8, c.Hkv = 1, c.B = 2, c.Dv = D == 64 ? 128 : 64;
            check_forward(c, rng, seed); // MQA, batch 2, Dk != Dv
        }
}

// Whether this build and device run the warpgroup kernel (sm_90a code on an sm_90 device).
bool hopper_kernel_expected() {
#if !defined(GFA_CUDA_SM90A)
    return false;
#endif
    int dev = 0, major = 0, minor = 0;
    cuda_ok(cudaGetDevice(&dev), "cudaGetDevice");
    cuda_ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "compute capability");
    cuda_ok(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "compute capability");
    return major == 9 && minor == 0;
}

// On top of base (300 queries, 517 keys: partial tiles): plain, causal with Sq < Skv and with
// Sq > Skv (the first rows see nothing), a window on both sides, a causal window, and GQA 8
// with packed rows of several heads per tile: what a kernel's own visibility masking must get
// right.
std::vector<Config> visibility_cases(const Config& base) {
    std::vector<Config> cases;
    Config c = base;
    cases.push_back(c);
    c = base, c.params.causal = true;
    cases.push_back(c);
    c = base, c.params.causal = true, c.Sq = 517, c.Skv = 300;
    cases.push_back(c);
    c = base, c.params.window_left = 150, c.params.window_right = 20;
    cases.push_back(c);
    c = base, c.params.window_left = 70, c.params.causal = true, c.Sq = c.Skv = 451;
    cases.push_back(c);
    c = base, c.Hq = 16, c.Hkv = 2, c.Sq = 97, c.params.causal = true;
    cases.push_back(c);
    return cases;
}

// The warpgroup kernel's cases: odd sizes (partial row and key tiles), causal rows that see
// nothing, windows, GQA packing across row tiles, sinks, Dk != Dv, f32 q, a split over keys;
// each under both schedules and under the mma.sync kernel, with fresh inputs every run.
TEST_CASE("CUDA forward on Hopper's warpgroup kernel and on the mma.sync kernel", "[cuda][fa][hopper]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    const bool sm90 = hopper_kernel_expected();
    if (!sm90) WARN("not an sm_90 device or no sm_90a code: only the mma.sync kernel runs here");
    for (Type t : {Type::F16, Type::BF16})
        for (int64_t D : {64, 80, 128}) {
            Config base;
            base.Dk = base.Dv = D, base.compute = base.q_type = base.kv_type = t;
            base.Sq = 300, base.Skv = 517, base.Hq = 4, base.Hkv = 2;
            base.params.scale = 1.0f / std::sqrt(float(D));
            std::vector<Config> cases = visibility_cases(base);
            Config c;
            c = base, c.sinks = true, c.params.causal = true, c.Sq = 517, c.Skv = 300;
            cases.push_back(c); // sinks, also on rows with nothing visible
            c = base, c.Hq = 8, c.Hkv = 1, c.B = 2, c.Dv = D == 128 ? 64 : 128;
            cases.push_back(c); // MQA, batch 2, Dk != Dv
            c = base, c.q_type = Type::F32, c.o_type = Type::F32;
            cases.push_back(c); // f32 q and o
            c = base, c.Sq = 65, c.Hq = 1, c.Hkv = 1, c.Skv = 20000;
            cases.push_back(c); // one row tile over many keys: split over keys
            for (const Config& cc : cases)
                for (const char* setting : {"2", "1", "0"}) {
                    // picks the forward kernel of plain problems on sm_90 devices: the warpgroup
                    // kernel with either schedule (2, 1), or the mma.sync kernel (0)
                    gfa::test::ScopedEnv env("GFA_CUDA_FA_HOPPER", setting);
                    INFO("GFA_CUDA_FA_HOPPER=" << setting);
                    const bool hopper = sm90 && std::string(setting) != "0";
                    check_forward(cc, rng, seed, false, 0, hopper ? 1 : 0);
                }
        }
}

// Masks with hidden, zero and mixed tiles (structure_mask): the kernels leave out the hidden
// tiles at the ends and read no values in zero tiles (MaskTiles); a tile classified wrongly,
// or a span one tile short or long, changes O or the gradients. Key counts that are multiples
// of 8 give f16 masks whole 16-byte rows (what a copy of the values through shared memory
// would need), 333 keys rows that are not.
TEST_CASE("CUDA forward and backward with structured explicit masks", "[cuda][fa][backward]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> coin(0, 1);
    const std::pair<int64_t, int64_t> sizes[] = {{250, 704}, {700, 248}, {333, 333}};
    for (int64_t D : {64, 128, 256})
        for (Type t : {Type::F16, Type::BF16})
            for (auto [Sq, Skv] : sizes) {
                Config c;
                c.Dk = c.Dv = D, c.compute = c.q_type = c.kv_type = c.o_type = t;
                c.Sq = Sq, c.Skv = Skv;
                c.Hkv = 1 + coin(rng), c.Hq = c.Hkv * (1 + 3 * coin(rng));
                c.B = 1 + coin(rng);
                c.params.scale = 1.0f / std::sqrt(float(D));
                c.mask = 1 + coin(rng), c.mask_structured = true, c.mask_per_batch = c.B > 1 && coin(rng);
                if (coin(rng)) c.params.max_bias = 8.0f;
                c.sinks = coin(rng) && coin(rng);
                check_forward(c, rng, seed);
                c.deterministic = coin(rng) && coin(rng);
                check_backward(c, rng, seed);
            }
}

TEST_CASE("CUDA decode path (split-KV, GQA packing) matches the reference", "[cuda][fa][decode]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    for (Type kv : {Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0})
        for (int64_t Skv : {1000, 4097})
            for (int64_t G : {1, 4, 8}) {
                Config c;
                c.compute = kv == Type::BF16 ? Type::BF16 : Type::F16;
                c.kv_type = kv;
                c.q_type = Type::F32;
                c.Dk = c.Dv = G == 1 ? 64 : G == 4 ? 128 : 256;
                c.Sq = G == 8 ? 2 : 1;
                c.Skv = Skv;
                c.Hkv = 2, c.Hq = 2 * G;
                c.B = G == 1 ? 3 : 1;
                c.params.scale = 1.0f / std::sqrt(float(c.Dk));
                c.params.causal = Skv == 4097;
                c.sinks = G == 4;
                c.mask = G == 8 ? 2 : 0;
                check_forward(c, rng, seed);
            }
}

namespace {

// A decoding problem: Sq query positions, G query heads per KV head (Sq * G <= 16), K/V of
// type kv, a random q type (which sets the compute type for quantized K/V) and output type.
Config decode_config(std::mt19937& rng, Type kv, int64_t D, int64_t Sq, int64_t G, int64_t Skv) {
    Config c;
    c.kv_type = kv;
    if (kv == Type::F16 || kv == Type::BF16) {
        c.q_type = pick(rng, {kv, Type::F32});
        c.compute = kv;
    } else {
        c.q_type = pick(rng, {Type::F16, Type::F32, Type::BF16});
        c.compute = c.q_type == Type::BF16 ? Type::BF16 : Type::F16;
    }
    c.o_type = pick(rng, {Type::F32, Type::F16, Type::BF16});
    c.Dk = c.Dv = D;
    c.Sq = Sq, c.Skv = Skv;
    c.Hkv = Skv > 5000 ? 1 : 2;
    c.Hq = c.Hkv * G;
    c.B = Skv <= 1000 ? 2 : 1;
    c.params.scale = 1.0f / std::sqrt(float(D));
    return c;
}

const Type kDecodeKvTypes[] = {Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0};

} // namespace

TEST_CASE("CUDA decode kernel over key lengths, head dims, K/V types and GQA groups", "[cuda][fa][decode]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    const int64_t key_lengths[] = {1, 7, 64, 255, 1000, 4097, 70000};
    const std::pair<int64_t, int64_t> rows[] = {{1, 1}, {1, 4}, {1, 8}, {2, 8},
                                                {3, 4}, {5, 1}, {2, 1}}; // Sq, G
    std::uniform_int_distribution<int> coin(0, 1), die(0, 5);
    int kv_index = 0;
    for (Type kv : kDecodeKvTypes) {
        for (int64_t D : {64, 128, 256})
            for (size_t li = 0; li < std::size(key_lengths); ++li) {
                const auto [Sq, G] = rows[(li + size_t(D / 64) + size_t(kv_index)) % std::size(rows)];
                Config c = decode_config(rng, kv, D, Sq, G, key_lengths[li]);
                c.params.causal = coin(rng);
                if (die(rng) == 0) c.params.window_left = int(c.Skv / 3);
                c.mask = die(rng) < 2 ? 1 + coin(rng) : 0;
                c.mask_per_head = c.mask && coin(rng);
                if (c.mask && die(rng) == 0) c.params.max_bias = 8.0f;
                if (die(rng) == 0) c.params.logit_softcap = 5.0f;
                c.sinks = die(rng) == 0;
                check_forward(c, rng, seed, false, 1);
            }
        ++kv_index;
    }
}

TEST_CASE("CUDA decode kernel features one at a time", "[cuda][fa][decode]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    for (Type kv : kDecodeKvTypes)
        for (int64_t D : {64, 128, 256}) {
            const Config base = decode_config(rng, kv, D, 1, 4, 1000);
            Config c = base;
            check_forward(c, rng, seed, false, 1); // plain
            c = decode_config(rng, kv, D, 3, 4, 1000), c.params.causal = true;
            check_forward(c, rng, seed, false, 1); // causal, 12 rows
            c = decode_config(rng, kv, D, 5, 3, 3), c.params.causal = true;
            check_forward(c, rng, seed, false, 1); // causal, Sq > Skv: the first rows see nothing
            c = decode_config(rng, kv, D, 4, 4, 1000), c.mask = 1, c.fully_masked_rows = true;
            check_forward(c, rng, seed, false, 1); // fully masked rows: O = 0, LSE = -inf, 16 rows
            c = decode_config(rng, kv, D, 5, 3, 1000), c.mask = 2, c.mask_per_head = true,
            c.params.max_bias = 8.0f;
            check_forward(c, rng, seed, false, 1); // f16 per-head mask, ALiBi over 6 heads
            c = base, c.params.logit_softcap = 3.0f;
            check_forward(c, rng, seed, false, 1); // softcap
            c = base, c.mask = 1, c.params.logit_softcap = 3.0f, c.params.scale = -0.05f;
            check_forward(c, rng, seed, false, 1); // softcap, mask and a negative scale
            c = decode_config(rng, kv, D, 5, 3, 3), c.sinks = true, c.params.causal = true;
            check_forward(c, rng, seed, false, 1); // sinks, also on rows with nothing visible
            c = base, c.sinks = true;
            check_forward(c, rng, seed, false, 1); // sinks with the split-KV combine
            c = decode_config(rng, kv, D, 2, 4, 1000), c.params.window_left = 50, c.params.window_right = 10;
            check_forward(c, rng, seed, false, 1); // sliding window: a small part of the keys
            c = decode_config(rng, kv, D, 3, 2, 4097), c.params.window_left = 300, c.params.causal = true;
            check_forward(c, rng, seed, false, 1); // causal sliding window over a long cache
            c = decode_config(rng, kv, D, 2, 1, 1000), c.params.window_left = 0, c.params.window_right = 0;
            check_forward(c, rng, seed, false, 1); // one key per row
            c = decode_config(rng, kv, D, 2, 8, 255), c.B = 3, c.mask = 2;
            check_forward(c, rng, seed, false, 1); // batch 3, 16 rows, f16 mask
        }
}

// Given int8 column memory, a split-KV forward's combine kernel also writes o (f32, packed)
// rounded in blocks of 32 as a quantized matrix-vector product reads it (column i + Sq * b:
// the Hq * Dv values of position i, batch b). The blocks must be bit for bit the rounding of
// the o it stored (the same steps on the host: d = max |v| / 127, q = round(v / d), sum of q).
// Where it cannot (no split, o not f32) it says so and leaves the memory alone.
TEST_CASE("CUDA split-KV forward writes o's int8 column blocks, bit for bit a rounding of o",
          "[cuda][fa][decode]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    struct Case {
        int64_t D, Sq, G, Hkv, Skv, B;
        Type o_type;
        bool rounds; // whether the forward can write the blocks
    };
    for (const Case& k :
         {Case{64, 1, 8, 4, 640, 1, Type::F32, true}, Case{128, 3, 4, 2, 1000, 2, Type::F32, true},
          Case{256, 2, 8, 1, 4097, 1, Type::F32, true}, Case{64, 1, 8, 4, 640, 1, Type::F16, false},
          Case{64, 1, 1, 1, 3, 1, Type::F32, false}}) {
        Config c = decode_config(rng, Type::F16, k.D, k.Sq, k.G, k.Skv);
        c.Hkv = k.Hkv, c.Hq = k.Hkv * k.G, c.B = k.B, c.o_type = k.o_type;
        INFO("seed " << seed << ": " << c.describe());
        const Inputs in = make_inputs(c, rng);
        DeviceProblem d = device_problem(c, in);
        const int64_t K = c.Hq * c.Dv, columns = c.Sq * c.B, blocks = columns * K / 32;
        DeviceBuffer q(size_t(columns * K)), ds(size_t(blocks) * 2 * sizeof(float));
        q.poison(), ds.poison();
        const bool rounded = cuda::flash_attn_forward(
            d.p, nullptr, nullptr, 0, {static_cast<int8_t*>(q.ptr), static_cast<float*>(ds.ptr)});
        cuda_ok(cudaDeviceSynchronize(), "forward");
        REQUIRE(rounded == k.rounds);
        const std::vector<uint8_t> q_bytes = q.download(), ds_bytes = ds.download();
        if (!rounded) {
            CHECK(std::all_of(q_bytes.begin(), q_bytes.end(), [](uint8_t v) { return v == 0xff; }));
            CHECK(std::all_of(ds_bytes.begin(), ds_bytes.end(), [](uint8_t v) { return v == 0xff; }));
            continue;
        }
        const std::vector<float> o = to_floats(d.o->download(), Type::F32, size_t(columns * K));
        std::vector<float> got_ds(size_t(blocks) * 2);
        std::memcpy(got_ds.data(), ds_bytes.data(), ds_bytes.size());
        int64_t wrong = 0;
        for (int64_t blk = 0; blk < blocks; ++blk) {
            const float* v = o.data() + 32 * blk;
            float amax = 0.0f;
            for (int l = 0; l < 32; ++l) amax = std::max(amax, std::fabs(v[l]));
            const float scale = amax / 127.0f, inv = scale > 0.0f ? 1.0f / scale : 0.0f;
            int sum = 0;
            for (int l = 0; l < 32; ++l) {
                const int want = std::clamp(int(std::nearbyint(v[l] * inv)), -127, 127);
                sum += want;
                wrong += int8_t(q_bytes[size_t(32 * blk + l)]) != want;
            }
            wrong += got_ds[size_t(2 * blk)] != scale || got_ds[size_t(2 * blk + 1)] != scale * float(sum);
        }
        CHECK(wrong == 0);
    }
}

TEST_CASE("CUDA decode kernel with strided K/V rows, and what it leaves to the main kernel",
          "[cuda][fa][decode]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    struct Case {
        Type kv;
        int64_t D, pad;
        bool decode;
    };
    const Case cases[] = {
        {Type::Q8_0, 128, 4, true},  // rows 4-byte aligned: 4-byte copies
        {Type::Q4_0, 256, 4, true},  // likewise
        {Type::Q8_0, 64, 0, true},   // 68-byte rows: 4-byte copies
        {Type::Q4_0, 128, 8, true},  // 8-byte copies
        {Type::Q8_0, 128, 2, false}, // rows only 2-byte aligned
        {Type::F16, 128, 16, true},  // 16-byte aligned rows
        {Type::F16, 128, 8, false},  // 16-bit rows need 16-byte alignment
        {Type::BF16, 64, 32, true},
    };
    for (const Case& k : cases) {
        Config c = decode_config(rng, k.kv, k.D, 1, 8, 1000);
        c.kv_row_pad = k.pad;
        c.params.causal = true;
        check_forward(c, rng, seed, false, int(k.decode));
    }
    Config c = decode_config(rng, Type::F16, 128, 17, 1, 300); // 17 rows per KV head
    check_forward(c, rng, seed, false, 0);
    c = decode_config(rng, Type::F16, 128, 1, 8, 300), c.Dv = 64; // Dk != Dv
    check_forward(c, rng, seed, false, 0);
    c = decode_config(rng, Type::F16, 96, 1, 8, 300); // head dim 96
    check_forward(c, rng, seed, false, 0);
    // Q rows that do not start 16-byte aligned are read element by element
    for (Type q : {Type::F32, Type::F16, Type::BF16})
        for (int64_t D : {64, 128, 256}) {
            c = decode_config(rng, q == Type::BF16 ? Type::BF16 : Type::F16, D, 1, 4, 700);
            c.q_type = q;
            c.q_offset = q == Type::F32 ? 4 : 2;
            c.mask = 1 + int(D == 128);
            check_forward(c, rng, seed, false, 1);
        }
}

TEST_CASE("CUDA backward matches the reference", "[cuda][fa][backward]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    // 72 and 200 end in half a group of the dQ accumulator's interleaved columns (dq_accum_col)
    const int64_t dims[] = {64, 72, 80, 96, 128, 192, 200, 256};
    const std::pair<int64_t, int64_t> sizes[] = {{1, 1},     {3, 17},    {17, 3},
                                                 {113, 129}, {129, 127}, {200, 300}};
    std::uniform_int_distribution<int> coin(0, 1);
    for (int64_t D : dims)
        for (Type t : {Type::F16, Type::BF16})
            for (auto [Sq, Skv] : sizes) {
                Config c = random_config(rng, D, t, Sq, Skv);
                c.q_type = t;
                c.kv_type = t;
                c.o_type = t; // delta = rowsum(dO * O) comes from the stored O, as in training
                c.deterministic = coin(rng);
                check_backward(c, rng, seed);
            }
}

TEST_CASE("CUDA backward features one at a time", "[cuda][fa][backward]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    for (Type t : {Type::F16, Type::BF16})
        for (int64_t D : {64, 128, 256}) {
            Config base;
            base.Dk = base.Dv = D, base.compute = base.q_type = base.kv_type = t;
            base.Sq = 150, base.Skv = 131, base.Hq = 4, base.Hkv = 1;
            base.params.scale = 1.0f / std::sqrt(float(D));
            Config c = base;
            c.params.causal = true;
            check_backward(c, rng, seed);
            c = base, c.params.causal = true, c.deterministic = true;
            check_backward(c, rng, seed);
            c = base, c.mask = 1, c.fully_masked_rows = true, c.params.max_bias = 4.0f,
            c.mask_per_head = true;
            check_backward(c, rng, seed);
            c = base, c.params.logit_softcap = 4.0f;
            check_backward(c, rng, seed);
            c = base, c.params.logit_softcap = 4.0f, c.deterministic = true;
            check_backward(c, rng, seed);
            c = base, c.sinks = true, c.params.window_left = 40, c.params.window_right = 5;
            check_backward(c, rng, seed);
        }
}

// The warpgroup dK/dV kernel's cases (head-dim tiles 64 and 128): partial query and key tiles,
// causal rows that see nothing, windows, GQA, sinks, Dk != Dv, head dims under the tile,
// several query tiles per head, deterministic mode; each also on the mma.sync kernels.
TEST_CASE("CUDA backward on Hopper's warpgroup kernel and on the mma.sync kernels",
          "[cuda][fa][backward][hopper]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    const bool sm90 = hopper_kernel_expected();
    if (!sm90) WARN("not an sm_90 device or no sm_90a code: only the mma.sync kernels run here");
    for (Type t : {Type::F16, Type::BF16})
        for (int64_t D : {64, 40, 128, 96}) {
            Config base;
            base.Dk = base.Dv = D, base.compute = base.q_type = base.kv_type = base.o_type = t;
            base.Sq = 300, base.Skv = 517, base.Hq = 4, base.Hkv = 2;
            base.params.scale = 1.0f / std::sqrt(float(D));
            std::vector<Config> cases = visibility_cases(base);
            Config c;
            c = base, c.sinks = true, c.params.causal = true, c.deterministic = true;
            cases.push_back(c); // sinks, deterministic dQ
            c = base, c.Hq = 8, c.Hkv = 1, c.B = 2, c.Dv = D == 64 ? 48 : D == 128 ? 104 : 64;
            cases.push_back(c); // MQA, batch 2, Dk != Dv
            c = base, c.Sq = 1, c.Skv = 1;
            cases.push_back(c); // one query, one key
            c = base, c.Sq = 640, c.Skv = 384, c.Hq = c.Hkv = 1;
            cases.push_back(c); // whole tiles only
            for (const Config& cc : cases)
                for (const char* setting : {"1", "0"}) {
                    gfa::test::ScopedEnv env("GFA_CUDA_FA_HOPPER_BWD", setting);
                    INFO("GFA_CUDA_FA_HOPPER_BWD=" << setting);
                    const bool hopper = sm90 && std::string(setting) != "0";
                    check_backward(cc, rng, seed, hopper ? 1 : 0);
                }
        }
}

TEST_CASE("CUDA deterministic backward is bit-identical across runs", "[cuda][fa][backward]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    for (int64_t D : {64, 128, 256}) {
        Config c;
        c.Dk = c.Dv = D, c.compute = c.q_type = c.kv_type = Type::BF16;
        c.Sq = 300, c.Skv = 257, c.Hq = 8, c.Hkv = 2, c.B = 2;
        c.params.scale = 1.0f / std::sqrt(float(D));
        c.params.causal = D != 128;
        c.sinks = true;
        c.deterministic = true;
        INFO("seed " << seed << ": " << c.describe());
        const Inputs in = make_inputs(c, rng);
        DeviceProblem d = device_problem(c, in);
        const BackwardResult first = run_backward(c, in, d);
        for (int rep = 0; rep < 3; ++rep) {
            const BackwardResult again = run_backward(c, in, d);
            CHECK(again.dq == first.dq);
            CHECK(again.dk == first.dk);
            CHECK(again.dv == first.dv);
            CHECK(again.dsinks == first.dsinks);
        }
    }
}

// The same values stored as f32 (exact: they are already rounded to the tensor's type).
HostTensor as_f32(const HostTensor& t) {
    HostTensor f = t;
    f.type = Type::F32;
    encode(f);
    return f;
}

// Operands the kernels would convert on every tile load (f32, 16-bit rows cp.async cannot
// read) are converted once into the workspace first (staging). The copy must hold what the
// inline conversion gave: the same problem with its inputs already in the compute type
// gives the same bits, forward and (deterministic) backward.
TEST_CASE("CUDA flash attention with f32 or unaligned inputs equals the compute type bit for bit",
          "[cuda][fa][backward]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    for (Type t : {Type::F16, Type::BF16})
        for (int64_t D : {64, 128, 256})
            for (int variant = 0; variant < 2; ++variant) {
                Config c;
                c.Dk = c.Dv = D, c.compute = c.q_type = c.kv_type = c.o_type = t;
                c.Sq = 150, c.Skv = 131, c.Hq = 4, c.Hkv = 2, c.B = 2; // several query-row tiles
                c.params.scale = 1.0f / std::sqrt(float(D));
                c.params.causal = variant == 1;
                c.mask = variant == 0 ? 1 : 0;
                c.deterministic = true;
                INFO("seed " << seed << ": " << c.describe() << (variant ? " (K/V rows unaligned)" : ""));
                const Inputs in = make_inputs(c, rng);
                DeviceProblem direct = device_problem(c, in);
                const BackwardResult want = run_backward(c, in, direct);
                const auto want_lse = direct.lse->download();

                // f32 Q, V and dO; K too where the compute type is f16 (with K in f32 the
                // kernels compute in Q's type, so a bf16 problem keeps a bf16 K).
                Config c2 = c;
                Inputs in2 = in;
                in2.q = as_f32(in.q), in2.v = as_f32(in.v), in2.dO = as_f32(in.dO);
                if (t == Type::F16) in2.k = as_f32(in.k);
                c2.q_type = Type::F32;
                if (variant == 1) { // instead: 16-bit K/V whose rows are 8 bytes apart from 16
                    in2.k = in.k, in2.v = in.v;
                    c2.kv_row_pad = 8;
                }
                DeviceProblem staged = device_problem(c2, in2);
                const BackwardResult got = run_backward(c2, in2, staged);
                CHECK(cuda::flash_attn_backward_workspace_size(staged.bp) >
                      cuda::flash_attn_backward_workspace_size(direct.bp)); // it did stage
                CHECK(staged.o->download() == direct.o->download());
                CHECK(staged.lse->download() == want_lse);
                CHECK(got.dq == want.dq);
                CHECK(got.dk == want.dk);
                CHECK(got.dv == want.dv);
            }
}

TEST_CASE("CUDA flash attention rejects what it does not support", "[cuda][fa]") {
    std::mt19937 rng(fresh_seed());
    Config c;
    c.Dk = c.Dv = 64, c.Sq = 4, c.Skv = 4, c.Hq = 3, c.Hkv = 2;
    const Inputs in = make_inputs(c, rng);
    DeviceProblem d = device_problem(c, in);
    CHECK_THROWS_AS(cuda::flash_attn_forward(d.p, nullptr), gfa::Error); // Hq % Hkv != 0
    c.Hq = 2;
    const Inputs in2 = make_inputs(c, rng);
    DeviceProblem d2 = device_problem(c, in2);
    d2.p.Dk = 72; // shape of q no longer matches
    CHECK_THROWS_AS(cuda::flash_attn_forward(d2.p, nullptr), gfa::Error);
    d2.p.Dk = 64;
    d2.p.o.type = Type::Q8_0;
    CHECK_THROWS_AS(cuda::flash_attn_forward(d2.p, nullptr), gfa::Error);
    // a workspace (split-KV decoding needs one) that is too small or not 256-byte aligned
    Config dc = decode_config(rng, Type::F16, 128, 1, 4, 4000);
    const Inputs din = make_inputs(dc, rng);
    DeviceProblem dd = device_problem(dc, din);
    const size_t need = cuda::flash_attn_forward_workspace_size(dd.p);
    REQUIRE(need > 0);
    DeviceBuffer ws(need + 256);
    CHECK_THROWS_WITH(cuda::flash_attn_forward(dd.p, nullptr, ws.ptr, need - 4), Catch::Contains("needed"));
    CHECK_THROWS_WITH(cuda::flash_attn_forward(dd.p, nullptr, static_cast<char*>(ws.ptr) + 16, need),
                      Catch::Contains("aligned"));
    cuda::flash_attn_forward(dd.p, nullptr, ws.ptr, need); // and an aligned one of the right size works
    cuda_ok(cudaDeviceSynchronize(), "forward");
}

// Small cases for compute-sanitizer (memcheck, racecheck): hidden from the default run.
TEST_CASE("CUDA flash attention small cases for the sanitizers", "[.sanitize]") {
    const uint32_t seed = fresh_seed();
    std::mt19937 rng(seed);
    for (int64_t D : {64, 128}) {
        Config c;
        c.Dk = c.Dv = D, c.compute = c.q_type = c.kv_type = Type::F16;
        c.Sq = 70, c.Skv = 130, c.Hq = 2, c.Hkv = 1;
        c.params.scale = 0.1f, c.params.causal = true;
        c.mask = 1, c.sinks = true;
        check_forward(c, rng, seed);
        check_backward(c, rng, seed);
        Config m = c; // a structured mask per batch entry: classified tiles (MaskTiles)
        m.Sq = 150, m.Skv = 296, m.B = 2, m.mask = 2, m.params.causal = false, m.mask_structured = true,
        m.mask_per_batch = true;
        check_forward(m, rng, seed);
        check_backward(m, rng, seed);
        Config h = c; // no mask: the warpgroup dK/dV kernel on Hopper
        h.mask = 0;
        check_backward(h, rng, seed);
        c.deterministic = true, c.params.logit_softcap = 3.0f;
        check_backward(c, rng, seed);
        Config d = c; // split-KV decode
        d.Sq = 1, d.Skv = 3000, d.Hq = 8, d.Hkv = 2, d.mask = 0, d.params.causal = false,
        d.params.logit_softcap = 0.0f;
        check_forward(d, rng, seed);
        d.kv_type = Type::Q8_0, d.mask = 1, d.sinks = true; // the decoding kernel's quantized path
        check_forward(d, rng, seed);
    }
    Config d; // the decoding kernel at D = 256 (Q through shared memory)
    d.Dk = d.Dv = 256, d.compute = d.q_type = d.kv_type = Type::F16;
    d.Sq = 1, d.Skv = 777, d.Hq = 4, d.Hkv = 1;
    d.params.scale = 0.06f;
    check_forward(d, rng, seed);
}
