#!/usr/bin/env python3
"""Interop between ggml-fa's GGUF code and the reference `gguf` Python package.

usage: gguf_interop.py GGUF_INFO QUANTIZE WORKDIR

1. The Python package writes files with every metadata value type (nested arrays included)
   and tensors of several types; `gguf-info --json` must report identical metadata and
   tensor tables, and `gguf-info --dump` must decode every tensor to exactly the floats
   the package's own dequantizers produce (bit for bit, NaN where they give NaN).
2. `quantize` rewrites such a file's matrices to each supported type; the package must read
   the result with byte-identical metadata, unchanged 1-d tensors, and quantized tensors
   whose dequantization equals ours bit for bit and is close to the original values.
3. The mixes q4_K_M and q5_K_M give each matrix of a layered model the block type
   llama.cpp's rule for those file types gives it (written out here on its own), and set
   general.file_type to llama.cpp's number for them.

Exits 0 when everything matches, 1 on the first mismatch. The gguf and numpy packages are
required (pip install gguf numpy).
"""
import json
import os
import subprocess
import sys

import numpy as np

try:
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFValueType as V
except ImportError:
    sys.exit("gguf_interop: the Python package 'gguf' is required: pip install gguf numpy")

TYPE_NAMES = {
    V.UINT8: "u8", V.INT8: "i8", V.UINT16: "u16", V.INT16: "i16", V.UINT32: "u32", V.INT32: "i32",
    V.FLOAT32: "f32", V.BOOL: "bool", V.STRING: "string", V.ARRAY: "array", V.UINT64: "u64",
    V.INT64: "i64", V.FLOAT64: "f64",
}

# (key, value type, value, array element type). Float values are exactly representable in
# their type so that equality is exact.
METADATA = [
    ("test.u8", V.UINT8, 250, None),
    ("test.i8", V.INT8, -120, None),
    ("test.u16", V.UINT16, 65000, None),
    ("test.i16", V.INT16, -32000, None),
    ("test.u32", V.UINT32, 4000000000, None),
    ("test.i32", V.INT32, -2000000000, None),
    ("test.f32", V.FLOAT32, 0.15625, None),
    ("test.bool.true", V.BOOL, True, None),
    ("test.bool.false", V.BOOL, False, None),
    ("test.string", V.STRING, 'h\u00e9llo "w\\orld"\n\t\u65e5\u672c', None),
    ("test.string.empty", V.STRING, "", None),
    ("test.u64", V.UINT64, 18000000000000000000, None),
    ("test.i64", V.INT64, -9000000000000000000, None),
    ("test.f64", V.FLOAT64, 2.718281828459045, None),
    ("test.array.u8", V.ARRAY, [0, 1, 255], V.UINT8),
    ("test.array.i8", V.ARRAY, [-128, 127], V.INT8),
    ("test.array.u16", V.ARRAY, [7, 65535], V.UINT16),
    ("test.array.i16", V.ARRAY, [-5, 5], V.INT16),
    ("test.array.u32", V.ARRAY, [1, 2, 4294967295], V.UINT32),
    ("test.array.i32", V.ARRAY, [-1, 0, 1], V.INT32),
    ("test.array.f32", V.ARRAY, [0.5, -1.25, 1e-3], V.FLOAT32),
    ("test.array.bool", V.ARRAY, [True, False, True], V.BOOL),
    ("test.array.string", V.ARRAY, ["<s>", "", "\u2581the", "a b"], V.STRING),
    ("test.array.u64", V.ARRAY, [2**64 - 1, 0], V.UINT64),
    ("test.array.i64", V.ARRAY, [-(2**63), 2**63 - 1], V.INT64),
    ("test.array.f64", V.ARRAY, [1e300, -0.1], V.FLOAT64),
    # Inner arrays are typed by the package from their first item: ints become i32.
    ("test.array.nested", V.ARRAY, [[1, 2, 3], [4], [5, 6]], V.ARRAY),
]


class Mismatch(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Mismatch(what)


def run(*args):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise Mismatch(f"{' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def expected_json_value(vtype, value, sub_type):
    """The value as gguf-info --json prints it."""
    if vtype != V.ARRAY:
        if vtype == V.FLOAT32:
            return float(np.float32(value))
        return value
    if sub_type == V.ARRAY:
        return {"type": "array", "items": [expected_json_value(V.ARRAY, inner, V.INT32) for inner in value]}
    return {"type": TYPE_NAMES[sub_type], "items": [expected_json_value(sub_type, x, None) for x in value]}


def normalize_f32(tname, value):
    """gguf-info prints f32 values with 9 digits; read them back as the float32 they denote."""
    if tname == "f32":
        return float(np.float32(value))
    if tname == "array":
        return {"type": value["type"], "items": [normalize_f32(value["type"], x) for x in value["items"]]}
    return value


def random_blocks(rng, qtype, n_blocks):
    """Arbitrary bytes for a block format; f16 fields are kept finite unless allow_nan."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 256, size=(n_blocks * type_size,), dtype=np.uint8)


def make_python_file(path, rng, alignment):
    w = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, vtype, value, sub_type in METADATA:
        w.add_key_value(key, value, vtype, sub_type=sub_type)

    tensors = {}  # name -> (type, numpy shape, raw bytes)

    def add(name, qtype, shape, raw):
        tensors[name] = (qtype, shape, raw)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, raw)
        else:
            w.add_tensor(name, raw, raw_dtype=qtype)

    x = rng.standard_normal((4, 256)).astype(np.float32)
    add("f32.odd", Q.F32, (5, 3), rng.standard_normal((5, 3)).astype(np.float32))
    add("f16.vector", Q.F16, (17,), rng.standard_normal(17).astype(np.float16))
    add("blk.0.attn_norm.weight", Q.F32, (256,), rng.standard_normal(256).astype(np.float32))
    add("blk.0.attn_q.weight", Q.F32, (4, 256), x)
    add("blk.0.ffn_up.weight", Q.F16, (2, 512), rng.standard_normal((2, 512)).astype(np.float16))
    # A mixture's experts (3-d, quantized like matrices) and its router (kept as it is).
    add("blk.0.ffn_up_exps.weight", Q.F32, (3, 2, 256), rng.standard_normal((3, 2, 256)).astype(np.float32))
    add("blk.0.ffn_gate_inp.weight", Q.F32, (3, 256), rng.standard_normal((3, 256)).astype(np.float32))
    add("i32.ids", Q.I32, (7,), np.arange(7, dtype=np.int32).view(np.uint8))
    for qtype in (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        # Encoded by the package's own quantizers.
        raw = gguf.quants.quantize(rng.standard_normal((3, 64)).astype(np.float32), qtype)
        add(f"py.{qtype.name}", qtype, (3, 64), raw)
    for qtype in (Q.Q4_0, Q.Q8_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL,
                  Q.IQ4_XS):
        # Arbitrary bytes: every bit of the layout matters, including inf/NaN scales.
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_blocks = 24 if block == 32 else 6
        raw = random_blocks(rng, qtype, n_blocks).reshape(2, n_blocks // 2 * type_size)
        add(f"random.{qtype.name}", qtype, (2, n_blocks // 2 * block), raw)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def dump(gguf_info, path, name):
    return np.array([np.float32(float(v)) for v in run(gguf_info, "--dump", name, path).split()], dtype=np.float32)


def same_floats(a, b):
    return a.shape == b.shape and bool(np.all((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))))


def check_python_file_loads_here(gguf_info, path, tensors, alignment):
    info = json.loads(run(gguf_info, "--json", path))
    check(info["version"] == 3, f"version {info['version']}")
    check(info["alignment"] == (alignment or 32), f"alignment {info['alignment']}")

    expected = [["general.architecture", "string", "llama"]]
    if alignment is not None:
        expected.append(["general.alignment", "u32", alignment])
    expected += [[k, TYPE_NAMES[t], expected_json_value(t, v, s)] for k, t, v, s in METADATA]
    got = [[k, t, normalize_f32(t, v)] for k, t, v in info["metadata"]]
    check(len(got) == len(expected), f"{len(got)} metadata entries, expected {len(expected)}")
    for g, e in zip(got, expected):
        check(g == e, f"metadata {e[0]}: got {g}, expected {e}")

    reader = gguf.GGUFReader(path)
    check(len(info["tensors"]) == len(reader.tensors), "tensor count")
    for ours, theirs in zip(info["tensors"], reader.tensors):
        name = theirs.name
        check(ours["name"] == name, f"tensor name {ours['name']} vs {name}")
        check(ours["type_id"] == int(theirs.tensor_type), f"{name}: type {ours['type_id']} vs {int(theirs.tensor_type)}")
        check(ours["dims"] == [int(d) for d in theirs.shape], f"{name}: dims {ours['dims']} vs {list(theirs.shape)}")
        check(ours["nbytes"] == int(theirs.n_bytes), f"{name}: {ours['nbytes']} bytes vs {theirs.n_bytes}")
        check(info["data_offset"] + ours["offset"] == int(theirs.data_offset), f"{name}: data offset")
        qtype, _, raw = tensors[name]
        check(bytes(theirs.data.view(np.uint8).ravel()) == bytes(raw.view(np.uint8).ravel()), f"{name}: bytes")
        if qtype == Q.I32:
            continue
        want = gguf.quants.dequantize(raw, qtype).astype(np.float32).ravel()
        check(same_floats(dump(gguf_info, path, name), want), f"{name}: decoded values differ from gguf.quants")
    return len(reader.tensors)


def field_bytes(field):
    return b"".join(bytes(p.view(np.uint8).ravel()) for p in field.parts)


def check_our_file_loads_there(gguf_info, quantize, src, workdir, rng):
    source = gguf.GGUFReader(src)
    src_tensors = {t.name: t for t in source.tensors}
    n = 0
    targets = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "iq4_nl", "iq4_xs",
               "f16", "bf16"]
    # Relative rms error bounds per target, on Gaussian weights.
    bounds = {"q8_0": 0.01, "q4_0": 0.15, "q4_1": 0.13, "q5_0": 0.07, "q5_1": 0.065,
              "q2_K": 0.35, "q3_K": 0.2, "q4_K": 0.13, "q5_K": 0.065, "q6_K": 0.035, "iq4_nl": 0.11, "iq4_xs": 0.11,
              "f16": 1e-3, "bf16": 8e-3}
    # Rows that are not whole blocks of a K format's 256 values take the block type llama.cpp's
    # quantizer falls back to, where their length fits it.
    fallback = {"q2_K": "iq4_nl", "q3_K": "iq4_nl", "iq4_xs": "iq4_nl", "q4_K": "q5_0", "q5_K": "q5_1",
                "q6_K": "q8_0"}
    for target in targets:
        out = os.path.join(workdir, f"ours-{target}.gguf")
        run(quantize, src, out, target, "--keep", "blk.0.ffn_up.weight")
        r = gguf.GGUFReader(out)
        # Metadata: same keys in the same order, byte-identical encodings, plus file_type.
        src_fields = [f for f in source.fields.values() if not f.name.startswith("GGUF.")]
        out_fields = [f for f in r.fields.values() if not f.name.startswith("GGUF.")]
        check([f.name for f in out_fields] == [f.name for f in src_fields] + ["general.file_type"],
              f"{target}: metadata keys {[f.name for f in out_fields]}")
        for a, b in zip(src_fields, out_fields):
            check(field_bytes(a) == field_bytes(b), f"{target}: metadata {a.name} differs")
        check(r.fields["GGUF.version"].parts[0][0] == 3, "version")
        check(len(r.tensors) == len(source.tensors), f"{target}: tensor count")
        for t in r.tensors:
            s = src_tensors[t.name]
            check(list(t.shape) == list(s.shape), f"{target}: {t.name} shape")
            want = target
            if int(s.shape[0]) % gguf.GGML_QUANT_SIZES[Q[target.upper()]][0] != 0 and target in fallback:
                want = fallback[target]
            converted = len(s.shape) in (2, 3) and t.name not in ("blk.0.ffn_up.weight", "blk.0.ffn_gate_inp.weight")
            converted = converted and s.tensor_type != Q.I32
            converted = converted and int(s.shape[0]) % gguf.GGML_QUANT_SIZES[Q[want.upper()]][0] == 0
            converted = converted and want.lower() != s.tensor_type.name.lower()
            check(converted == (t.tensor_type != s.tensor_type),
                  f"{target}: {t.name} is {t.tensor_type.name}, {'should be' if converted else 'should stay'} "
                  f"{want if converted else s.tensor_type.name}")
            if t.tensor_type == s.tensor_type:
                check(bytes(t.data.view(np.uint8).ravel()) == bytes(s.data.view(np.uint8).ravel()),
                      f"{target}: {t.name} bytes changed")
                continue
            check(t.tensor_type.name.lower() == want.lower(), f"{target}: {t.name} became {t.tensor_type.name}")
            theirs = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).ravel()
            ours = dump(gguf_info, out, t.name)
            check(same_floats(ours, theirs), f"{target}: {t.name} decodes differently in gguf.quants")
            if t.name in ("blk.0.attn_q.weight", "blk.0.ffn_up_exps.weight") and want == target:
                orig = gguf.quants.dequantize(s.data, s.tensor_type).astype(np.float32).ravel()
                err = float(np.linalg.norm(theirs - orig) / np.linalg.norm(orig))
                print(f"{target}: {t.name} relative error {err:.4f}")
                check(err < bounds[target], f"{target}: relative error {err:.4f} over {bounds[target]}")
            n += 1
    # Rows are encoded on several threads: any thread count writes the same bytes.
    one, three = os.path.join(workdir, "ours-t1.gguf"), os.path.join(workdir, "ours-t3.gguf")
    run(quantize, src, one, "q4_K", "-t", "1")
    run(quantize, src, three, "q4_K", "-t", "3")
    with open(one, "rb") as a, open(three, "rb") as b:
        check(a.read() == b.read(), "quantize -t 1 and -t 3 wrote different files")
    return n


# llama.cpp's file type numbers and base formats of the two mixes.
MIXES = {"q4_K_M": (15, Q.Q4_K, Q.Q5_K), "q5_K_M": (17, Q.Q5_K, Q.Q6_K)}


def mix_type(mix, name, n_layers, tied):
    """The block type the _M rule gives a matrix: q6_K for the output projection (or the tied
    embeddings), and for attn_v and ffn_down in layers i < n/8, i >= 7n/8, (i - n/8) % 3 == 2;
    attn_qkv one step up from the base; the base type otherwise."""
    _, base, qkv = MIXES[mix]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return Q.Q6_K
    if name.endswith("attn_qkv.weight"):
        return qkv
    if name.startswith("blk."):
        i = int(name.split(".")[1])
        more = i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2
        if more and (name.endswith("attn_v.weight") or "ffn_down" in name):
            return Q.Q6_K
    return base


def check_mixes(quantize, workdir, rng):
    n_layers, width = 16, 256
    n = 0
    for tied in (False, True):
        src = os.path.join(workdir, f"layers-{'tied' if tied else 'untied'}.gguf")
        w = gguf.GGUFWriter(src, "llama")
        names = ["token_embd.weight"] + ([] if tied else ["output.weight"])
        for i in range(n_layers):
            names += [f"blk.{i}.attn_q.weight", f"blk.{i}.attn_v.weight", f"blk.{i}.ffn_down.weight",
                      f"blk.{i}.ffn_up.weight"]
        names.append("blk.3.attn_qkv.weight")
        for name in names:
            w.add_tensor(name, rng.standard_normal((2, width)).astype(np.float32))
        w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(width).astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        for mix, (file_type, _, _) in MIXES.items():
            out = os.path.join(workdir, f"ours-{mix}-{'tied' if tied else 'untied'}.gguf")
            run(quantize, src, out, mix)
            r = gguf.GGUFReader(out)
            got_type = int(r.fields["general.file_type"].parts[-1][0])
            check(got_type == file_type, f"{mix}: general.file_type {got_type}, want {file_type}")
            types = {t.name: t.tensor_type for t in r.tensors}
            check(types["blk.0.attn_norm.weight"] == Q.F32, f"{mix}: the norm was converted")
            for name in names:
                want = mix_type(mix, name, n_layers, tied)
                check(types[name] == want, f"{mix} (tied {tied}): {name} is {types[name].name}, want {want.name}")
                n += 1
    return n


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    gguf_info, quantize, workdir = sys.argv[1:]
    os.makedirs(workdir, exist_ok=True)
    np.seterr(all="ignore")  # arbitrary blocks decode to NaN/inf on purpose
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    try:
        n_read = 0
        for alignment in (None, 64):
            path = os.path.join(workdir, f"python-{alignment or 'default'}.gguf")
            tensors = make_python_file(path, rng, alignment)
            n_read += check_python_file_loads_here(gguf_info, path, tensors, alignment)
        n_written = check_our_file_loads_there(gguf_info, quantize, path, workdir, rng)
        n_mixed = check_mixes(quantize, workdir, rng)
    except Mismatch as e:
        print(f"gguf_interop: MISMATCH (seed {seed}): {e}")
        return 1
    from importlib.metadata import version
    print(f"gguf_interop: gguf {version('gguf')}: {n_read} tensors read, "
          f"{n_written} quantized tensors written, all identical; {n_mixed} matrices of the mixes "
          f"typed by the rule (seed {seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
