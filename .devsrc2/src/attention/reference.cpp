#include "attention/reference.h"

#include <ggml-fa/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace gfa::attn {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// A view's rows converted to float, densely packed as [ne3][ne2][ne1][ne0].
std::vector<float> to_dense(const View& v) {
    const ToFloatFn convert = type_traits(v.type).to_float;
    std::vector<float> out(size_t(v.ne[0] * v.ne[1] * v.ne[2] * v.ne[3]));
    float* dst = out.data();
    for (int64_t i3 = 0; i3 < v.ne[3]; ++i3)
        for (int64_t i2 = 0; i2 < v.ne[2]; ++i2)
            for (int64_t i1 = 0; i1 < v.ne[1]; ++i1, dst += v.ne[0])
                convert(row_at(v, i1, i2, i3), dst, v.ne[0]);
    return out;
}

void write_row(const View& v, char* dst, const double* src, int64_t n) {
    std::vector<float> tmp(src, src + n);
    type_traits(v.type).from_float(tmp.data(), dst, n);
}

float mask_value(const View& mask, const char* row, int64_t j) {
    if (mask.type == Type::F16) return fp16_to_fp32(reinterpret_cast<const uint16_t*>(row)[j]);
    return reinterpret_cast<const float*>(row)[j];
}

// Everything both passes need, converted once.
struct Dense {
    const Problem& p;
    std::vector<float> q, k, v;
    explicit Dense(const Problem& pr) : p(pr), q(to_dense(pr.q)), k(to_dense(pr.k)), v(to_dense(pr.v)) {}
    const float* q_row(int64_t i, int64_t h, int64_t b) const {
        return &q[size_t(((b * p.Hq + h) * p.Sq + i) * p.Dk)];
    }
    const float* k_row(int64_t j, int64_t hk, int64_t b) const {
        return &k[size_t(((b * p.Hkv + hk) * p.Skv + j) * p.Dk)];
    }
    const float* v_row(int64_t j, int64_t hk, int64_t b) const {
        return &v[size_t(((b * p.Hkv + hk) * p.Skv + j) * p.Dv)];
    }
};

// One query row's scores s_j (natural-log units), which keys are visible, tanh(x/c) for
// the softcap gradient, and the row's log-sum-exp (with the sink, if any).
struct ScoreRow {
    std::vector<double> s, t;
    std::vector<char> vis;
    bool has_sink = false;
    double sink = 0.0;
    double lse = kNegInf;

    double prob(int64_t j) const { return vis[size_t(j)] ? std::exp(s[size_t(j)] - lse) : 0.0; }
    double sink_prob() const { return has_sink && lse != kNegInf ? std::exp(sink - lse) : 0.0; }
};

void score_row(const Dense& d, int64_t b, int64_t h, int64_t i, ScoreRow& r) {
    const Problem& p = d.p;
    const Params& pr = p.params;
    const double slope = alibi_slope(pr.max_bias, h, p.Hq);
    const char* mrow = mask_row(p.mask, i, h, b);
    const float* qi = d.q_row(i, h, b);
    const int64_t hk = kv_head(p, h);
    r.s.assign(size_t(p.Skv), 0.0);
    r.t.assign(size_t(p.Skv), 0.0);
    r.vis.assign(size_t(p.Skv), 0);
    double m = kNegInf;
    for (int64_t j = 0; j < p.Skv; ++j) {
        if (!visible(pr, i, j, p.Sq, p.Skv)) continue;
        const double mv = mrow ? double(mask_value(p.mask, mrow, j)) : 0.0;
        if (mv == kNegInf) continue;
        const float* kj = d.k_row(j, hk, b);
        double qk = 0.0;
        for (int64_t c = 0; c < p.Dk; ++c) qk += double(qi[c]) * double(kj[c]);
        double x = double(pr.scale) * qk;
        if (pr.logit_softcap > 0.0f) {
            const double cap = pr.logit_softcap;
            r.t[size_t(j)] = std::tanh(x / cap);
            x = cap * r.t[size_t(j)];
        }
        x += slope * mv;
        r.s[size_t(j)] = x;
        r.vis[size_t(j)] = 1;
        m = std::max(m, x);
    }
    r.has_sink = p.sinks.present();
    if (r.has_sink) {
        r.sink = sink_logit(p.sinks, h);
        m = std::max(m, r.sink);
    }
    if (m == kNegInf) {
        r.lse = kNegInf; // nothing visible: O = 0, LSE = -inf
        return;
    }
    double sum = r.has_sink ? std::exp(r.sink - m) : 0.0;
    for (int64_t j = 0; j < p.Skv; ++j)
        if (r.vis[size_t(j)]) sum += std::exp(r.s[size_t(j)] - m);
    r.lse = m + std::log(sum);
}

// O_i = sum_j P_ij v_j in double.
void output_row(const Dense& d, int64_t b, int64_t h, const ScoreRow& r, std::vector<double>& o) {
    const Problem& p = d.p;
    o.assign(size_t(p.Dv), 0.0);
    if (r.lse == kNegInf) return;
    const int64_t hk = kv_head(p, h);
    for (int64_t j = 0; j < p.Skv; ++j) {
        if (!r.vis[size_t(j)]) continue;
        const double pj = r.prob(j);
        const float* vj = d.v_row(j, hk, b);
        for (int64_t c = 0; c < p.Dv; ++c) o[size_t(c)] += pj * double(vj[c]);
    }
}

} // namespace

void reference_forward(const Problem& p) {
    validate(p, "flash_attn_ext (reference forward)");
    const Dense d(p);
    ScoreRow r;
    std::vector<double> o;
    for (int64_t b = 0; b < p.B; ++b)
        for (int64_t h = 0; h < p.Hq; ++h)
            for (int64_t i = 0; i < p.Sq; ++i) {
                score_row(d, b, h, i, r);
                output_row(d, b, h, r, o);
                write_row(p.o, o_row(p.o, i, h, b), o.data(), p.Dv);
                if (p.lse.present()) *lse_at(p.lse, i, h, b) = float(r.lse);
            }
}

std::vector<double> reference_forward_f64(const Problem& p, std::vector<double>* lse) {
    validate(p, "flash_attn_ext (reference forward)");
    const Dense d(p);
    std::vector<double> out(size_t(p.B * p.Sq * p.Hq * p.Dv));
    if (lse) lse->assign(size_t(p.B * p.Hq * p.Sq), kNegInf);
    ScoreRow r;
    std::vector<double> o;
    for (int64_t b = 0; b < p.B; ++b)
        for (int64_t h = 0; h < p.Hq; ++h)
            for (int64_t i = 0; i < p.Sq; ++i) {
                score_row(d, b, h, i, r);
                output_row(d, b, h, r, o);
                std::copy(o.begin(), o.end(), out.begin() + ((b * p.Sq + i) * p.Hq + h) * p.Dv);
                if (lse) (*lse)[size_t((b * p.Hq + h) * p.Sq + i)] = r.lse;
            }
    return out;
}

void reference_backward(const BackwardProblem& bp) {
    validate(bp, "flash_attn_ext (reference backward)");
    const Problem& p = bp.fwd;
    const Dense d(p);
    const std::vector<float> dO = to_dense(bp.dO); // [B][Sq][Hq][Dv]
    std::vector<double> dq(size_t(p.B * p.Hq * p.Sq * p.Dk), 0.0);
    std::vector<double> dk(size_t(p.B * p.Hkv * p.Skv * p.Dk), 0.0);
    std::vector<double> dv(size_t(p.B * p.Hkv * p.Skv * p.Dv), 0.0);
    std::vector<double> dsinks(size_t(p.Hq), 0.0);
    const double scale = p.params.scale;
    const bool softcap = p.params.logit_softcap > 0.0f;

    ScoreRow r;
    std::vector<double> o;
    for (int64_t b = 0; b < p.B; ++b)
        for (int64_t h = 0; h < p.Hq; ++h) {
            const int64_t hk = kv_head(p, h);
            for (int64_t i = 0; i < p.Sq; ++i) {
                score_row(d, b, h, i, r);
                if (r.lse == kNegInf) continue; // fully masked row: every gradient is zero
                output_row(d, b, h, r, o);
                const float* dOi = &dO[size_t(((b * p.Sq + i) * p.Hq + h) * p.Dv)];
                // D_i = dO_i . O_i = sum_j P_ij dP_ij
                double Di = 0.0;
                for (int64_t c = 0; c < p.Dv; ++c) Di += double(dOi[c]) * o[size_t(c)];
                if (r.has_sink) dsinks[size_t(h)] -= r.sink_prob() * Di;

                const float* qi = d.q_row(i, h, b);
                double* dqi = &dq[size_t(((b * p.Hq + h) * p.Sq + i) * p.Dk)];
                for (int64_t j = 0; j < p.Skv; ++j) {
                    if (!r.vis[size_t(j)]) continue;
                    const double pj = r.prob(j);
                    const float* vj = d.v_row(j, hk, b);
                    const float* kj = d.k_row(j, hk, b);
                    double* dvj = &dv[size_t(((b * p.Hkv + hk) * p.Skv + j) * p.Dv)];
                    double* dkj = &dk[size_t(((b * p.Hkv + hk) * p.Skv + j) * p.Dk)];
                    double dPij = 0.0;
                    for (int64_t c = 0; c < p.Dv; ++c) {
                        dPij += double(dOi[c]) * double(vj[c]);
                        dvj[c] += pj * double(dOi[c]);
                    }
                    // dS = P (dP - D); through s = c tanh(scale qk / c) the chain rule adds
                    // (1 - tanh^2); the mask term has no gradient.
                    const double dS = pj * (dPij - Di);
                    const double tj = r.t[size_t(j)];
                    const double dqk = dS * scale * (softcap ? 1.0 - tj * tj : 1.0);
                    for (int64_t c = 0; c < p.Dk; ++c) {
                        dqi[c] += dqk * double(kj[c]);
                        dkj[c] += dqk * double(qi[c]);
                    }
                }
            }
        }

    for (int64_t b = 0; b < p.B; ++b) {
        for (int64_t h = 0; h < p.Hq; ++h)
            for (int64_t i = 0; i < p.Sq; ++i)
                write_row(bp.dq, row_at(bp.dq, i, h, b), &dq[size_t(((b * p.Hq + h) * p.Sq + i) * p.Dk)],
                          p.Dk);
        for (int64_t hk = 0; hk < p.Hkv; ++hk)
            for (int64_t j = 0; j < p.Skv; ++j) {
                write_row(bp.dk, row_at(bp.dk, j, hk, b), &dk[size_t(((b * p.Hkv + hk) * p.Skv + j) * p.Dk)],
                          p.Dk);
                write_row(bp.dv, row_at(bp.dv, j, hk, b), &dv[size_t(((b * p.Hkv + hk) * p.Skv + j) * p.Dv)],
                          p.Dv);
            }
    }
    if (bp.dsinks.present())
        for (int64_t h = 0; h < p.Hq; ++h)
            *reinterpret_cast<float*>(static_cast<char*>(bp.dsinks.data) + h * bp.dsinks.nb[0]) =
                float(dsinks[size_t(h)]);
}

} // namespace gfa::attn
