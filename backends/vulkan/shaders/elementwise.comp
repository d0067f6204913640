#version 450
// Element-wise ops, one invocation per destination element (grid-stride): unary math and
// activations of src0, binary ops with src1 broadcast over src0 by modulo (ggml's rule),
// copies between types (cpy / cont / cast), where source and destination may have different
// shapes with the same element count (element k of one is element k of the other in
// row-major order), and the ops that place or gather elements by index: fill, repeat and
// its backward (a sum over the repeats), concat, diag_mask.
#extension GL_GOOGLE_include_directive : require
layout(local_size_x = 256) in;

#include "op_common.glsl"

// P.op (ElementwiseOp in vk_ops.cpp)
const uint OP_COPY = 0u, OP_SCALE = 1u, OP_SQR = 2u, OP_SQRT = 3u, OP_EXP = 4u, OP_LOG = 5u,
           OP_NEG = 6u, OP_SILU = 7u, OP_GELU_TANH = 8u, OP_GELU_ERF = 9u, OP_RELU = 10u,
           OP_STEP = 11u, OP_TANH = 12u, OP_ADD = 13u, OP_SUB = 14u, OP_MUL = 15u, OP_DIV = 16u,
           OP_SWIGLU = 17u, OP_SILU_BACK = 18u, OP_GELU_TANH_BACK = 19u, OP_GELU_ERF_BACK = 20u,
           OP_FILL = 21u, OP_REPEAT = 22u, OP_REPEAT_BACK = 23u, OP_CONCAT = 24u, OP_DIAG_MASK = 25u;

// ggml's tanh-approximation constants: sqrt(2 / pi) and 0.044715.
const float GELU_C = 0.7978845608028654, GELU_CUBIC = 0.044715;
const float INV_SQRT2 = 0.7071067811865476, INV_SQRT_2PI = 0.3989422804014327;

float sigmoid(float x) {
    return 1.0 / (1.0 + exp(-x));
}

float unary(uint op, float x) {
    switch (op) {
    case OP_SCALE: return x * P.farg.x + P.farg.y;
    case OP_SQR: return x * x;
    case OP_SQRT: return sqrt(x);
    case OP_EXP: return exp(x);
    case OP_LOG: return log(x);
    case OP_NEG: return -x;
    case OP_SILU: return x * sigmoid(x);
    case OP_GELU_TANH: return 0.5 * x * (1.0 + stable_tanh(GELU_C * (x + GELU_CUBIC * x * x * x)));
    case OP_GELU_ERF: return 0.5 * x * (1.0 + erf_approx(x * INV_SQRT2));
    case OP_RELU: return x > 0.0 ? x : 0.0;
    case OP_TANH: return stable_tanh(x);
    default: return x > 0.0 ? 1.0 : 0.0; // OP_STEP
    }
}

// a op b, where for the backward ops a is the incoming gradient and b the forward's input.
float binary(uint op, float a, float b) {
    switch (op) {
    case OP_ADD: return a + b;
    case OP_SUB: return a - b;
    case OP_MUL: return a * b;
    case OP_DIV: return a / b;
    case OP_SWIGLU: return a * sigmoid(a) * b; // silu(gate) * up
    case OP_SILU_BACK: {
        const float s = sigmoid(b);
        return a * s * (1.0 + b * (1.0 - s));
    }
    case OP_GELU_TANH_BACK: {
        const float th = stable_tanh(GELU_C * (b + GELU_CUBIC * b * b * b));
        return a * (0.5 * (1.0 + th) + 0.5 * b * (1.0 - th * th) * GELU_C * (1.0 + 3.0 * GELU_CUBIC * b * b));
    }
    default: { // OP_GELU_ERF_BACK: Phi(x) + x phi(x)
        const float pdf = exp(-0.5 * b * b) * INV_SQRT_2PI;
        return a * (0.5 * (1.0 + erf_approx(b * INV_SQRT2)) + b * pdf);
    }
    }
}

// The ops that place elements: d is the destination element's coordinates.
float placed(uint op, uvec4 d) {
    switch (op) {
    case OP_FILL: return P.farg.x;
    case OP_REPEAT: return src0_at(d.x % P.src0.ne.x, d.y % P.src0.ne.y, d.z % P.src0.ne.z, d.w % P.src0.ne.w);
    case OP_REPEAT_BACK: { // the sum of every repeat of this element in src0
        const uvec4 reps = P.src0.ne / P.dst.ne;
        float acc = 0.0;
        for (uint r3 = 0u; r3 < reps.w; ++r3)
            for (uint r2 = 0u; r2 < reps.z; ++r2)
                for (uint r1 = 0u; r1 < reps.y; ++r1)
                    for (uint r0 = 0u; r0 < reps.x; ++r0)
                        acc += src0_at(d.x + r0 * P.dst.ne.x, d.y + r1 * P.dst.ne.y, d.z + r2 * P.dst.ne.z,
                                       d.w + r3 * P.dst.ne.w);
        return acc;
    }
    case OP_CONCAT: { // iarg.x: the dim along which src1 follows src0
        const uint dim = P.iarg.x;
        uvec4 at = d;
        if (at[dim] < P.src0.ne[dim]) return src0_at(at.x, at.y, at.z, at.w);
        at[dim] -= P.src0.ne[dim];
        return src1_at(at.x, at.y, at.z, at.w);
    }
    default: // OP_DIAG_MASK: iarg.x = n_past, farg.x = the value past the diagonal
        return int(d.x) > int(d.y) + int(P.iarg.x) ? P.farg.x : src0_at(d.x, d.y, d.z, d.w);
    }
}

void main() {
    const uint op = P.op;
    for (uint k = invocation(); k < P.n; k += n_invocations()) {
        const uvec4 d = unflatten(k, P.dst.ne);
        const uint out_at = byte_of(P.dst, d.x, d.y, d.z, d.w);
        if (op == OP_COPY) {
            const uvec4 s = unflatten(k, P.src0.ne);
            const uint src_type = P.src0.type;
            if (src_type == P.dst.type && (src_type == T_F32 || src_type == T_I32)) {
                dst_words[out_at >> 2] = src0_words[byte_of(P.src0, s.x, s.y, s.z, s.w) >> 2]; // bit for bit
            } else {
                store_dst(out_at, src0_at(s.x, s.y, s.z, s.w));
            }
        } else if (op >= OP_FILL) {
            store_dst(out_at, placed(op, d));
        } else if (op < OP_ADD) {
            store_dst(out_at, unary(op, src0_at(d.x, d.y, d.z, d.w)));
        } else {
            const uvec4 ne1 = P.src1.ne;
            const float b = src1_at(d.x % ne1.x, d.y % ne1.y, d.z % ne1.z, d.w % ne1.w);
            store_dst(out_at, binary(op, src0_at(d.x, d.y, d.z, d.w), b));
        }
    }
}
