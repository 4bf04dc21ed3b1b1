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
 * little or no index division.
 *
 * The bulk of the traffic takes vectorised kernels instead, each thread moving 16-byte vectors:
 * conversions between contiguous f32, bf16, f16 and f8e4m3 (and from them to fp4), templated on
 * the (source, destination) format pair; float operators on contiguous or row-broadcast f32, bf16
 * and f16, templated on the format, with the operator chosen once per vector rather than once per
 * element. Contiguous same-dtype copies and fills become cudaMemcpyAsync / cudaMemsetAsync, and
 * copies between views contiguous along different dimensions go through transpose.cu's tiles.
 *
 * fp4 outputs pack two elements per byte; numeric.h's device store updates one nibble with atomics
 * on the word around it, so any fp4 view, strided or at an odd offset, can be written in parallel.
 * The contiguous conversion builds whole bytes instead, which its threads own.
 *
 * Reductions run along the last axis with one thread, one warp, one block or one cluster of blocks
 * per output row, depending on the row length and the number of rows, over a grid-stride loop of
 * rows; a reduction over another axis (the last axis of a permuted view, with neighbouring rows
 * starting at neighbouring elements) gives each thread a row instead, so warps read contiguous
 * segments. Float sums accumulate in f32 in several running sums per thread, flushed into a total
 * every 64 steps, then combine as a tree, so the rounding error grows far slower than the row
 * length. Maxima and minima keep the first extreme position, NaN winning, whatever the order in
 * which partial results meet.
 */
#include <cooperative_groups.h>
#include <math.h>
#include <type_traits>
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

/* ---- branch-free codecs ---- */

/* numeric.h's f8e4m3 and fp4 conversions branch on the value's range, and on real data those
 * branches diverge in nearly every warp (one unit-normal value in 80 is an e4m3 subnormal); the
 * vectorised kernels use these equivalents, built from selects, instead. Each was checked equal to
 * its numeric.h counterpart on every input (all 2^32 floats, all 256 codes), on the CPU and on an
 * H200. Their float arithmetic is exact or rounds once, to nearest even, exactly as numeric.h's
 * integer rounding does: a product by a power of two is exact; adding 1.5 * 2^23 to a value below
 * 2^22 rounds it to an integer; 2^e (1 + m) - 2^e is exact. (Whether the compiler fuses the
 * product and the sum into an FMA does not matter: the product is exact.) f16's branches almost
 * never diverge (its subnormals lie below 2^-14), so f16 keeps numeric.h's code. */
__host__ __device__ __forceinline__ float e4m3_to_f32(uint32_t b)
{
    uint32_t sign = (b & 0x80u) << 24, em = b & 0x7fu;
    float subnormal = dsrt_bits_f32((121u << 23) | (em << 20)) - 0.015625f; /* m * 2^-9 */
    uint32_t magnitude = em == 0x7fu ? 0x7fc00000u : em < 8u ? dsrt_f32_bits(subnormal) : (em << 20) + (120u << 23);
    return dsrt_bits_f32(sign | magnitude);
}
__host__ __device__ __forceinline__ uint32_t f32_to_e4m3(float f)
{
    uint32_t u = dsrt_f32_bits(f), sign = (u >> 24) & 0x80u, a = u & 0x7fffffffu;
    uint32_t normal = ((a + 0x7ffffu + ((a >> 20) & 1u) - 0x3c000000u) >> 20) & 0x7fu;
    uint32_t subnormal = dsrt_f32_bits(dsrt_bits_f32(a) * 512.0f + 12582912.0f) - 0x4b400000u; /* |f| / 2^-9 */
    return sign | (a >= 0x43f00000u ? 0x7fu : a < 0x3c800000u ? subnormal : normal);
}
/* e2m1: from 1 up, the code is the float's exponent and first mantissa bit rounded as one field,
 * 2 for 1.0, at most 7; below 1, twice the value rounded to an integer. */
__host__ __device__ __forceinline__ uint32_t f32_to_fp4(float f)
{
    uint32_t u = dsrt_f32_bits(f), a = u & 0x7fffffffu;
    uint32_t normal = ((a + 0x1fffffu + ((a >> 22) & 1u)) >> 22) - 252u;
    uint32_t small = dsrt_f32_bits(dsrt_bits_f32(a) * 2.0f + 12582912.0f) - 0x4b400000u;
    uint32_t code = a < 0x3f800000u ? small : normal < 7u ? normal : 7u;
    return a > 0x7f800000u ? 0u : code | ((u >> 28) & 8u); /* NaN is +0 */
}

/* ---- packed elements for the vectorised kernels ---- */

/* Element formats of the vectorised kernels: bits per element and the conversions from and to
 * f32, numeric.h's or their branch-free equivalents above. */
struct F32Format {
    enum { BITS = 32 };
    static __device__ __forceinline__ float decode(uint32_t w) { return dsrt_bits_f32(w); }
    static __device__ __forceinline__ uint32_t encode(float x) { return dsrt_f32_bits(x); }
};
struct BF16Format {
    enum { BITS = 16 };
    static __device__ __forceinline__ float decode(uint32_t w) { return dsrt_bf16_to_f32((uint16_t)w); }
    static __device__ __forceinline__ uint32_t encode(float x) { return dsrt_f32_to_bf16(x); }
};
struct F16Format {
    enum { BITS = 16 };
    static __device__ __forceinline__ float decode(uint32_t w) { return dsrt_f16_to_f32((uint16_t)w); }
    static __device__ __forceinline__ uint32_t encode(float x) { return dsrt_f32_to_f16(x); }
};
struct E4M3Format {
    enum { BITS = 8 };
    static __device__ __forceinline__ float decode(uint32_t w) { return e4m3_to_f32(w); }
    static __device__ __forceinline__ uint32_t encode(float x) { return f32_to_e4m3(x); }
};
struct FP4Format { /* an output format only */
    enum { BITS = 4 };
    static __device__ __forceinline__ uint32_t encode(float x) { return f32_to_fp4(x); }
};

/* A thread's elements travel as an array of 32-bit words, moved with 16-byte accesses (or one
 * access of 4 or 8 bytes). Every index below is a compile-time constant once the element loops
 * unroll, so the arrays stay in registers. */
template <int BYTES>
__device__ __forceinline__ void load_words(const void *at, uint32_t (&w)[BYTES / 4])
{
    if constexpr (BYTES % 16 == 0) {
#pragma unroll
        for (int k = 0; k < BYTES / 16; k++) {
            uint4 v = ((const uint4 *)at)[k];
            w[4 * k] = v.x, w[4 * k + 1] = v.y, w[4 * k + 2] = v.z, w[4 * k + 3] = v.w;
        }
    } else if constexpr (BYTES == 8) {
        uint2 v = *(const uint2 *)at;
        w[0] = v.x, w[1] = v.y;
    } else {
        static_assert(BYTES == 4, "4, 8 or a multiple of 16 bytes");
        w[0] = *(const uint32_t *)at;
    }
}
template <int BYTES>
__device__ __forceinline__ void store_words(void *at, const uint32_t (&w)[BYTES / 4])
{
    if constexpr (BYTES % 16 == 0) {
#pragma unroll
        for (int k = 0; k < BYTES / 16; k++) ((uint4 *)at)[k] = make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
    } else {
        static_assert(BYTES == 8, "8 bytes or a multiple of 16");
        *(uint2 *)at = make_uint2(w[0], w[1]);
    }
}
/* Element j of BITS bits in a word array, and the same placed into one (the array starts zeroed). */
template <int BITS, int N>
__device__ __forceinline__ uint32_t field(const uint32_t (&w)[N], int j)
{
    if constexpr (BITS == 32) return w[j];
    else return (w[j * BITS / 32] >> (j * BITS % 32)) & ((1u << BITS) - 1u);
}
template <int BITS, int N>
__device__ __forceinline__ void put_field(uint32_t (&w)[N], int j, uint32_t x)
{
    if constexpr (BITS == 32) w[j] = x;
    else w[j * BITS / 32] |= x << (j * BITS % 32);
}
/* One element of BITS (8, 16 or 32) bits of a contiguous array, read or written alone. */
template <int BITS>
__device__ __forceinline__ uint32_t load_element(const void *base, int64_t i)
{
    if constexpr (BITS == 32) return ((const uint32_t *)base)[i];
    else if constexpr (BITS == 16) return ((const uint16_t *)base)[i];
    else return ((const uint8_t *)base)[i];
}
template <int BITS>
__device__ __forceinline__ void store_element(void *base, int64_t i, uint32_t x)
{
    if constexpr (BITS == 32) ((uint32_t *)base)[i] = x;
    else if constexpr (BITS == 16) ((uint16_t *)base)[i] = (uint16_t)x;
    else ((uint8_t *)base)[i] = (uint8_t)x;
}

/* Element i of a repeated block: a block of `period` elements read by `group` consecutive output
 * elements (its rows), then the next block: (i / group) · period + i mod period. A row broadcast
 * is one block (group >= n); [T, 1, d] read as [T, hc, d] is T blocks of d, each for hc rows.
 * 64-bit division is a long software sequence, and nearly every index fits 32 bits. */
__device__ __forceinline__ int64_t repeated(int64_t i, int64_t period, int64_t group)
{
    if (((uint64_t)i | (uint64_t)group) >> 32 == 0)
        return (int64_t)((uint32_t)i / (uint32_t)group) * period + (uint32_t)i % (uint32_t)period;
    return i / group * period + i % period;
}

/* ---- the operands of the vector kernels ---- */

static const void *element_address(const dsrt_view *v)
{
    size_t size = dsrtk_dtype_size(v->dtype);
    return (const char *)v->data + (size ? (size_t)v->offset * size : (size_t)v->offset / 2);
}

/* An input of operator_kernel or repeat_copy_kernel: a whole tensor, a repeated block or (for
 * binary_scalar) a scalar */
enum { OPERAND_FULL, OPERAND_ROW, OPERAND_SCALAR };

struct Operand {
    const void *data;
    int mode;
    int64_t period, group; /* OPERAND_ROW: element i reads element repeated(i, period, group) */
    float s;               /* OPERAND_SCALAR */
};

/* A coalesced output the vector kernels can walk: contiguous in 1 to 3 dimensions */
static int contiguous_walk(const dsrt_view *d)
{
    int64_t stride = 1;
    for (int i = d->ndim - 1; i >= 0; i--) {
        if (d->stride[i] != stride) return 0;
        stride *= d->shape[i];
    }
    return d->ndim >= 1 && d->ndim <= 3;
}

/* How `v`, coalesced together with a contiguous_walk output, feeds the vector kernels: all of it
 * (strides the output's), or a repeated block: [rows, cols] strides [0, 1] (a row broadcast) or
 * [T, hc, d] strides [d, 0, 1] (one row a T broadcast to hc rows, as hc_expand and the MTP
 * input's sum read it). 0 when it cannot. */
static int operand_from(const dsrt_view *v, const dsrt_view *dst, Operand *o)
{
    o->data = element_address(v);
    o->period = o->group = 0;
    o->s = 0.0f;
    if (v->dtype != dst->dtype || v->stride[v->ndim - 1] != 1) return 0;
    int full = 1;
    for (int i = 0; i < v->ndim; i++) full &= v->stride[i] == dst->stride[i];
    o->mode = full ? OPERAND_FULL : OPERAND_ROW;
    if (full) return 1;
    if (v->ndim == 2 && v->stride[0] == 0) o->period = v->shape[1], o->group = v->shape[0] * v->shape[1];
    else if (v->ndim == 3 && v->stride[1] == 0 && v->stride[0] == v->shape[2])
        o->period = v->shape[2], o->group = v->shape[1] * v->shape[2];
    else return 0;
    return 1;
}

/* ---- copy ---- */

struct CopyBody {
    dsrt_view dst, src;
    int mode; /* DSRTK_COPY_* */
    struct Loaded { int64_t at; uint64_t x; };
    __device__ void load(int64_t lin, Loaded &e) const
    {
        const dsrt_view *v[2] = {&dst, &src};
        int64_t at[2];
        dsrtk_offsets<2>(lin, v, at);
        e.at = at[0];
        e.x = dsrtk_load_raw(src, at[1]);
    }
    __device__ void store(const Loaded &e) const { dsrtk_store_copied(dst, mode, src.dtype, e.at, e.x); }
};

/* A same-dtype copy into a contiguous output from a repeated block (operand_from's OPERAND_ROW:
 * hc_expand's [T, 1, d] -> [T, hc, d]), 16-byte words at a time, the bytes as they are. The
 * generic map took 541 us for hc_expand at 4096 tokens of the Flash slice (H200). */
__global__ void __launch_bounds__(DSRTK_BLOCK, DSRTK_MIN_BLOCKS) repeat_copy_kernel(uint4 *dst, const uint4 *src,
                                                                                  int64_t words, int64_t period,
                                                                                  int64_t group)
{
    for (int64_t w = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; w < words; w += (int64_t)gridDim.x * blockDim.x)
        dst[w] = src[repeated(w, period, group)];
}

/* Launches repeat_copy_kernel when the coalesced views qualify; *taken says whether it did */
static int try_repeat_copy(int dev, const dsrt_view *dst, const dsrt_view *src, int64_t n, void *stream, int *taken)
{
    *taken = 0;
    size_t size = dsrtk_dtype_size(dst->dtype);
    Operand o;
    if (dst->dtype != src->dtype || size == 0 || !contiguous_walk(dst) || !operand_from(src, dst, &o) ||
        o.mode != OPERAND_ROW || (o.period * size) % 16 || (uintptr_t)o.data % 16 || (uintptr_t)element_address(dst) % 16)
        return DSRTK_OK;
    *taken = 1;
    const int64_t per_word = 16 / (int64_t)size, words = n / per_word;
    int grid = dsrtk_grid_for(dev, words, DSRTK_BLOCK);
    repeat_copy_kernel<<<grid, DSRTK_BLOCK, 0, (cudaStream_t)stream>>>((uint4 *)element_address(dst), (const uint4 *)o.data,
                                                                       words, o.period / per_word, o.group / per_word);
    return dsrtk_check_launch("repeat_copy_kernel", dev);
}

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

/* ---- contiguous conversions ---- */

/* Both views contiguous, from f32, bf16, f16 or f8e4m3 to another of them or to fp4 starting on a
 * byte: each thread converts the E elements of one 16-byte destination vector (16 elements, 8
 * bytes, for fp4), so that every store instruction of a warp writes one contiguous run; a thread
 * storing several vectors would leave gaps between its neighbours' stores, which cost partial
 * writes. The source side takes one access of 4 to 16 bytes, or several of 16 bytes that the
 * warp's loads read whole between them. What the vectors cannot take (the tail, misaligned views)
 * goes element by element through the same conversions. A thread builds whole fp4 bytes and
 * stores them plainly: both nibbles are its own. Only an odd last element shares its byte with
 * memory outside the view, and takes numeric.h's atomic nibble store. */
struct ConvertArgs {
    void *dst;       /* element 0 of each (for fp4 the byte holding it) */
    const void *src;
    int64_t n;
    int aligned;     /* both views' vectors are aligned */
};

template <class From, class To> struct Conversion {
    static constexpr int E = To::BITS >= 8 ? 128 / To::BITS : 16;
    static constexpr int IN = E * From::BITS / 8, OUT = E * To::BITS / 8; /* bytes */
};

template <class From, class To>
__global__ void __launch_bounds__(DSRTK_BLOCK, DSRTK_MIN_BLOCKS) convert_kernel(const __grid_constant__ ConvertArgs p)
{
    typedef Conversion<From, To> C;
    constexpr int E = C::E;
    int64_t chunks = (p.n + E - 1) / E;
    for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < chunks; c += (int64_t)gridDim.x * blockDim.x) {
        int64_t first = c * E;
        bool whole = p.aligned && first + E <= p.n;
        uint32_t in[C::IN / 4] = {}, out[C::OUT / 4] = {};
        if (whole) {
            load_words<C::IN>((const char *)p.src + c * C::IN, in);
        } else {
#pragma unroll
            for (int j = 0; j < E; j++)
                if (first + j < p.n) put_field<From::BITS>(in, j, load_element<From::BITS>(p.src, first + j));
        }
        float x[E];
#pragma unroll
        for (int j = 0; j < E; j++) {
            x[j] = From::decode(field<From::BITS>(in, j));
            put_field<To::BITS>(out, j, To::encode(x[j]));
        }
        if (whole) {
            store_words<C::OUT>((char *)p.dst + c * C::OUT, out);
        } else if constexpr (To::BITS == 4) {
#pragma unroll
            for (int j = 0; j < E; j += 2) {
                if (first + j + 1 < p.n) ((uint8_t *)p.dst)[(first + j) / 2] = (uint8_t)field<8>(out, j / 2);
                else if (first + j < p.n) dsrt_store_f32(p.dst, DSRT_FP4E2M1, first + j, x[j]);
            }
        } else {
#pragma unroll
            for (int j = 0; j < E; j++)
                if (first + j < p.n) store_element<To::BITS>(p.dst, first + j, field<To::BITS>(out, j));
        }
    }
}

template <class From, class To>
static int launch_convert(int dev, ConvertArgs p, void *stream)
{
    if constexpr (std::is_same<From, To>::value) {
        return dsrtk_fail(DSRTK_ERROR, "copy: no conversion from a dtype to itself"); /* dsrtk_copy copies bytes */
    } else {
        typedef Conversion<From, To> C;
        p.aligned = (uintptr_t)p.src % (C::IN < 16 ? C::IN : 16) == 0 && (uintptr_t)p.dst % (C::OUT < 16 ? C::OUT : 16) == 0;
        int grid = dsrtk_grid_for(dev, (p.n + C::E - 1) / C::E, DSRTK_BLOCK);
        convert_kernel<From, To><<<grid, DSRTK_BLOCK, 0, (cudaStream_t)stream>>>(p);
        return dsrtk_check_launch("convert_kernel", dev);
    }
}

template <class From>
static int convert_to(int dev, int dtype, const ConvertArgs &p, void *stream)
{
    switch (dtype) {
    case DSRT_F32: return launch_convert<From, F32Format>(dev, p, stream);
    case DSRT_BF16: return launch_convert<From, BF16Format>(dev, p, stream);
    case DSRT_F16: return launch_convert<From, F16Format>(dev, p, stream);
    case DSRT_F8E4M3: return launch_convert<From, E4M3Format>(dev, p, stream);
    default: return launch_convert<From, FP4Format>(dev, p, stream);
    }
}

static int is_vector_format(int dtype) { return dtype <= DSRT_F8E4M3; } /* f32, bf16, f16, f8e4m3 */

/* Launches convert_kernel when the views qualify; *taken says whether it did. */
static int try_convert(int dev, const dsrt_view *dst, const dsrt_view *src, int64_t n, void *stream, int *taken)
{
    *taken = 0;
    if (dst->dtype == src->dtype || !is_vector_format(src->dtype) ||
        !(is_vector_format(dst->dtype) || (dst->dtype == DSRT_FP4E2M1 && dst->offset % 2 == 0)) ||
        !dsrtk_is_contiguous(dst) || !dsrtk_is_contiguous(src))
        return DSRTK_OK;
    *taken = 1;
    ConvertArgs p;
    p.dst = (void *)element_address(dst);
    p.src = element_address(src);
    p.n = n;
    switch (src->dtype) {
    case DSRT_F32: return convert_to<F32Format>(dev, dst->dtype, p, stream);
    case DSRT_BF16: return convert_to<BF16Format>(dev, dst->dtype, p, stream);
    case DSRT_F16: return convert_to<F16Format>(dev, dst->dtype, p, stream);
    default: return convert_to<E4M3Format>(dev, dst->dtype, p, stream);
    }
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
    int taken;
    st = try_convert(dev, dst, src, n, stream, &taken);
    if (st || taken) return st;
    CopyBody body;
    body.dst = *dst;
    body.src = *src;
    body.mode = dsrtk_copy_mode(dst->dtype, src->dtype);
    dsrt_view *walk[] = {&body.dst, &body.src};
    dsrtk_coalesce(walk, 2);
    st = try_repeat_copy(dev, &body.dst, &body.src, n, stream, &taken);
    if (st || taken) return st;
    st = dsrtk_copy_tiled(dev, &body.dst, &body.src, body.mode, stream, &taken);
    if (st || taken) return st;
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

/* ---- contiguous and row-broadcast float operators ---- */

/* The common case of binary, binary_scalar and unary: float math, the output contiguous and of
 * f32, bf16 or f16, and every tensor input of that dtype and either contiguous too or one row
 * repeated down the output (the [rows, cols] + [cols] broadcast); binary_scalar's scalar is an
 * input like the others. Each thread moves 16 bytes per tensor per step, and the operator is
 * chosen once per step, outside the loop over the step's elements: the loop is straight-line code
 * for the one operator, which the compiler interleaves across elements. What the vectors cannot
 * take (a tail, a misaligned view, a row whose length is no multiple of the vector) goes element
 * by element through the same code. */
struct OperatorArgs {
    void *dst;
    Operand a, b;
    int64_t n;
    int binary, op; /* binary: dst = a OP b, otherwise dst = OP a */
    int aligned;    /* every tensor's vectors are 16-byte aligned, every row a whole number of them */
};

/* x[j] = OP x[j] (or x[j] OP y[j]) for the operator `op`, found by a chain of uniform branches
 * once per call. Comparisons never come here: their output is bool. */
template <int VEC, int OP = 0>
__device__ __forceinline__ void unary_all(int op, float (&x)[VEC])
{
    if constexpr (OP + 1 < DSRT_NUNARY)
        if (op != OP) return unary_all<VEC, OP + 1>(op, x);
#pragma unroll
    for (int j = 0; j < VEC; j++) x[j] = dsrt_unary_f32(OP, x[j]);
}
template <int VEC, int OP = 0>
__device__ __forceinline__ void binary_all(int op, float (&x)[VEC], const float (&y)[VEC])
{
    if constexpr (OP + 1 < DSRT_OP_EQ)
        if (op != OP) return binary_all<VEC, OP + 1>(op, x, y);
#pragma unroll
    for (int j = 0; j < VEC; j++) x[j] = dsrt_binary_f32(OP, x[j], y[j]);
}

/* The values of elements first .. first+VEC-1 (chunk c) of an input; `whole`: as one vector. */
template <class Format, int VEC>
__device__ __forceinline__ void load_operand(const Operand &o, int64_t c, int64_t first, bool whole, int64_t n,
                                             float (&x)[VEC])
{
    if (o.mode == OPERAND_SCALAR) {
#pragma unroll
        for (int j = 0; j < VEC; j++) x[j] = o.s;
    } else if (whole) {
        uint32_t w[4];
        load_words<16>((const uint4 *)o.data + (o.mode == OPERAND_ROW ? repeated(c, o.period / VEC, o.group / VEC) : c), w);
#pragma unroll
        for (int j = 0; j < VEC; j++) x[j] = Format::decode(field<Format::BITS>(w, j));
    } else {
#pragma unroll
        for (int j = 0; j < VEC; j++) {
            int64_t i = first + j;
            x[j] = 0.0f;
            if (i < n) {
                const int64_t at = o.mode == OPERAND_ROW ? repeated(i, o.period, o.group) : i;
                x[j] = Format::decode(load_element<Format::BITS>(o.data, at));
            }
        }
    }
}

template <class Format>
__global__ void __launch_bounds__(DSRTK_BLOCK, DSRTK_MIN_BLOCKS) operator_kernel(const __grid_constant__ OperatorArgs p)
{
    constexpr int VEC = 128 / Format::BITS;
    int64_t chunks = (p.n + VEC - 1) / VEC;
    for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < chunks; c += (int64_t)gridDim.x * blockDim.x) {
        int64_t first = c * VEC;
        bool whole = p.aligned && first + VEC <= p.n;
        float x[VEC], y[VEC];
        load_operand<Format>(p.a, c, first, whole, p.n, x);
        if (p.binary) {
            load_operand<Format>(p.b, c, first, whole, p.n, y);
            binary_all<VEC>(p.op, x, y);
        } else {
            unary_all<VEC>(p.op, x);
        }
        uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
        for (int j = 0; j < VEC; j++) put_field<Format::BITS>(w, j, Format::encode(x[j]));
        if (whole) {
            store_words<16>((uint4 *)p.dst + c, w);
        } else {
#pragma unroll
            for (int j = 0; j < VEC; j++)
                if (first + j < p.n) store_element<Format::BITS>(p.dst, first + j, field<Format::BITS>(w, j));
        }
    }
}

/* Launches operator_kernel when the operands qualify (b NULL: unary, or with the scalar s);
 * *taken says whether it did. */
static int try_operator_kernel(int dev, int op, const dsrt_view *dst, const dsrt_view *a, const dsrt_view *b,
                               int binary, float s, int scalar_first, int64_t n, void *stream, int *taken)
{
    *taken = 0;
    int dt = dst->dtype;
    if ((dt != DSRT_F32 && dt != DSRT_BF16 && dt != DSRT_F16) || (binary && dsrt_op_is_compare(op))) return DSRTK_OK;
    dsrt_view views[3] = {*dst, *a, b ? *b : *a};
    dsrt_view *walk[3] = {&views[0], &views[1], &views[2]};
    dsrtk_coalesce(walk, b ? 3 : 2);
    const dsrt_view *d = &views[0];
    if (!contiguous_walk(d)) return DSRTK_OK;
    OperatorArgs p = {};
    if (!operand_from(&views[1], d, &p.a) || (b && !operand_from(&views[2], d, &p.b))) return DSRTK_OK;
    if (binary && !b) { /* the scalar is the other input */
        Operand scalar = {NULL, OPERAND_SCALAR, 0, 0, s};
        if (scalar_first) p.b = p.a, p.a = scalar;
        else p.b = scalar;
    }
    *taken = 1;
    p.dst = (void *)element_address(d);
    p.n = n;
    p.binary = binary;
    p.op = op;
    int vec = dt == DSRT_F32 ? 4 : 8;
    p.aligned = (uintptr_t)p.dst % 16 == 0;
    for (const Operand *o : {&p.a, &p.b})
        if (o->mode != OPERAND_SCALAR && (binary || o == &p.a))
            p.aligned &= (uintptr_t)o->data % 16 == 0 && o->period % vec == 0;
    int grid = dsrtk_grid_for(dev, (n + vec - 1) / vec, DSRTK_BLOCK);
    cudaStream_t st = (cudaStream_t)stream;
    switch (dt) {
    case DSRT_F32: operator_kernel<F32Format><<<grid, DSRTK_BLOCK, 0, st>>>(p); break;
    case DSRT_BF16: operator_kernel<BF16Format><<<grid, DSRTK_BLOCK, 0, st>>>(p); break;
    default: operator_kernel<F16Format><<<grid, DSRTK_BLOCK, 0, st>>>(p); break;
    }
    return dsrtk_check_launch("operator_kernel", dev);
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
        e.x = dsrtk_load_raw(a, at[1]);
        e.y = dsrtk_load_raw(b, at[2]);
    }
    __device__ void store(const Loaded &e) const
    {
        if (compute_float)
            dsrt_store_f32(dst.data, dst.dtype, e.at, dsrt_binary_f32(op, dsrtk_raw_f32(e.x, a.dtype), dsrtk_raw_f32(e.y, b.dtype)));
        else
            dsrt_store_i64(dst.data, dst.dtype, e.at, dsrt_binary_i64(op, dsrtk_raw_i64(e.x, a.dtype), dsrtk_raw_i64(e.y, b.dtype)));
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
        st = try_operator_kernel(dev, op, dst, a, b, 1, 0.0f, 0, n, stream, &fast);
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
        e.x = dsrtk_load_raw(a, at[1]);
    }
    __device__ void store(const Loaded &e) const
    {
        if (compute_float) {
            float x = dsrtk_raw_f32(e.x, a.dtype);
            float r = scalar_first ? dsrt_binary_f32(op, s_float, x) : dsrt_binary_f32(op, x, s_float);
            dsrt_store_f32(dst.data, dst.dtype, e.at, r);
        } else {
            int64_t x = dsrtk_raw_i64(e.x, a.dtype);
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
        st = try_operator_kernel(dev, op, dst, a, NULL, 1, (float)s, scalar_first, n, stream, &fast);
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
        e.x = dsrtk_load_raw(a, at[1]);
    }
    __device__ void store(const Loaded &e) const
    {
        if (compute_int) dsrt_store_i64(dst.data, dst.dtype, e.at, dsrt_unary_i64(op, dsrtk_raw_i64(e.x, a.dtype)));
        else dsrt_store_f32(dst.data, dst.dtype, e.at, dsrt_unary_f32(op, dsrtk_raw_f32(e.x, a.dtype)));
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
    st = try_operator_kernel(dev, op, dst, a, NULL, 0, 0.0f, 0, n, stream, &fast);
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

/* Lane `lane` of a group of `width` reduces positions lane, lane+width, ... of the row at `base`,
 * UNROLL loads in flight per step. */
template <class Load, int UNROLL = 4>
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
        /* UNROLL running sums, flushed into the total every 64 steps: short f32 chains */
        Value sum[UNROLL], total = 0;
#pragma unroll
        for (int j = 0; j < UNROLL; j++) sum[j] = 0;
        for (int steps = 1; k + (UNROLL - 1) * width < p.length; k += UNROLL * width, steps++) {
            Value x[UNROLL];
#pragma unroll
            for (int j = 0; j < UNROLL; j++) x[j] = load(data, dt, base + (k + j * width) * p.step);
#pragma unroll
            for (int j = 0; j < UNROLL; j++) sum[j] = add(sum[j], x[j]);
            if (steps % 64 == 0) {
#pragma unroll
                for (int j = 0; j < UNROLL; j++) {
                    total = add(total, sum[j]);
                    sum[j] = 0;
                }
            }
        }
        for (; k < p.length; k += width) sum[0] = add(sum[0], load(data, dt, base + k * p.step));
        /* pairwise: (s0 + s1) + (s2 + s3), ... */
#pragma unroll
        for (int h = 1; h < UNROLL; h *= 2)
#pragma unroll
            for (int j = 0; j + h < UNROLL; j += 2 * h) sum[j] = add(sum[j], sum[j + h]);
        value_of(acc, Value()) = add(total, sum[0]);
        return acc;
    }
    /* extrema: positions only grow within a lane, so replaces() keeps the first */
    bool want_max = wants_max(p.op);
    for (; k + (UNROLL - 1) * width < p.length; k += UNROLL * width) {
        Value x[UNROLL];
#pragma unroll
        for (int j = 0; j < UNROLL; j++) x[j] = load(data, dt, base + (k + j * width) * p.step);
#pragma unroll
        for (int j = 0; j < UNROLL; j++)
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

/* Outputs whose rows start at consecutive elements: a reduction over a dimension other than the
 * last, which the core sends as a permuted view, so the reduced axis has a large stride. One row
 * per warp would read a word per memory segment; here a warp takes 32 neighbouring outputs, a
 * thread each, so each load of the warp is one contiguous segment. The block's warps, and the
 * blocks of a cluster, split the reduced axis; their partials merge in shared memory, then
 * through distributed shared memory into block 0, which stores. */
template <class Load>
__global__ void __launch_bounds__(1024, 1) reduce_columns_kernel(const __grid_constant__ ReduceArgs p)
{
    typedef typename Load::Value Value;
    /* 8 loads in flight per thread; 4 of int64, which would not fit the registers */
    constexpr int unroll = sizeof(Value) == 4 ? 8 : 4;
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    __shared__ Partial partials[32][32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    int rank = (int)cluster.block_rank(), blocks = (int)cluster.num_blocks();
    int64_t slices = (int64_t)blocks * warps, tiles = (p.outer + 31) / 32;
    for (int64_t tile = blockIdx.x / blocks; tile < tiles; tile += gridDim.x / blocks) {
        int64_t row = tile * 32 + lane;
        Partial r = row < p.outer ? reduce_lane<Load, unroll>(p, row_start(p, row), (int64_t)rank * warps + warp, slices)
                                  : neutral(p.op);
        partials[warp][lane] = r;
        __syncthreads();
        if (warp == 0) {
            for (int w = 1; w < warps; w++) merge<Value>(p.op, r, partials[w][lane]);
            partials[0][lane] = r;
        }
        cluster.sync(); /* every block's result is written */
        if (rank == 0 && warp == 0) {
            for (int b = 1; b < blocks; b++) merge<Value>(p.op, r, *cluster.map_shared_rank(&partials[0][lane], b));
            if (row < p.outer) store_result(p, row, r, Value());
        }
        cluster.sync(); /* and read, before the next tile overwrites it */
    }
}

/* The widest cluster, from `widest` down to `narrowest` blocks, of which the device places at
 * least `enough` at once; 0 when none. */
static int fitting_cluster(int dev, void (*kernel)(ReduceArgs), int block, int widest, int narrowest, int64_t enough)
{
    for (int cluster = widest; cluster >= narrowest; cluster /= 2) {
        int fits = dsrtk_clusters_fit(dev, (const void *)kernel, cluster, block, 0);
        if (fits > 0 && fits >= enough) return cluster;
    }
    return 0;
}

/* Launches `kernel` over `units` units of work (rows, tiles of columns), one per cluster of
 * `cluster` blocks of `block` threads at a time. Always as a cluster launch, even of one block:
 * the kernels synchronise and address their blocks through the cluster. */
static int launch_clustered(int dev, void (*kernel)(ReduceArgs), const char *name, const ReduceArgs &p, int64_t units,
                            int block, int cluster, cudaStream_t stream)
{
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = cluster;
    attribute.val.clusterDim.y = attribute.val.clusterDim.z = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3((unsigned)(units * cluster));
    config.blockDim = dim3(block);
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = 1;
    int st = dsrtk_check(cudaLaunchKernelEx(&config, kernel, p), "launch of %s (%d-block clusters) on cuda:%d", name,
                         cluster, dev);
    return st ? st : dsrtk_check_launch(name, dev);
}

/* Rows that start at consecutive elements, long enough for reduce_columns_kernel; rows of up to
 * 16 already take a thread each, which reads them the same coalesced way. */
static int columns_contiguous(const ReduceArgs &p)
{
    const dsrt_view &r = p.rows;
    return p.length > 16 && p.step != 1 && r.stride[r.ndim - 1] == 1 && r.shape[r.ndim - 1] >= 32;
}

/* reduce_columns_kernel's shape: blocks of up to 32 warps, as wide as lets every tile of 32
 * outputs run at once (a multiprocessor holds 32 warps of it), at least 8 warps while tiles are
 * many; each thread given at least 128 elements; and clusters of blocks per tile while
 * multiprocessors would be left idle. */
template <class Load>
static int launch_columns(int dev, const ReduceArgs &p, int sms, cudaStream_t stream)
{
    int64_t tiles = (p.outer + 31) / 32;
    int warps = 32, widest = 1, cluster = 0;
    while (warps > 8 && tiles * warps > (int64_t)sms * 32) warps /= 2;
    while (warps > 1 && (int64_t)warps * 32 * 4 > p.length) warps /= 2;
    while (widest < 8 && tiles * widest * 2 <= sms && (int64_t)widest * 2 * warps * 32 * 4 <= p.length) widest *= 2;
    if (widest > 1) cluster = fitting_cluster(dev, reduce_columns_kernel<Load>, 32 * warps, widest, 2, tiles);
    if (cluster == 0) cluster = 1;
    int64_t most = (int64_t)sms * DSRTK_MIN_BLOCKS * 4; /* tiles beyond these are walked in a loop */
    return launch_clustered(dev, reduce_columns_kernel<Load>, "reduce_columns_kernel", p, tiles < most ? tiles : most,
                            32 * warps, cluster, stream);
}

template <class Load>
static int launch_reduce(int dev, const ReduceArgs &p, cudaStream_t stream)
{
    int sms = dsrtk_multiprocessors(dev);
    if (columns_contiguous(p)) return launch_columns<Load>(dev, p, sms, stream);
    if (p.length <= 16) {
        reduce_thread_kernel<Load><<<dsrtk_grid_for(dev, p.outer, DSRTK_BLOCK), DSRTK_BLOCK, 0, stream>>>(p);
        return dsrtk_check_launch("reduce_thread_kernel", dev);
    }
    if (p.length <= 4096) {
        reduce_warp_kernel<Load><<<dsrtk_grid_for(dev, p.outer * 32, DSRTK_BLOCK), DSRTK_BLOCK, 0, stream>>>(p);
        return dsrtk_check_launch("reduce_warp_kernel", dev);
    }
    /* fewer long rows than half the multiprocessors: a cluster per row, as wide as covers the GPU */
    if (p.outer * 2 <= sms) {
        int widest = 2;
        while (widest < 16 && p.outer * widest * 2 <= sms) widest *= 2;
        int cluster = fitting_cluster(dev, reduce_cluster_kernel<Load>, 1024, widest, 2, 1);
        if (cluster) return launch_clustered(dev, reduce_cluster_kernel<Load>, "reduce_cluster_kernel", p, p.outer, 1024, cluster, stream);
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
