// The device registry: the CPU first, then every GPU device compiled in and present.
#include <ggml-fa/backend.h>

namespace gfa {

#ifdef GFA_HAVE_CUDA
void append_cuda_devices(std::vector<Device*>& out); // backends/cuda
#endif
#ifdef GFA_HAVE_VULKAN
void append_vulkan_devices(std::vector<Device*>& out); // backends/vulkan
#endif

const std::vector<Device*>& devices() {
    static const std::vector<Device*> list = [] {
        std::vector<Device*> out{&cpu_device()};
#ifdef GFA_HAVE_CUDA
        append_cuda_devices(out);
#endif
#ifdef GFA_HAVE_VULKAN
        append_vulkan_devices(out);
#endif
        return out;
    }();
    return list;
}

Device* find_device(std::string_view name) {
    for (Device* d : devices())
        if (name == d->name()) return d;
    return nullptr;
}

} // namespace gfa
