// A reader for safetensors files: an 8-byte little-endian header length, a JSON header
// mapping tensor names to {dtype, shape, data_offsets}, then the raw data. The file is
// memory-mapped read-only; every offset is checked against the file before use.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace convert {

enum class Dtype { F32, F16, BF16 };

struct StoredTensor {
    std::string name;
    Dtype dtype = Dtype::F32;
    std::vector<int64_t> shape; // outermost first, as the file lists it (row-major)
    const uint8_t* data = nullptr;
    size_t nbytes = 0;
    std::string file; // for error messages

    int64_t n_elements() const;
    // The values as floats, converted from the stored dtype.
    std::vector<float> to_f32() const;
};

class SafetensorsFile {
  public:
    // Maps and parses path; throws gfa::Error naming the file and the problem.
    explicit SafetensorsFile(const std::string& path);
    ~SafetensorsFile();
    SafetensorsFile(const SafetensorsFile&) = delete;
    SafetensorsFile& operator=(const SafetensorsFile&) = delete;

    const std::map<std::string, StoredTensor>& tensors() const { return tensors_; }

  private:
    std::string path_;
    void* map_ = nullptr;
    size_t size_ = 0;
    std::map<std::string, StoredTensor> tensors_;
};

// Every tensor of a checkpoint directory: model.safetensors, the shards listed by
// model.safetensors.index.json, or (without either) every *.safetensors file in it.
class Checkpoint {
  public:
    explicit Checkpoint(const std::string& dir);
    const std::map<std::string, const StoredTensor*>& tensors() const { return tensors_; }

  private:
    std::vector<std::unique_ptr<SafetensorsFile>> files_;
    std::map<std::string, const StoredTensor*> tensors_;
};

} // namespace convert
