// A CPU tensor over memory Conveyor owns (a received batch), released through a callback when
// libtorch frees the tensor's storage: `at::from_blob` with a deleter, which tch does not wrap
// (it wraps only the overload without one). Built by build.rs with the `torch` feature.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <exception>

extern "C" {

typedef void (*conveyor_release_fn)(void *owner);

// Returns a heap `at::Tensor*` (what tch's `Tensor::from_ptr` takes) of `ndims` dimensions
// `dims` and ScalarType `scalar_type` over `data`, contiguous, on the CPU. `release(owner)` runs
// once, on whichever thread drops the last reference to the storage. On failure returns null,
// writes the message into `error` (at most `error_len` bytes) and releases nothing: the caller
// still owns `owner`.
void *conveyor_tensor_of_owned_blob(void *data, const int64_t *dims, size_t ndims, int scalar_type, void *owner,
                                    conveyor_release_fn release, char *error, size_t error_len) {
    try {
        auto options = at::TensorOptions().dtype(static_cast<at::ScalarType>(scalar_type)).device(at::kCPU);
        auto tensor = at::from_blob(
            data, at::IntArrayRef(dims, ndims), [owner, release](void *) { release(owner); }, options);
        return new at::Tensor(std::move(tensor));
    } catch (const std::exception &e) {
        std::snprintf(error, error_len, "%s", e.what());
        return nullptr;
    }
}
}
