// Errors a user can act on: every failure the library reports is a gfa::Error whose
// message names what was wrong (the op, the shapes, the file offset, the device).
#pragma once

#include <stdexcept>
#include <string>

namespace gfa {

class Error : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

// Raised when a backend cannot get the memory it needs; the caller can free and retry.
class OutOfMemory : public Error {
  public:
    using Error::Error;
};

[[noreturn]] void fail(const std::string& message);

} // namespace gfa
