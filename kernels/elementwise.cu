/*
 * elementwise.cu - copy/convert, fill, arange, rand, binary and unary operators and last-axis
 * reductions over arbitrary strided views, for every dtype.
 *
 * What this file protects: a GPU result equal to the CPU's, bit for bit wherever the math allows.
 * So no conversion and no operator is written here: elements are read and written through
 * numeric.h (dsrt_load_f32/i64, dsrt_store_f32/i64) and combined through opmath.h, the very
 * functions the C core runs. Where this file does arithmetic of its own (rand's scaling, arange's
 * ramp) it uses the explicitly rounded intrinsics (__fadd_rn, __dmul_rn, ...), because nvcc would
 * otherwise fuse a*b+c into one FMA, which rounds once where the CPU rounds twice.
 *
 * Shape of the code: one generic kernel, map_kernel<Body>, runs a grid-stride loop over output
 * positions and lets a small Body (one per launcher) load, compute and store elements. dtypes and
 * operators are runtime switches inside the numeric.h/opmath.h helpers: they are uniform across a
 * launch, so they cost branches, not divergence, and the file compiles to a handful of kernels
 * rather than one per dtype x dtype x op. Before launching, the host merges the dimensions all
 * operands stride alike (dsrtk_coalesce), so contiguous, sliced and row-broadcast data walks with
 * little or no index division. Contiguous same-dtype f32 and bf16 operators, the bulk of the
 * traffic, take a vectorised kernel instead, and contiguous same-dtype copies and fills become
 * cudaMemcpyAsync / cudaMemsetAsync.
 *
 * fp4 outputs pack two elements per byte; numeric.h's device store updates one nibble with atomics
 * on the word around it, so any fp4 view, strided or at an odd offset, can be written in parallel.
 *
 * Reductions run along the last axis with one thread, one warp, one block or one cluster of blocks
 * per output row, depending on the row length and the number of rows, over a grid-stride loop of
 * rows. Float sums accumulate in f32 in four running sums per thread, flushed into a total every
 * 64 steps, then combine as a tree, so the rounding error grows far slower than the row length.
 */
#include <cooperative_groups.h>
#include <math.h>
#include "common.cuh"

/* ---- argument checks shared by the launchers ---- */

static int check_view(const char *what, const char *name, const dsrt_view *v)
{
    if (v->ndim < 0 || v->ndim > DSRT_MAX_DIMS)
        return dsrtk_fail(DSRTK_ERROR, "%s: %s has %d dimensions (at most %d)", what, name, v->ndim, DSRT_MAX_DIMS);
    if (v->dtype < 0 || v->dtype >= DSRT_NDTYPES)
        return dsrtk_fail(DSRTK_ERROR, "%s: %s has unknown dtype %d", what, name, v->dtype);
    for (int d = 0; d < v->ndim; d++)
        if (v->shape[d] < 0 || v->stride[d] < 0)
            return dsrtk_fail(DSRTK_ERROR, "%s: %s has shape %lld / stride %lld in dimension %d", what, name,
                              (long long)v->shape[d], (long long)v->stride[d], d);
    return DSRTK_OK;
}

static int check_same_shape(const char *what, const char *name, const dsrt_view *v, const dsrt_view *dst)
{
    int st = check_view(what, name, v);
    if (st) return st;
    int same = v->ndim == dst->ndim;
    for (int d = 0; same && d < dst->ndim; d++) same = v->shape[d] == dst->shape[d];
    if (!same) return dsrtk_fail(DSRTK_ERROR, "%s: %s's shape differs from the output's", what, name);
    return DSRTK_OK;
}

/* ---- the generic map ---- */

/* A thread takes MAP_RUN consecutive positions per step. It first issues the loads of all of them,
 * then converts, computes and stores them in order: the loads are in flight together instead of
 * one at a time. */
enum { MAP_RUN = 4 };

/* An input element as loaded: its raw bits, converted only once every load of the run is issued.
 * For fp4 the bits are the whole byte, with the nibble meant (0 low, 1 high) in bit 8. */
__device__ __forceinline__ uint64_t load_raw(const dsrt_view &v, int64_t i)
{
    switch (v.dtype) {
    case DSRT_F32: case DSRT_I32: return ((const uint32_t *)v.data)[i];
    case DSRT_BF16: case DSRT_F16: return ((const uint16_t *)v.data)[i];
    case DSRT_I64: return ((const uint64_t *)v.data)[i];
    case DSRT_FP4E2M1: return ((const uint8_t *)v.data)[i >> 1] | (uint64_t)(i & 1) << 8;
    default: return ((const uint8_t *)v.data)[i];
    }
}

/* The value of a loaded element, through numeric.h's own loads: the bits sit at offset 0 of a
 * local (an fp4 nibble shifted there first), which the compiler keeps in a register. */
__device__ __forceinline__ uint64_t element_bits(uint64_t raw, int dtype)
{
    return dtype == DSRT_FP4E2M1 ? (raw >> (4 * (raw >> 8))) & 15u : raw;
}
__device__ __forceinline__ float raw_f32(uint64_t raw, int dtype)
{
    uint64_t bits = element_bits(raw, dtype);
    return dsrt_load_f32(&bits, dtype, 0);
}
__device__ __forceinline__ int64_t raw_i64(uint64_t raw, int dtype)
{
    uint64_t bits = element_bits(raw, dtype);
    return dsrt_load_i64(&bits, dtype, 0);
}

/* Body::load(lin, e) computes the output's element index and loads the inputs of row-major
 * position lin into e; Body::store(e) computes and stores the output. */
template <class Body>
__global__ void __launch_bounds__(DSRTK_BLOCK, DSRTK_MIN_BLOCKS) map_kernel(const __grid_constant__ Body body, int64_t n)
{
    int64_t step = (int64_t)gridDim.x * blockDim.x * MAP_RUN;
    for (int64_t first = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) * MAP_RUN; first < n; first += step) {
        typename Body::Loaded e[MAP_RUN];
#pragma unroll
        for (int j = 0; j < MAP_RUN; j++)
            if (first + j < n) body.load(first + j, e[j]);
#pragma unroll
        for (int j = 0; j < MAP_RUN; j++)
            if (first + j < n) body.store(e[j]);
    }
}

template <class Body>
static int launch_map(int dev, const char *kernel_name, const Body &body, int64_t n, void *stream)
{
    if (n == 0) return DSRTK_OK;
    int grid = dsrtk_grid_for(dev, (n + MAP_RUN - 1) / MAP_RUN, DSRTK_BLOCK);
    map_kernel<Body><<<grid, DSRTK_BLOCK, 0, (cudaStream_t)stream>>>(body, n);
    return dsrtk_check_launch(kernel_name, dev);
}

/* ---- copy ---- */

enum { COPY_BITS, COPY_INT, COPY_FLOAT };

struct CopyBody {
    dsrt_view dst, src;
    int mode; /* COPY_BITS: same dtype (not fp4), moved as raw bits */
    struct Loaded { int64_t at; uint64_t x; };
    __device__ void load(int64_t lin, Loaded &e) const
    {
        const dsrt_view *v[2] = {&dst, &src};
        int64_t at[2];
        dsrtk_offsets<2>(lin, v, at);
        e.at = at[0];
        e.x = load_raw(src, at[1]);
    }
    __device__ void store(const Loaded &e) const
    {
        if (mode == COPY_BITS) {
            switch (dst.dtype) {
            case DSRT_F32: case DSRT_I32: ((uint32_t *)dst.data)[e.at] = (uint32_t)e.x; break;
            case DSRT_BF16: case DSRT_F16: ((uint16_t *)dst.data)[e.at] = (uint16_t)e.x; break;
            case DSRT_I64: ((uint64_t *)dst.data)[e.at] = e.x; break;
            default: ((uint8_t *)dst.data)[e.at] = (uint8_t)e.x; break;
            }
        } else if (mode == COPY_INT) {
            dsrt_store_i64(dst.data, dst.dtype, e.at, raw_i64(e.x, src.dtype));
        } else {
            dsrt_store_f32(dst.data, dst.dtype, e.at, raw_f32(e.x, src.dtype));
        }
    }
};

/* Both views contiguous and of one dtype: the bytes they cover are one block, ready for memcpy
 * (for fp4 only when both start and end on byte boundaries). Sets *bytes. */
static int copyable_as_bytes(const dsrt_view *dst, const dsrt_view *src, int64_t n, size_t *bytes)
{
    if (dst->dtype != src->dtype || !dsrtk_is_contiguous(dst) || !dsrtk_is_contiguous(src)) return 0;
    size_t size = dsrtk_dtype_size(dst->dtype);
    if (size == 0) {
        if (n % 2 || dst->offset % 2 || src->offset % 2) return 0;
        *bytes = (size_t)n / 2;
    } else {
        *bytes = (size_t)n * size;
    }
    return 1;
}

static const void *element_address(const dsrt_view *v)
{
    size_t size = dsrtk_dtype_size(v->dtype);
    return (const char *)v->data + (size ? (size_t)v->offset * size : (size_t)v->offset / 2);
}

int dsrtk_copy(int dev, const dsrt_view *dst, const dsrt_view *src, void *stream)
{
    int st = check_view("copy", "the output", dst);
    if (st || (st = check_same_shape("copy", "the source", src, dst))) return st;
    DSRTK_SET_DEVICE(dev, "copy");
    int64_t n = dsrtk_numel(dst);
    if (n == 0) return DSRTK_OK;
    size_t bytes;
    if (copyable_as_bytes(dst, src, n, &bytes))
        return dsrtk_check(cudaMemcpyAsync((void *)element_address(dst), element_address(src), bytes,
                                           cudaMemcpyDeviceToDevice, (cudaStream_t)stream),
                           "copy: cudaMemcpyAsync of %zu bytes on cuda:%d", bytes, dev);
    CopyBody body;
    body.dst = *dst;
    body.src = *src;
    /* Same dtype moves bits (NaN payloads included) unless fp4, whose nibbles need the
     * read-modify-write store; the f32 round trip is exact for every fp4 code. Otherwise
     * integers travel as int64 and everything else as f32, as numeric.h's rules say. */
    if (dst->dtype == src->dtype && dst->dtype != DSRT_FP4E2M1) body.mode = COPY_BITS;
    else if (!dsrt_dtype_is_float(dst->dtype) && !dsrt_dtype_is_float(src->dtype)) body.mode = COPY_INT;
    else body.mode = COPY_FLOAT;
    dsrt_view *walk[] = {&body.dst, &body.src};
    dsrtk_coalesce(walk, 2);
    return launch_map(dev, "copy_kernel", body, n, stream);
}

/* ---- fill ---- */

struct FillBody {
    dsrt_view dst;
    float as_float;
    int64_t as_int;
    struct Loaded { int64_t at; };
    __device__ void load(int64_t lin, Loaded &e) const
    {
        const dsrt_view *v[1] = {&dst};
        dsrtk_offsets<1>(lin, v, &e.at);
    }
    __device__ void store(const Loaded &e) const
    {
        if (dsrt_dtype_is_float(dst.dtype)) dsrt_store_f32(dst.data, dst.dtype, e.at, as_float);
        else dsrt_store_i64(dst.data, dst.dtype, e.at, as_int);
    }
};

int dsrtk_fill(int dev, const dsrt_view *dst, double value, void *stream)
{
    int st = check_view("fill", "the output", dst);
    if (st) return st;
    DSRTK_SET_DEVICE(dev, "fill");
    int64_t n = dsrtk_numel(dst);
    if (n == 0) return DSRTK_OK;
    FillBody body;
    body.dst = *dst;
    body.as_float = (float)value;
    body.as_int = dsrt_dtype_is_float(dst->dtype) ? 0 : (int64_t)value;

    /* Encode two elements on the host with the same store the kernel would use; when every byte
     * of them is the same (zeros, all-ones, any byte-sized dtype) a contiguous fill is a memset. */
    uint8_t pattern[16] = {0};
    for (int i = 0; i < 2; i++) {
        if (dsrt_dtype_is_float(dst->dtype)) dsrt_store_f32(pattern, dst->dtype, i, body.as_float);
        else dsrt_store_i64(pattern, dst->dtype, i, body.as_int);
    }
    size_t size = dsrtk_dtype_size(dst->dtype), span = size ? 2 * size : 1;
    int uniform = 1;
    for (size_t i = 1; i < span; i++) uniform &= pattern[i] == pattern[0];
    if (uniform && dsrtk_is_contiguous(dst) && (size || n % 2 == 0)) {
        size_t bytes = size ? (size_t)n * size : (size_t)n / 2;
        return dsrtk_check(cudaMemsetAsync((void *)element_address(dst), pattern[0], bytes, (cudaStream_t)stream),
                           "fill: cudaMemsetAsync of %zu bytes on cuda:%d", bytes, dev);
    }
    dsrt_view *walk[] = {&body.dst};
    dsrtk_coalesce(walk, 1);
    return launch_map(dev, "fill_kernel", body, n, stream);
}

/* ---- arange ---- */

struct ArangeBody {
    dsrt_view dst;
    double start, step;
    struct Loaded { int64_t at, lin; };
    __device__ void load(int64_t lin, Loaded &e) const
    {
        const dsrt_view *v[1] = {&dst};
        dsrtk_offsets<1>(lin, v, &e.at);
        e.lin = lin;
    }
    __device__ void store(const Loaded &e) const
    {
        double x = __dadd_rn(start, __dmul_rn((double)e.lin, step)); /* no FMA: the CPU rounds twice */
        if (dsrt_dtype_is_float(dst.dtype)) dsrt_store_f32(dst.data, dst.dtype, e.at, (float)x);
        else dsrt_store_i64(dst.data, dst.dtype, e.at, (int64_t)x);
    }
};

int dsrtk_arange(int dev, const dsrt_view *dst, double start, double step, void *stream)
{
    int st = check_view("arange", "the output", dst);
    if (st) return st;
    DSRTK_SET_DEVICE(dev, "arange");
    ArangeBody body;
    body.dst = *dst;
    body.start = start;
    body.step = step;
    int64_t n = dsrtk_numel(dst);
    dsrt_view *walk[] = {&body.dst};
    dsrtk_coalesce(walk, 1);
    return launch_map(dev, "arange_kernel", body, n, stream);
}

/* ---- rand ---- */

struct RandBody {
    dsrt_view dst;
    uint64_t seed, offset;
    int normal;
    float a, b; /* lo, hi or mean, std */
    struct Loaded { int64_t at, lin; };
    __device__ void load(int64_t lin, Loaded &e) const
    {
        const dsrt_view *v[1] = {&dst};
        dsrtk_offsets<1>(lin, v, &e.at);
        e.lin = lin;
    }
    __device__ void store(const Loaded &e) const
    {
        uint64_t counter = offset + (uint64_t)e.lin;
        float x = normal ? __fadd_rn(a, __fmul_rn(b, dsrt_rand_normal(seed, counter)))
                         : __fadd_rn(a, __fmul_rn(__fsub_rn(b, a), dsrt_rand_uniform(seed, counter)));
        dsrt_store_f32(dst.data, dst.dtype, e.at, x);
    }
};

int dsrtk_rand(int dev, const dsrt_view *dst, uint64_t seed, uint64_t offset, int normal, double a, double b,
               void *stream)
{
    int st = check_view("rand", "the output", dst);
    if (st) return st;
    DSRTK_SET_DEVICE(dev, "rand");
    RandBody body;
    body.dst = *dst;
    body.seed = seed;
    body.offset = offset;
    body.normal = normal;
    body.a = (float)a;
    body.b = (float)b;
    int64_t n = dsrtk_numel(dst);
    dsrt_view *walk[] = {&body.dst};
    dsrtk_coalesce(walk, 1);
    return launch_map(dev, "rand_kernel", body, n, stream);
}

/* ---- contiguous f32 / bf16 operators ---- */

/* The common case of binary, binary_scalar and unary: every operand contiguous and of the output's
 * dtype, f32 or bf16, float math. Each thread moves 16 bytes per operand per step (when all
 * operands are 16-byte aligned), which keeps enough loads in flight to reach HBM bandwidth. */
enum { CONTIG_UNARY, CONTIG_BINARY, CONTIG_SCALAR };

struct ContiguousArgs {
    void *dst;
    const void *a, *b;
    int64_t n;
    int kind, op;
    int scalar_first; /* CONTIG_SCALAR: s OP a rather than a OP s */
    int aligned;
    float s;
};

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(uint16_t x) { return dsrt_bf16_to_f32(x); }
__device__ __forceinline__ void narrow(float x, float *out) { *out = x; }
__device__ __forceinline__ void narrow(float x, uint16_t *out) { *out = dsrt_f32_to_bf16(x); }

template <typename T> /* float, or uint16_t holding bf16 bits */
__global__ void __launch_bounds__(DSRTK_BLOCK, DSRTK_MIN_BLOCKS) contiguous_float_kernel(const __grid_constant__ ContiguousArgs p)
{
    constexpr int VEC = 16 / sizeof(T);
    union Chunk { uint4 raw; T e[VEC]; };
    const T *a = (const T *)p.a, *b = (const T *)p.b;
    T *dst = (T *)p.dst;
    int64_t chunks = (p.n + VEC - 1) / VEC;
    for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < chunks; c += (int64_t)gridDim.x * blockDim.x) {
        int64_t first = c * VEC;
        int whole = p.aligned && first + VEC <= p.n;
        Chunk x, y, out;
        if (whole) {
            x.raw = ((const uint4 *)a)[c];
            if (p.kind == CONTIG_BINARY) y.raw = ((const uint4 *)b)[c];
        } else {
            x.raw = y.raw = make_uint4(0, 0, 0, 0);
            for (int j = 0; j < VEC; j++)
                if (first + j < p.n) {
                    x.e[j] = a[first + j];
                    if (p.kind == CONTIG_BINARY) y.e[j] = b[first + j];
                }
        }
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            float r, u = widen(x.e[j]);
            if (p.kind == CONTIG_UNARY) r = dsrt_unary_f32(p.op, u);
            else if (p.kind == CONTIG_BINARY) r = dsrt_binary_f32(p.op, u, widen(y.e[j]));
            else r = p.scalar_first ? dsrt_binary_f32(p.op, p.s, u) : dsrt_binary_f32(p.op, u, p.s);
            narrow(r, &out.e[j]);
        }
        if (whole) {
            ((uint4 *)dst)[c] = out.raw;
        } else {
            for (int j = 0; j < VEC; j++)
                if (first + j < p.n) dst[first + j] = out.e[j];
        }
    }
}

/* Launches contiguous_float_kernel when the operands qualify; *taken says whether it did. */
static int try_contiguous(int dev, int kind, int op, const dsrt_view *dst, const dsrt_view *a, const dsrt_view *b,
                          float s, int scalar_first, int64_t n, void *stream, int *taken)
{
    *taken = 0;
    const dsrt_view *operands[3] = {dst, a, b};
    int count = kind == CONTIG_BINARY ? 3 : 2;
    if (dst->dtype != DSRT_F32 && dst->dtype != DSRT_BF16) return DSRTK_OK;
    int aligned = 1;
    for (int i = 0; i < count; i++) {
        if (operands[i]->dtype != dst->dtype || !dsrtk_is_contiguous(operands[i])) return DSRTK_OK;
        aligned &= ((uintptr_t)element_address(operands[i]) % 16) == 0;
    }
    *taken = 1;
    ContiguousArgs p;
    p.dst = (void *)element_address(dst);
    p.a = element_address(a);
    p.b = kind == CONTIG_BINARY ? element_address(b) : NULL;
    p.n = n;
    p.kind = kind;
    p.op = op;
    p.scalar_first = scalar_first;
    p.aligned = aligned;
    p.s = s;
    int vec = dst->dtype == DSRT_F32 ? 4 : 8;
    int grid = dsrtk_grid_for(dev, (n + vec - 1) / vec, DSRTK_BLOCK);
    if (dst->dtype == DSRT_F32) {
        contiguous_float_kernel<float><<<grid, DSRTK_BLOCK, 0, (cudaStream_t)stream>>>(p);
        return dsrtk_check_launch("contiguous_float_kernel<f32>", dev);
    }
    contiguous_float_kernel<uint16_t><<<grid, DSRTK_BLOCK, 0, (cudaStream_t)stream>>>(p);
    return dsrtk_check_launch("contiguous_float_kernel<bf16>", dev);
}

/* ---- binary ---- */

struct BinaryBody {
    dsrt_view dst, a, b;
    int op, compute_float;
    struct Loaded { int64_t at; uint64_t x, y; };
    __device__ void load(int64_t lin, Loaded &e) const
    {
        const dsrt_view *v[3] = {&dst, &a, &b};
        int64_t at[3];
        dsrtk_offsets<3>(lin, v, at);
        e.at = at[0];
        e.x = load_raw(a, at[1]);
        e.y = load_raw(b, at[2]);
    }
    __device__ void store(const Loaded &e) const
    {
        if (compute_float)
            dsrt_store_f32(dst.data, dst.dtype, e.at, dsrt_binary_f32(op, raw_f32(e.x, a.dtype), raw_f32(e.y, b.dtype)));
        else
            dsrt_store_i64(dst.data, dst.dtype, e.at, dsrt_binary_i64(op, raw_i64(e.x, a.dtype), raw_i64(e.y, b.dtype)));
    }
};

int dsrtk_binary(int dev, int op, const dsrt_view *dst, const dsrt_view *a, const dsrt_view *b, int compute_float,
                 void *stream)
{
    if (op < 0 || op >= DSRT_NBINARY) return dsrtk_fail(DSRTK_ERROR, "binary: unknown operator %d", op);
    int st = check_view("binary", "the output", dst);
    if (st || (st = check_same_shape("binary", "the first operand", a, dst)) ||
        (st = check_same_shape("binary", "the second operand", b, dst)))
        return st;
    DSRTK_SET_DEVICE(dev, "binary");
    int64_t n = dsrtk_numel(dst);
    if (n == 0) return DSRTK_OK;
    if (compute_float) {
        int fast;
        st = try_contiguous(dev, CONTIG_BINARY, op, dst, a, b, 0.0f, 0, n, stream, &fast);
        if (st || fast) return st;
    }
    BinaryBody body;
    body.dst = *dst;
    body.a = *a;
    body.b = *b;
    body.op = op;
    body.compute_float = compute_float;
    dsrt_view *walk[] = {&body.dst, &body.a, &body.b};
    dsrtk_coalesce(walk, 3);
    return launch_map(dev, "binary_kernel", body, n, stream);
}

/* ---- binary with a scalar ---- */

struct BinaryScalarBody {
    dsrt_view dst, a;
    int op, compute_float, scalar_first;
    float s_float;
    int64_t s_int;
    struct Loaded { int64_t at; uint64_t x; };
    __device__ void load(int64_t lin, Loaded &e) const
    {
        const dsrt_view *v[2] = {&dst, &a};
        int64_t at[2];
        dsrtk_offsets<2>(lin, v, at);
        e.at = at[0];
        e.x = load_raw(a, at[1]);
    }
    __device__ void store(const Loaded &e) const
    {
        if (compute_float) {
            float x = raw_f32(e.x, a.dtype);
            float r = scalar_first ? dsrt_binary_f32(op, s_float, x) : dsrt_binary_f32(op, x, s_float);
            dsrt_store_f32(dst.data, dst.dtype, e.at, r);
        } else {
            int64_t x = raw_i64(e.x, a.dtype);
            int64_t r = scalar_first ? dsrt_binary_i64(op, s_int, x) : dsrt_binary_i64(op, x, s_int);
            dsrt_store_i64(dst.data, dst.dtype, e.at, r);
        }
    }
};

int dsrtk_binary_scalar(int dev, int op, const dsrt_view *dst, const dsrt_view *a, double s, int scalar_first,
                        int compute_float, void *stream)
{
    if (op < 0 || op >= DSRT_NBINARY) return dsrtk_fail(DSRTK_ERROR, "binary_scalar: unknown operator %d", op);
    int st = check_view("binary_scalar", "the output", dst);
    if (st || (st = check_same_shape("binary_scalar", "the operand", a, dst))) return st;
    DSRTK_SET_DEVICE(dev, "binary_scalar");
    int64_t n = dsrtk_numel(dst);
    if (n == 0) return DSRTK_OK;
    if (compute_float) {
        int fast;
        st = try_contiguous(dev, CONTIG_SCALAR, op, dst, a, NULL, (float)s, scalar_first, n, stream, &fast);
        if (st || fast) return st;
    }
    BinaryScalarBody body;
    body.dst = *dst;
    body.a = *a;
    body.op = op;
    body.compute_float = compute_float;
    body.scalar_first = scalar_first;
    body.s_float = (float)s;
    body.s_int = compute_float ? 0 : (int64_t)s;
    dsrt_view *walk[] = {&body.dst, &body.a};
    dsrtk_coalesce(walk, 2);
    return launch_map(dev, "binary_scalar_kernel", body, n, stream);
}

/* ---- unary ---- */

struct UnaryBody {
    dsrt_view dst, a;
    int op, compute_int;
    struct Loaded { int64_t at; uint64_t x; };
    __device__ void load(int64_t lin, Loaded &e) const
    {
        const dsrt_view *v[2] = {&dst, &a};
        int64_t at[2];
        dsrtk_offsets<2>(lin, v, at);
        e.at = at[0];
        e.x = load_raw(a, at[1]);
    }
    __device__ void store(const Loaded &e) const
    {
        if (compute_int) dsrt_store_i64(dst.data, dst.dtype, e.at, dsrt_unary_i64(op, raw_i64(e.x, a.dtype)));
        else dsrt_store_f32(dst.data, dst.dtype, e.at, dsrt_unary_f32(op, raw_f32(e.x, a.dtype)));
    }
};

int dsrtk_unary(int dev, int op, const dsrt_view *dst, const dsrt_view *a, void *stream)
{
    if (op < 0 || op >= DSRT_NUNARY) return dsrtk_fail(DSRTK_ERROR, "unary: unknown operator %d", op);
    int st = check_view("unary", "the output", dst);
    if (st || (st = check_same_shape("unary", "the operand", a, dst))) return st;
    DSRTK_SET_DEVICE(dev, "unary");
    int64_t n = dsrtk_numel(dst);
    if (n == 0) return DSRTK_OK;
    int fast;
    st = try_contiguous(dev, CONTIG_UNARY, op, dst, a, NULL, 0.0f, 0, n, stream, &fast);
    if (st || fast) return st;
    UnaryBody body;
    body.dst = *dst;
    body.a = *a;
    body.op = op;
    /* integer in, integer out stays exact in int64 (the core sends only NEG, ABS, RELU there) */
    body.compute_int = !dsrt_dtype_is_float(a->dtype) && !dsrt_dtype_is_float(dst->dtype);
    dsrt_view *walk[] = {&body.dst, &body.a};
    dsrtk_coalesce(walk, 2);
    return launch_map(dev, "unary_kernel", body, n, stream);
}

/* ---- reductions along the last axis ---- */

struct ReduceArgs {
    dsrt_view dst;  /* outputs, walked as a flat list */
    dsrt_view rows; /* src without its last axis: where each row starts */
    int64_t length, step; /* the reduced axis: its size and stride */
    int64_t outer;        /* number of rows */
    int op;
};

/* One lane's running result: a sum (f or i) or an extremum (f or i) with its position. */
struct Partial {
    float f;
    int64_t i, at;
};

__device__ __forceinline__ bool is_sum(int op) { return op == DSRT_RED_SUM || op == DSRT_RED_MEAN; }
__device__ __forceinline__ bool wants_max(int op) { return op == DSRT_RED_MAX || op == DSRT_RED_ARGMAX; }

/* What a lane that saw nothing holds: it changes no sum and loses every comparison. */
__device__ __forceinline__ Partial neutral(int op)
{
    Partial p;
    p.at = INT64_MAX;
    p.f = is_sum(op) ? 0.0f : wants_max(op) ? -INFINITY : INFINITY;
    p.i = is_sum(op) ? 0 : wants_max(op) ? INT64_MIN : INT64_MAX;
    return p;
}

/* Does candidate (x, at) replace the current extremum (cur, cur_at)? The larger (or smaller)
 * value wins, a tie goes to the earlier position, and NaN beats every number, the earliest NaN
 * winning, for MAX and MIN alike (torch's rule). */
__device__ __forceinline__ bool replaces(float x, int64_t at, float cur, int64_t cur_at, bool want_max)
{
    bool x_nan = x != x, cur_nan = cur != cur;
    if (cur_nan) return x_nan && at < cur_at;
    if (x_nan) return true;
    if (x == cur) return at < cur_at;
    return want_max ? x > cur : x < cur;
}
__device__ __forceinline__ bool replaces(int64_t x, int64_t at, int64_t cur, int64_t cur_at, bool want_max)
{
    if (x == cur) return at < cur_at;
    return want_max ? x > cur : x < cur;
}

/* Integer sums wrap like the CPU's, through uint64 (signed overflow is undefined). */
__device__ __forceinline__ float add(float x, float y) { return x + y; }
__device__ __forceinline__ int64_t add(int64_t x, int64_t y) { return (int64_t)((uint64_t)x + (uint64_t)y); }

__device__ __forceinline__ float &value_of(Partial &p, float) { return p.f; }
__device__ __forceinline__ int64_t &value_of(Partial &p, int64_t) { return p.i; }

template <typename Value> __device__ __forceinline__ void merge(int op, Partial &p, Partial q)
{
    if (is_sum(op)) value_of(p, Value()) = add(value_of(p, Value()), value_of(q, Value()));
    else if (replaces(value_of(q, Value()), q.at, value_of(p, Value()), p.at, wants_max(op))) p = q;
}

/* Element loaders: the generic ones go through numeric.h; f32 and bf16 read directly, so their
 * four loads per step issue back to back without a dtype switch between them. */
struct LoadAnyFloat {
    typedef float Value;
    __device__ float operator()(const void *d, int dt, int64_t i) const { return dsrt_load_f32(d, dt, i); }
};
struct LoadF32 {
    typedef float Value;
    __device__ float operator()(const void *d, int, int64_t i) const { return ((const float *)d)[i]; }
};
struct LoadBF16 {
    typedef float Value;
    __device__ float operator()(const void *d, int, int64_t i) const { return dsrt_bf16_to_f32(((const uint16_t *)d)[i]); }
};
struct LoadAnyInt {
    typedef int64_t Value;
    __device__ int64_t operator()(const void *d, int dt, int64_t i) const { return dsrt_load_i64(d, dt, i); }
};

/* Lane `lane` of a group of `width` reduces positions lane, lane+width, ... of the row at `base`. */
template <class Load>
__device__ __forceinline__ Partial reduce_lane(const ReduceArgs &p, int64_t base, int64_t lane, int64_t width)
{
    typedef typename Load::Value Value;
    Load load;
    const void *data = p.rows.data;
    int dt = p.rows.dtype;
    Partial acc = neutral(p.op);
    Value cur = value_of(acc, Value());
    int64_t k = lane;
    if (is_sum(p.op)) {
        /* four running sums, flushed into the total every 64 steps: short f32 chains */
        Value sum[4] = {0, 0, 0, 0}, total = 0;
        for (int steps = 1; k + 3 * width < p.length; k += 4 * width, steps++) {
            Value x[4];
#pragma unroll
            for (int j = 0; j < 4; j++) x[j] = load(data, dt, base + (k + j * width) * p.step);
#pragma unroll
            for (int j = 0; j < 4; j++) sum[j] = add(sum[j], x[j]);
            if (steps % 64 == 0) {
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    total = add(total, sum[j]);
                    sum[j] = 0;
                }
            }
        }
        for (; k < p.length; k += width) sum[0] = add(sum[0], load(data, dt, base + k * p.step));
        value_of(acc, Value()) = add(total, add(add(sum[0], sum[1]), add(sum[2], sum[3])));
        return acc;
    }
    /* extrema: positions only grow within a lane, so replaces() keeps the first */
    bool want_max = wants_max(p.op);
    for (; k + 3 * width < p.length; k += 4 * width) {
        Value x[4];
#pragma unroll
        for (int j = 0; j < 4; j++) x[j] = load(data, dt, base + (k + j * width) * p.step);
#pragma unroll
        for (int j = 0; j < 4; j++)
            if (replaces(x[j], k + j * width, cur, acc.at, want_max)) { cur = x[j]; acc.at = k + j * width; }
    }
    for (; k < p.length; k += width) {
        Value x = load(data, dt, base + k * p.step);
        if (replaces(x, k, cur, acc.at, want_max)) { cur = x; acc.at = k; }
    }
    value_of(acc, Value()) = cur;
    return acc;
}

template <typename Value> __device__ __forceinline__ Partial merge_warp(int op, Partial p)
{
    for (int delta = 16; delta > 0; delta /= 2) {
        Partial q;
        q.f = __shfl_down_sync(0xffffffffu, p.f, delta);
        q.i = __shfl_down_sync(0xffffffffu, p.i, delta);
        q.at = __shfl_down_sync(0xffffffffu, p.at, delta);
        merge<Value>(op, p, q);
    }
    return p;
}

__device__ __forceinline__ void store_result(const ReduceArgs &p, int64_t row, Partial r, float)
{
    const dsrt_view *v[1] = {&p.dst};
    int64_t at;
    dsrtk_offsets<1>(row, v, &at);
    switch (p.op) {
    case DSRT_RED_ARGMAX: case DSRT_RED_ARGMIN: dsrt_store_i64(p.dst.data, p.dst.dtype, at, r.at); break;
    case DSRT_RED_MEAN: dsrt_store_f32(p.dst.data, p.dst.dtype, at, r.f / (float)p.length); break;
    default: dsrt_store_f32(p.dst.data, p.dst.dtype, at, r.f); break;
    }
}
__device__ __forceinline__ void store_result(const ReduceArgs &p, int64_t row, Partial r, int64_t)
{
    const dsrt_view *v[1] = {&p.dst};
    int64_t at;
    dsrtk_offsets<1>(row, v, &at);
    switch (p.op) {
    case DSRT_RED_ARGMAX: case DSRT_RED_ARGMIN: dsrt_store_i64(p.dst.data, p.dst.dtype, at, r.at); break;
    /* an integer mean is a float: one division in double, one rounding to f32 */
    case DSRT_RED_MEAN: dsrt_store_f32(p.dst.data, p.dst.dtype, at, (float)((double)r.i / (double)p.length)); break;
    default: dsrt_store_i64(p.dst.data, p.dst.dtype, at, r.i); break;
    }
}

__device__ __forceinline__ int64_t row_start(const ReduceArgs &p, int64_t row)
{
    const dsrt_view *v[1] = {&p.rows};
    int64_t at;
    dsrtk_offsets<1>(row, v, &at);
    return at;
}

/* A thread per row, for rows of a few elements. */
template <class Load>
__global__ void __launch_bounds__(DSRTK_BLOCK, DSRTK_MIN_BLOCKS) reduce_thread_kernel(const __grid_constant__ ReduceArgs p)
{
    for (int64_t row = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; row < p.outer; row += (int64_t)gridDim.x * blockDim.x)
        store_result(p, row, reduce_lane<Load>(p, row_start(p, row), 0, 1), typename Load::Value());
}

/* A warp per row, for rows up to a few thousand elements. */
template <class Load>
__global__ void __launch_bounds__(DSRTK_BLOCK, DSRTK_MIN_BLOCKS) reduce_warp_kernel(const __grid_constant__ ReduceArgs p)
{
    typedef typename Load::Value Value;
    int lane = threadIdx.x % 32;
    int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
    for (int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32; row < p.outer; row += warps) {
        Partial r = merge_warp<Value>(p.op, reduce_lane<Load>(p, row_start(p, row), lane, 32));
        if (lane == 0) store_result(p, row, r, Value());
    }
}

/* A block per row, for long rows (blockDim a multiple of 32, at most 1024). */
template <class Load>
__global__ void __launch_bounds__(1024, 1) reduce_block_kernel(const __grid_constant__ ReduceArgs p)
{
    typedef typename Load::Value Value;
    __shared__ Partial warp_results[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    for (int64_t row = blockIdx.x; row < p.outer; row += gridDim.x) {
        Partial r = merge_warp<Value>(p.op, reduce_lane<Load>(p, row_start(p, row), threadIdx.x, blockDim.x));
        if (lane == 0) warp_results[warp] = r;
        __syncthreads();
        if (warp == 0) {
            r = merge_warp<Value>(p.op, lane < nwarps ? warp_results[lane] : neutral(p.op));
            if (lane == 0) store_result(p, row, r, Value());
        }
        __syncthreads(); /* warp_results is reused by the next row */
    }
}

/* A cluster of blocks per row, for a few long rows, which one block each would leave most of the
 * GPU idle for. The cluster's blocks (on as many multiprocessors) split the row, each reduces its
 * share into shared memory, and block 0 merges their results through distributed shared memory:
 * no scratch buffer, which a two-pass reduction would need. */
template <class Load>
__global__ void __launch_bounds__(1024, 1) reduce_cluster_kernel(const __grid_constant__ ReduceArgs p)
{
    typedef typename Load::Value Value;
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    __shared__ Partial warp_results[32], block_result;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    int rank = (int)cluster.block_rank(), blocks = (int)cluster.num_blocks();
    int64_t lanes = (int64_t)blocks * blockDim.x;
    for (int64_t row = blockIdx.x / blocks; row < p.outer; row += gridDim.x / blocks) {
        Partial r = reduce_lane<Load>(p, row_start(p, row), (int64_t)rank * blockDim.x + threadIdx.x, lanes);
        r = merge_warp<Value>(p.op, r);
        if (lane == 0) warp_results[warp] = r;
        __syncthreads();
        if (warp == 0) {
            r = merge_warp<Value>(p.op, lane < nwarps ? warp_results[lane] : neutral(p.op));
            if (lane == 0) block_result = r;
        }
        cluster.sync(); /* every block's result is written */
        if (rank == 0 && warp == 0) {
            r = merge_warp<Value>(p.op, lane < blocks ? *cluster.map_shared_rank(&block_result, lane) : neutral(p.op));
            if (lane == 0) store_result(p, row, r, Value());
        }
        cluster.sync(); /* and read, before the next row overwrites it */
    }
}

/* Launches reduce_cluster_kernel with the widest cluster (at most `widest` blocks of 1024) that the
 * GPU can place; *launched is 0 when not even two-block clusters fit. */
template <class Load>
static int launch_clusters(int dev, const ReduceArgs &p, int widest, cudaStream_t stream, int *launched)
{
    *launched = 0;
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.y = attribute.val.clusterDim.z = 1;
    cudaLaunchConfig_t config = {};
    config.blockDim = dim3(1024);
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = 1;
    /* beyond 8 blocks a cluster is "non-portable": Hopper places 16, other parts may not */
    if (widest > 8 && cudaFuncSetAttribute(reduce_cluster_kernel<Load>, cudaFuncAttributeNonPortableClusterSizeAllowed,
                                           1) != cudaSuccess) {
        cudaGetLastError();
        widest = 8;
    }
    for (int cluster = widest; cluster >= 2; cluster /= 2) {
        attribute.val.clusterDim.x = cluster;
        config.gridDim = dim3((unsigned)(p.outer * cluster));
        int fits = 0;
        if (cudaOccupancyMaxActiveClusters(&fits, reduce_cluster_kernel<Load>, &config) != cudaSuccess) {
            cudaGetLastError();
            fits = 0;
        }
        if (fits == 0) continue;
        *launched = 1;
        int st = dsrtk_check(cudaLaunchKernelEx(&config, reduce_cluster_kernel<Load>, p),
                             "launch of reduce_cluster_kernel (%d-block clusters) on cuda:%d", cluster, dev);
        return st ? st : dsrtk_check_launch("reduce_cluster_kernel", dev);
    }
    return DSRTK_OK;
}

template <class Load>
static int launch_reduce(int dev, const ReduceArgs &p, cudaStream_t stream)
{
    if (p.length <= 16) {
        reduce_thread_kernel<Load><<<dsrtk_grid_for(dev, p.outer, DSRTK_BLOCK), DSRTK_BLOCK, 0, stream>>>(p);
        return dsrtk_check_launch("reduce_thread_kernel", dev);
    }
    if (p.length <= 4096) {
        reduce_warp_kernel<Load><<<dsrtk_grid_for(dev, p.outer * 32, DSRTK_BLOCK), DSRTK_BLOCK, 0, stream>>>(p);
        return dsrtk_check_launch("reduce_warp_kernel", dev);
    }
    /* fewer long rows than half the multiprocessors: a cluster per row, as wide as covers the GPU */
    int sms = dsrtk_multiprocessors(dev);
    if (p.outer * 2 <= sms) {
        int widest = 2, launched;
        while (widest < 16 && p.outer * widest * 2 <= sms) widest *= 2;
        int st = launch_clusters<Load>(dev, p, widest, stream, &launched);
        if (st || launched) return st;
    }
    /* otherwise a block per row; the widest blocks while rows are few */
    int block = p.outer >= 1024 ? DSRTK_BLOCK : 1024;
    reduce_block_kernel<Load><<<dsrtk_grid_for(dev, p.outer * block, block), block, 0, stream>>>(p);
    return dsrtk_check_launch("reduce_block_kernel", dev);
}

int dsrtk_reduce(int dev, int op, const dsrt_view *dst, const dsrt_view *src, void *stream)
{
    if (op < 0 || op >= DSRT_NREDUCE) return dsrtk_fail(DSRTK_ERROR, "reduce: unknown reduction %d", op);
    int st = check_view("reduce", "the output", dst);
    if (st || (st = check_view("reduce", "the source", src))) return st;
    ReduceArgs p;
    p.op = op;
    p.dst = *dst;
    p.rows = *src;
    p.length = src->ndim ? src->shape[src->ndim - 1] : 1;
    p.step = src->ndim ? src->stride[src->ndim - 1] : 0;
    p.rows.ndim = src->ndim ? src->ndim - 1 : 0;
    p.outer = dsrtk_numel(&p.rows);
    if (dsrtk_numel(dst) != p.outer)
        return dsrtk_fail(DSRTK_ERROR, "reduce: the output has %lld elements for %lld rows", (long long)dsrtk_numel(dst),
                          (long long)p.outer);
    if (p.outer == 0) return DSRTK_OK;
    if (p.length == 0) return dsrtk_fail(DSRTK_ERROR, "reduce: cannot reduce an empty dimension");
    DSRTK_SET_DEVICE(dev, "reduce");
    dsrt_view *outputs[] = {&p.dst}, *rows[] = {&p.rows};
    dsrtk_coalesce(outputs, 1);
    dsrtk_coalesce(rows, 1);
    cudaStream_t s = (cudaStream_t)stream;
    switch (src->dtype) {
    case DSRT_F32: return launch_reduce<LoadF32>(dev, p, s);
    case DSRT_BF16: return launch_reduce<LoadBF16>(dev, p, s);
    default:
        if (dsrt_dtype_is_float(src->dtype)) return launch_reduce<LoadAnyFloat>(dev, p, s);
        return launch_reduce<LoadAnyInt>(dev, p, s);
    }
}
