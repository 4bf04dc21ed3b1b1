/*
 * transpose.cu - copies between two views that are contiguous along different dimensions (a
 * transposed view made contiguous, a contiguous tensor written into a transposed window), through
 * shared-memory tiles.
 *
 * What this file protects: the bandwidth of such copies, without giving up the generic copy's
 * bits. A walk in the destination's order reads the source one element per memory segment: each
 * warp-wide load touches 32 segments for 32 elements. Here a block reads a 32x32 tile with the
 * source's contiguous dimension across the warp and writes it with the destination's contiguous
 * dimension across the warp, so both sides move whole segments. Elements go through the same raw
 * loads and converting stores as elementwise.cu's copy (common.cuh), so any dtype pair, fp4
 * included, gives the bits the CPU gives.
 */
#include <atomic>
#include <type_traits>
#include "common.cuh"

/* A tile is TILE x TILE elements; a block of TILE x TILE_ROWS threads moves TILE / TILE_ROWS
 * elements per thread each way, all its loads issued before the first is needed. */
enum { TILE = 32, TILE_ROWS = 4, TILE_THREADS = TILE * TILE_ROWS };

struct TileArgs {
    dsrt_view dst, src; /* coalesced, of one shape */
    int mode;           /* DSRTK_COPY_* */
    int dim_a, dim_b;   /* the source's contiguous dimension, the destination's */
    int64_t tiles_a, tiles_b, tiles;
};

/* dsrtk_load_raw for a source of BITS bits (4: fp4) known at compile time: without a dtype switch
 * between them, a thread's loads issue back to back. */
template <int BITS>
__device__ __forceinline__ uint64_t load_raw_bits(const void *data, int64_t i)
{
    if constexpr (BITS == 64) return ((const uint64_t *)data)[i];
    else if constexpr (BITS == 32) return ((const uint32_t *)data)[i];
    else if constexpr (BITS == 16) return ((const uint16_t *)data)[i];
    else if constexpr (BITS == 8) return ((const uint8_t *)data)[i];
    else return ((const uint8_t *)data)[i >> 1] | (uint64_t)(i & 1) << 8;
}

template <int BITS>
__global__ void __launch_bounds__(TILE_THREADS) tile_copy_kernel(const __grid_constant__ TileArgs p)
{
    typedef typename std::conditional<BITS == 64, uint64_t, uint32_t>::type Word;
    constexpr int PER_THREAD = TILE / TILE_ROWS;
    __shared__ Word tile[TILE][TILE + 1]; /* +1: a column of the tile spans all 32 banks */
    const dsrt_view &dst = p.dst, &src = p.src;
    const int64_t len_a = src.shape[p.dim_a], len_b = src.shape[p.dim_b];
    const int64_t src_step_b = src.stride[p.dim_b], dst_step_a = dst.stride[p.dim_a];
    const int x = threadIdx.x % TILE, y = threadIdx.x / TILE;
    for (int64_t t = blockIdx.x; t < p.tiles; t += gridDim.x) {
        /* tile t: b fastest, then a, then the remaining dimensions, innermost first */
        int64_t rest = t / p.tiles_b;
        const int64_t b0 = (t - rest * p.tiles_b) * TILE;
        const int64_t a0 = (rest % p.tiles_a) * TILE;
        rest /= p.tiles_a;
        int64_t src_at = src.offset, dst_at = dst.offset;
        for (int d = src.ndim - 1; d >= 0; d--) {
            if (d == p.dim_a || d == p.dim_b) continue;
            int64_t q = rest / src.shape[d], i = rest - q * src.shape[d];
            src_at += i * src.stride[d];
            dst_at += i * dst.stride[d];
            rest = q;
        }
        /* read: consecutive threads take consecutive a, along the source's unit stride; every
         * load is issued before the first store to the tile waits for one */
        Word v[PER_THREAD];
        const int64_t a = a0 + x;
#pragma unroll
        for (int r = 0; r < PER_THREAD; r++) {
            int64_t b = b0 + y + r * TILE_ROWS;
            v[r] = a < len_a && b < len_b ? (Word)load_raw_bits<BITS>(src.data, src_at + a + b * src_step_b) : 0;
        }
#pragma unroll
        for (int r = 0; r < PER_THREAD; r++) tile[y + r * TILE_ROWS][x] = v[r];
        __syncthreads();
        /* write: consecutive threads take consecutive b, along the destination's unit stride */
        const int64_t b = b0 + x;
#pragma unroll
        for (int r = 0; r < PER_THREAD; r++) {
            int64_t a_out = a0 + y + r * TILE_ROWS;
            if (a_out < len_a && b < len_b)
                dsrtk_store_copied(dst, p.mode, src.dtype, dst_at + b + a_out * dst_step_a, tile[x][y + r * TILE_ROWS]);
        }
        __syncthreads(); /* the next tile overwrites this one */
    }
}

/* One wave of blocks, as many as the device runs at once (never more than there are tiles), each
 * walking an equal share of the tiles: measured on an H200 at 67% of the copy ceiling for an f32
 * transpose. The occupancy query is made once per kernel and device. */
template <int BITS>
static void launch_tiles(int dev, const TileArgs &p, void *stream)
{
    static std::atomic<int> per_multiprocessor[64];
    int fits = dev >= 0 && dev < 64 ? per_multiprocessor[dev].load(std::memory_order_relaxed) : 0;
    if (fits <= 0) {
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fits, tile_copy_kernel<BITS>, TILE_THREADS, 0) != cudaSuccess ||
            fits <= 0) {
            cudaGetLastError(); /* a failed query only costs balance */
            fits = 1;
        } else if (dev >= 0 && dev < 64) {
            per_multiprocessor[dev].store(fits, std::memory_order_relaxed);
        }
    }
    int64_t most = (int64_t)dsrtk_multiprocessors(dev) * fits;
    int grid = (int)(p.tiles < most ? p.tiles : most);
    tile_copy_kernel<BITS><<<grid, TILE_THREADS, 0, (cudaStream_t)stream>>>(p);
}

/* The innermost dimension of v with unit stride, or -1. */
static int unit_stride_dim(const dsrt_view *v, int skip)
{
    for (int d = v->ndim - 1; d >= 0; d--)
        if (d != skip && v->stride[d] == 1) return d;
    return -1;
}

int dsrtk_copy_tiled(int dev, const dsrt_view *dst, const dsrt_view *src, int mode, void *stream, int *taken)
{
    *taken = 0;
    if (dst->ndim < 2) return DSRTK_OK;
    TileArgs p;
    p.dim_b = unit_stride_dim(dst, -1);
    p.dim_a = unit_stride_dim(src, p.dim_b);
    /* src contiguous along dim_b too: a plain walk already coalesces on both sides */
    if (p.dim_b < 0 || p.dim_a < 0 || src->stride[p.dim_b] == 1) return DSRTK_OK;
    /* below 8 on either side most of a tile's threads would idle */
    if (src->shape[p.dim_a] < 8 || src->shape[p.dim_b] < 8) return DSRTK_OK;
    *taken = 1;
    p.dst = *dst;
    p.src = *src;
    p.mode = mode;
    p.tiles_a = (src->shape[p.dim_a] + TILE - 1) / TILE;
    p.tiles_b = (src->shape[p.dim_b] + TILE - 1) / TILE;
    p.tiles = p.tiles_a * p.tiles_b;
    for (int d = 0; d < src->ndim; d++)
        if (d != p.dim_a && d != p.dim_b) p.tiles *= src->shape[d];
    switch (src->dtype) {
    case DSRT_I64: launch_tiles<64>(dev, p, stream); break;
    case DSRT_F32: case DSRT_I32: launch_tiles<32>(dev, p, stream); break;
    case DSRT_BF16: case DSRT_F16: launch_tiles<16>(dev, p, stream); break;
    case DSRT_FP4E2M1: launch_tiles<4>(dev, p, stream); break;
    default: launch_tiles<8>(dev, p, stream); break;
    }
    return dsrtk_check_launch("tile_copy_kernel", dev);
}
