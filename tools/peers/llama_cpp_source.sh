# Sourced by the peer scripts: puts the llama.cpp copy bundled in the llama-cpp-python
# source distribution under a work folder and sets llama_cpp_src to it.
#   fetch_llama_cpp_source WORK_DIR VERSION
fetch_llama_cpp_source() {
    local work=$1 version=$2
    local sdist="$work/llama_cpp_python-$version.tar.gz"
    if [ ! -f "$sdist" ]; then
        pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" >&2
    fi
    llama_cpp_src="$work/llama_cpp_python-$version/vendor/llama.cpp"
    if [ ! -d "$llama_cpp_src/ggml" ]; then
        tar -xzf "$sdist" -C "$work"
    fi
    # The sdist leaves out ggml's pkg-config template, which its CMakeLists configures
    # unconditionally; an empty one is enough (nothing is installed).
    [ -f "$llama_cpp_src/ggml/ggml.pc.in" ] || : >"$llama_cpp_src/ggml/ggml.pc.in"
}
