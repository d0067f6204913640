// Validation of flash_attn_ext problems: one place that states which sizes, types and
// strides the kernels accept, so every backend rejects bad input with the same message.
#include "attention/problem.h"

#include <ggml-fa/error.h>

#include <cmath>
#include <initializer_list>
#include <sstream>
#include <string>

namespace gfa::attn {

namespace {

std::string shape_str(const View& v) {
    std::ostringstream s;
    s << type_name(v.type) << "[" << v.ne[0] << ", " << v.ne[1] << ", " << v.ne[2] << ", " << v.ne[3] << "]";
    return s.str();
}

struct Checker {
    const char* who;
    [[noreturn]] void error(const std::string& what) const { fail(std::string(who) + ": " + what); }

    void type_in(const char* name, const View& v, std::initializer_list<Type> allowed) const {
        for (Type t : allowed)
            if (v.type == t) return;
        std::string list;
        for (Type t : allowed) {
            if (!list.empty()) list += '/';
            list += type_name(t);
        }
        error(std::string(name) + " has type " + std::string(type_name(v.type)) + ", expected " + list);
    }

    void shape_is(const char* name, const View& v, int64_t n0, int64_t n1, int64_t n2, int64_t n3) const {
        if (v.ne[0] != n0 || v.ne[1] != n1 || v.ne[2] != n2 || v.ne[3] != n3) {
            std::ostringstream s;
            s << name << " is " << shape_str(v) << ", expected [" << n0 << ", " << n1 << ", " << n2 << ", "
              << n3 << "]";
            error(s.str());
        }
    }

    // Rows must start with contiguous elements (a block for quantized types), and
    // quantized rows must hold whole blocks.
    void rows_ok(const char* name, const View& v) const {
        if (!v.data) error(std::string(name) + " has no data");
        const TypeTraits& tt = type_traits(v.type);
        if (v.ne[0] % tt.block_size != 0) {
            std::ostringstream s;
            s << name << " is " << shape_str(v) << ": row length must be a multiple of " << tt.block_size
              << " for " << tt.name;
            error(s.str());
        }
        if (!tt.is_quantized && v.nb[0] != int64_t(tt.type_size))
            error(std::string(name) + " rows are not contiguous (nb[0] != element size)");
    }
};

} // namespace

void validate(const Problem& p, const char* who) {
    const Checker c{who};
    if (p.Dk <= 0 || p.Dv <= 0 || p.Sq <= 0 || p.Skv <= 0 || p.Hq <= 0 || p.Hkv <= 0 || p.B <= 0) {
        std::ostringstream s;
        s << "sizes must be positive (Dk=" << p.Dk << " Dv=" << p.Dv << " Sq=" << p.Sq << " Skv=" << p.Skv
          << " Hq=" << p.Hq << " Hkv=" << p.Hkv << " B=" << p.B << ")";
        c.error(s.str());
    }
    if (p.Hq % p.Hkv != 0) {
        c.error("query heads (" + std::to_string(p.Hq) + ") must be a multiple of kv heads (" +
                std::to_string(p.Hkv) + ")");
    }
    const Params& pr = p.params;
    if (!std::isfinite(pr.scale)) c.error("scale is not finite");
    if (!(pr.max_bias >= 0.0f) || !std::isfinite(pr.max_bias)) c.error("max_bias must be finite and >= 0");
    if (!(pr.logit_softcap >= 0.0f) || !std::isfinite(pr.logit_softcap))
        c.error("logit_softcap must be finite and >= 0");
    if (pr.window_left < -1 || pr.window_right < -1) c.error("window sizes must be >= 0 or -1 (unlimited)");

    c.type_in("q", p.q, {Type::F32, Type::F16, Type::BF16});
    c.type_in("k", p.k, {Type::F32, Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0});
    c.type_in("v", p.v, {Type::F32, Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0});
    c.type_in("o", p.o, {Type::F32, Type::F16, Type::BF16});
    c.shape_is("q", p.q, p.Dk, p.Sq, p.Hq, p.B);
    c.shape_is("k", p.k, p.Dk, p.Skv, p.Hkv, p.B);
    c.shape_is("v", p.v, p.Dv, p.Skv, p.Hkv, p.B);
    c.shape_is("o", p.o, p.Dv, p.Hq, p.Sq, p.B);
    c.rows_ok("q", p.q);
    c.rows_ok("k", p.k);
    c.rows_ok("v", p.v);
    c.rows_ok("o", p.o);

    if (p.mask.present()) {
        c.type_in("mask", p.mask, {Type::F32, Type::F16});
        const View& m = p.mask;
        // ggml pads the mask's query dimension; extra rows are never read.
        const bool ok = m.ne[0] == p.Skv && m.ne[1] >= p.Sq && (m.ne[2] == 1 || m.ne[2] == p.Hq) &&
                        (m.ne[3] == 1 || m.ne[3] == p.B);
        if (!ok) {
            std::ostringstream s;
            s << "mask is " << shape_str(m) << ", expected [" << p.Skv << ", >=" << p.Sq << ", 1|" << p.Hq
              << ", 1|" << p.B << "]";
            c.error(s.str());
        }
        c.rows_ok("mask", m);
    }
    if (p.sinks.present()) {
        c.type_in("sinks", p.sinks, {Type::F32});
        c.shape_is("sinks", p.sinks, p.Hq, 1, 1, 1);
        c.rows_ok("sinks", p.sinks);
    }
    if (p.lse.present()) {
        c.type_in("lse", p.lse, {Type::F32});
        c.shape_is("lse", p.lse, p.Sq, p.Hq, p.B, 1);
    }
}

void validate(const BackwardProblem& bp, const char* who) {
    validate(bp.fwd, who);
    const Checker c{who};
    const Problem& p = bp.fwd;
    if (!p.lse.present()) c.error("the backward needs the forward's lse");
    if (!bp.dO.present() || !bp.dq.present() || !bp.dk.present() || !bp.dv.present())
        c.error("the backward needs dO and the outputs dq, dk, dv");
    c.type_in("dO", bp.dO, {Type::F32, Type::F16, Type::BF16});
    c.type_in("dq", bp.dq, {Type::F32, Type::F16, Type::BF16});
    c.type_in("dk", bp.dk, {Type::F32, Type::F16, Type::BF16});
    c.type_in("dv", bp.dv, {Type::F32, Type::F16, Type::BF16});
    c.shape_is("dO", bp.dO, p.Dv, p.Hq, p.Sq, p.B);
    c.shape_is("dq", bp.dq, p.Dk, p.Sq, p.Hq, p.B);
    c.shape_is("dk", bp.dk, p.Dk, p.Skv, p.Hkv, p.B);
    c.shape_is("dv", bp.dv, p.Dv, p.Skv, p.Hkv, p.B);
    c.rows_ok("dO", bp.dO);
    c.rows_ok("dq", bp.dq);
    c.rows_ok("dk", bp.dk);
    c.rows_ok("dv", bp.dv);
    if (bp.dsinks.present()) {
        if (!p.sinks.present()) c.error("dsinks requested but the problem has no sinks");
        c.type_in("dsinks", bp.dsinks, {Type::F32});
        c.shape_is("dsinks", bp.dsinks, p.Hq, 1, 1, 1);
        c.rows_ok("dsinks", bp.dsinks);
    }
}

} // namespace gfa::attn
