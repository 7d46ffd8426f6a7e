// The CUDA runtime calls the CPU-side core needs (allocation, copies, fills), declared without
// CUDA types so plain C++ files can call them; implemented in device_cuda.cu, present only in
// builds with SY_WITH_CUDA. Streams are cudaStream_t passed as void* (null: per-thread default).
#pragma once

#include <cstddef>
#include <string>

#include "switchyard/dtype.h"
#include "switchyard/index.h"

namespace switchyard::cuda {

// GPUs usable by this process; 0 when there is no driver or no device (never throws).
int device_count();

// Stream-ordered allocation from the device's memory pool, which keeps freed memory cached
// (release threshold: unlimited), so steady-state steps never call into the driver's allocator.
void* malloc_async(std::size_t bytes, int device, void* stream);
void free_async(void* ptr, int device, void* stream);

enum class CopyKind { kHostToDevice, kDeviceToHost, kDeviceToDevice };
// Copies bytes on the stream; a copy to the host waits for the stream to finish it.
void copy(void* dst, const void* src, std::size_t bytes, CopyKind kind, int device, void* stream);

// dst[i] = convert(src[i]) for i < n on the stream (contiguous, any two dtypes).
void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, index_t n, int device,
             void* stream);
// The same over `sizes` (ndim <= kMaxStridedDims) with element strides on both sides (views).
constexpr int kMaxStridedDims = 8;
void convert_strided(const void* src, DType src_dtype, const index_t* src_strides, void* dst,
                     DType dst_dtype, const index_t* dst_strides, const index_t* sizes, int ndim,
                     int device, void* stream);
// dst[i] = value for i < n (contiguous) on the stream.
void fill(void* dst, DType dtype, double value, index_t n, int device, void* stream);

void synchronize(int device, void* stream);

void* create_stream(int device);
void destroy_stream(int device, void* stream);
// Stream capture into an instantiated graph (a cudaGraphExec_t as void*).
void begin_capture(int device, void* stream);
void* end_capture(int device, void* stream);
void launch_graph(int device, void* exec, void* stream);
void destroy_graph(void* exec);

// The GPU's product name.
std::string device_name(int device);

// Returns the memory the device's pool caches to the driver.
void release_cached(int device);

}  // namespace switchyard::cuda
