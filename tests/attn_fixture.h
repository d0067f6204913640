// Builds random flash_attn_ext problems (owned buffers + the descriptor over them) for
// the tests of every attention backend.
#pragma once

#include "attention/problem.h"

#include <ggml-fa/types.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace gfa::attn::testing {

// Contiguous storage for one view.
struct Tensor {
    View view;
    std::vector<uint8_t> bytes;

    Tensor() = default;
    Tensor(Type t, int64_t n0, int64_t n1 = 1, int64_t n2 = 1, int64_t n3 = 1) {
        view.type = t;
        const int64_t ne[4] = {n0, n1, n2, n3};
        for (int d = 0; d < 4; ++d) view.ne[d] = ne[d];
        view.nb[0] = int64_t(type_traits(t).type_size);
        view.nb[1] = int64_t(row_size(t, n0));
        view.nb[2] = view.nb[1] * n1;
        view.nb[3] = view.nb[2] * n2;
        bytes.resize(size_t(view.nb[3] * n3));
        view.data = bytes.data();
    }
    int64_t rows() const { return view.ne[1] * view.ne[2] * view.ne[3]; }
    char* row(int64_t r) { return reinterpret_cast<char*>(bytes.data()) + r * view.nb[1]; }

    void set_floats(const std::vector<float>& x) {
        for (int64_t r = 0; r < rows(); ++r)
            type_traits(view.type).from_float(&x[size_t(r * view.ne[0])], row(r), view.ne[0]);
    }
    std::vector<float> floats() const {
        std::vector<float> x(size_t(rows() * view.ne[0]));
        for (int64_t r = 0; r < rows(); ++r)
            type_traits(view.type).to_float(bytes.data() + r * view.nb[1], &x[size_t(r * view.ne[0])],
                                            view.ne[0]);
        return x;
    }
    void fill_uniform(std::mt19937& rng, float lo, float hi) {
        std::uniform_real_distribution<float> dist(lo, hi);
        std::vector<float> x(size_t(rows() * view.ne[0]));
        for (float& v : x) v = dist(rng);
        set_floats(x);
    }
    // NaN in every element so an unwritten output cannot pass.
    void poison() {
        std::vector<float> x(size_t(rows() * view.ne[0]), std::numeric_limits<float>::quiet_NaN());
        if (view.type == Type::F32 || view.type == Type::F16 || view.type == Type::BF16) set_floats(x);
    }
};

struct CaseSpec {
    int64_t Dk = 64, Dv = 64, Sq = 17, Skv = 17, Hq = 2, Hkv = 2, B = 1;
    Type q_type = Type::F32, k_type = Type::F32, v_type = Type::F32, o_type = Type::F32;
    Type grad_type = Type::F32; // dO, dq, dk, dv
    Params params;
    bool mask = false;
    Type mask_type = Type::F32;
    bool mask_per_head = false, mask_per_batch = false;
    float mask_neg_inf_fraction = 0.1f; // random -inf entries
    bool mask_full_rows = false;        // make some whole rows -inf
    bool sinks = false;
    bool lse = true;

    std::string describe() const {
        return "Dk=" + std::to_string(Dk) + " Dv=" + std::to_string(Dv) + " Sq=" + std::to_string(Sq) +
               " Skv=" + std::to_string(Skv) + " Hq=" + std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) +
               " B=" + std::to_string(B) + " q=" + std::string(type_name(q_type)) +
               " k=" + std::string(type_name(k_type)) + " v=" + std::string(type_name(v_type)) +
               " o=" + std::string(type_name(o_type)) + " causal=" + std::to_string(params.causal) +
               " win=" + std::to_string(params.window_left) + "/" + std::to_string(params.window_right) +
               " softcap=" + std::to_string(params.logit_softcap) +
               " max_bias=" + std::to_string(params.max_bias) + " mask=" + std::to_string(mask) +
               (mask_full_rows ? "(full rows)" : "") + " sinks=" + std::to_string(sinks) +
               (params.precision == attn::Precision::BF16 ? " bf16 products" : "");
    }
};

// A forward problem with its buffers; the descriptor points into this object, so it is
// handed out by unique_ptr to keep the addresses fixed.
struct Case {
    CaseSpec spec;
    Tensor q, k, v, mask, sinks, o, lse;
    Tensor dO, dq, dk, dv, dsinks;
    Problem p;
    BackwardProblem bp;
};

inline std::unique_ptr<Case> make_case(const CaseSpec& s, std::mt19937& rng, bool backward = false) {
    auto c = std::make_unique<Case>();
    c->spec = s;
    c->q = Tensor(s.q_type, s.Dk, s.Sq, s.Hq, s.B);
    c->k = Tensor(s.k_type, s.Dk, s.Skv, s.Hkv, s.B);
    c->v = Tensor(s.v_type, s.Dv, s.Skv, s.Hkv, s.B);
    c->q.fill_uniform(rng, -1.0f, 1.0f);
    c->k.fill_uniform(rng, -1.0f, 1.0f);
    c->v.fill_uniform(rng, -1.0f, 1.0f);
    c->o = Tensor(s.o_type, s.Dv, s.Hq, s.Sq, s.B);
    c->o.poison();
    Problem& p = c->p;
    p.Dk = s.Dk, p.Dv = s.Dv, p.Sq = s.Sq, p.Skv = s.Skv, p.Hq = s.Hq, p.Hkv = s.Hkv, p.B = s.B;
    p.params = s.params;
    if (p.params.scale == 1.0f) p.params.scale = 1.0f / std::sqrt(float(s.Dk));
    p.q = c->q.view, p.k = c->k.view, p.v = c->v.view, p.o = c->o.view;
    if (s.mask) {
        c->mask = Tensor(s.mask_type, s.Skv, s.Sq, s.mask_per_head ? s.Hq : 1, s.mask_per_batch ? s.B : 1);
        std::uniform_real_distribution<float> val(-2.0f, 0.0f), u(0.0f, 1.0f);
        std::vector<float> m(size_t(c->mask.rows() * s.Skv));
        for (int64_t r = 0; r < c->mask.rows(); ++r) {
            const bool full = s.mask_full_rows && (r % 3 == 1);
            for (int64_t j = 0; j < s.Skv; ++j)
                m[size_t(r * s.Skv + j)] = (full || u(rng) < s.mask_neg_inf_fraction)
                                               ? -std::numeric_limits<float>::infinity()
                                               : val(rng);
        }
        c->mask.set_floats(m);
        p.mask = c->mask.view;
    }
    if (s.sinks) {
        c->sinks = Tensor(Type::F32, s.Hq);
        c->sinks.fill_uniform(rng, -1.0f, 2.0f);
        p.sinks = c->sinks.view;
    }
    if (s.lse || backward) {
        c->lse = Tensor(Type::F32, s.Sq, s.Hq, s.B);
        c->lse.poison();
        p.lse = c->lse.view;
    }
    if (backward) {
        c->dO = Tensor(s.grad_type, s.Dv, s.Hq, s.Sq, s.B);
        c->dO.fill_uniform(rng, -1.0f, 1.0f);
        c->dq = Tensor(s.grad_type, s.Dk, s.Sq, s.Hq, s.B);
        c->dk = Tensor(s.grad_type, s.Dk, s.Skv, s.Hkv, s.B);
        c->dv = Tensor(s.grad_type, s.Dv, s.Skv, s.Hkv, s.B);
        c->dq.poison(), c->dk.poison(), c->dv.poison();
        c->bp.dO = c->dO.view, c->bp.dq = c->dq.view, c->bp.dk = c->dk.view, c->bp.dv = c->dv.view;
        if (s.sinks) {
            c->dsinks = Tensor(Type::F32, s.Hq);
            c->dsinks.poison();
            c->bp.dsinks = c->dsinks.view;
        }
    }
    c->bp.fwd = p;
    return c;
}

// ||a - b|| / ||b||, with NaN anywhere in a reported as infinity. When the reference is
// all zeros the absolute norm of a is returned instead.
inline double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (!std::isfinite(a[i]) && !(std::isinf(a[i]) && a[i] == b[i]))
            return std::numeric_limits<double>::infinity();
        if (std::isinf(b[i])) {
            if (a[i] != b[i]) return std::numeric_limits<double>::infinity();
            continue; // equal infinities (LSE of masked rows)
        }
        const double d = double(a[i]) - double(b[i]);
        num += d * d;
        den += double(b[i]) * double(b[i]);
    }
    return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

} // namespace gfa::attn::testing
