#include "safetensors.h"

#include <ggml-fa/error.h>
#include <ggml-fa/types.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace convert {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

size_t dtype_size(Dtype d) {
    return d == Dtype::F32 ? 4 : 2;
}

Dtype parse_dtype(const std::string& s, const std::string& where) {
    if (s == "F32") return Dtype::F32;
    if (s == "F16") return Dtype::F16;
    if (s == "BF16") return Dtype::BF16;
    gfa::fail(where + ": dtype " + s + " is not supported (F32, F16 and BF16 are)");
}

} // namespace

int64_t StoredTensor::n_elements() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

std::vector<float> StoredTensor::to_f32() const {
    const size_t n = size_t(n_elements());
    std::vector<float> out(n);
    switch (dtype) {
    case Dtype::F32:
        std::memcpy(out.data(), data, n * 4);
        break;
    case Dtype::F16:
        for (size_t i = 0; i < n; ++i) {
            uint16_t h;
            std::memcpy(&h, data + 2 * i, 2);
            out[i] = gfa::fp16_to_fp32(h);
        }
        break;
    case Dtype::BF16:
        for (size_t i = 0; i < n; ++i) {
            uint16_t h;
            std::memcpy(&h, data + 2 * i, 2);
            out[i] = gfa::bf16_to_fp32(h);
        }
        break;
    }
    return out;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) gfa::fail(path + ": cannot open (" + std::strerror(errno) + ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        ::close(fd);
        gfa::fail(path + ": cannot stat");
    }
    size_ = size_t(st.st_size);
    if (size_ < 8) {
        ::close(fd);
        gfa::fail(path + ": " + std::to_string(size_) + " bytes is too short for a safetensors file");
    }
    map_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (map_ == MAP_FAILED) {
        map_ = nullptr;
        gfa::fail(path + ": cannot map the file");
    }
    const auto* bytes = static_cast<const uint8_t*>(map_);
    uint64_t header_len = 0;
    for (int i = 0; i < 8; ++i) header_len |= uint64_t(bytes[i]) << (8 * i);
    if (header_len > size_ - 8)
        gfa::fail(path + ": header length " + std::to_string(header_len) +
                  " runs past the end of the file (" + std::to_string(size_) + " bytes)");
    json header;
    try {
        header = json::parse(bytes + 8, bytes + 8 + header_len);
    } catch (const json::exception& e) {
        gfa::fail(path + ": the JSON header does not parse: " + e.what());
    }
    if (!header.is_object()) gfa::fail(path + ": the JSON header is not an object");
    const uint8_t* data = bytes + 8 + header_len;
    const size_t data_size = size_ - 8 - header_len;
    for (auto& [name, entry] : header.items()) {
        if (name == "__metadata__") continue;
        const std::string where = path + ": tensor " + name;
        try {
            StoredTensor t;
            t.name = name;
            t.file = path;
            t.dtype = parse_dtype(entry.at("dtype").get<std::string>(), where);
            t.shape = entry.at("shape").get<std::vector<int64_t>>();
            const auto offsets = entry.at("data_offsets").get<std::vector<uint64_t>>();
            if (offsets.size() != 2 || offsets[0] > offsets[1] || offsets[1] > data_size)
                gfa::fail(where + ": data_offsets lie outside the data section (" +
                          std::to_string(data_size) + " bytes)");
            for (int64_t d : t.shape)
                if (d < 0) gfa::fail(where + ": negative dimension");
            t.data = data + offsets[0];
            t.nbytes = size_t(offsets[1] - offsets[0]);
            if (t.nbytes != size_t(t.n_elements()) * dtype_size(t.dtype))
                gfa::fail(where + ": " + std::to_string(t.nbytes) +
                          " bytes do not match its shape and dtype");
            tensors_.emplace(name, std::move(t));
        } catch (const json::exception& e) {
            gfa::fail(where + ": malformed header entry: " + e.what());
        }
    }
}

SafetensorsFile::~SafetensorsFile() {
    if (map_) ::munmap(map_, size_);
}

Checkpoint::Checkpoint(const std::string& dir) {
    std::vector<fs::path> paths;
    const fs::path single = fs::path(dir) / "model.safetensors";
    const fs::path index = fs::path(dir) / "model.safetensors.index.json";
    if (fs::exists(single)) {
        paths.push_back(single);
    } else if (fs::exists(index)) {
        std::ifstream in(index);
        json j;
        try {
            j = json::parse(in);
        } catch (const json::exception& e) {
            gfa::fail(index.string() + ": does not parse: " + e.what());
        }
        if (!j.contains("weight_map") || !j["weight_map"].is_object())
            gfa::fail(index.string() + ": has no weight_map object");
        std::set<std::string> shards;
        for (auto& [name, file] : j["weight_map"].items()) shards.insert(file.get<std::string>());
        for (const std::string& s : shards) paths.push_back(fs::path(dir) / s);
    } else {
        if (!fs::is_directory(dir)) gfa::fail(dir + ": not a directory");
        for (const auto& e : fs::directory_iterator(dir))
            if (e.path().extension() == ".safetensors") paths.push_back(e.path());
        std::sort(paths.begin(), paths.end());
    }
    if (paths.empty()) gfa::fail(dir + ": no .safetensors files");
    for (const fs::path& p : paths) {
        files_.push_back(std::make_unique<SafetensorsFile>(p.string()));
        for (const auto& [name, t] : files_.back()->tensors()) {
            if (!tensors_.emplace(name, &t).second)
                gfa::fail(p.string() + ": tensor " + name + " also appears in " + tensors_[name]->file);
        }
    }
}

} // namespace convert
