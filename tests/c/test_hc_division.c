/* test_hc_division.c - the division of hc.cu's Sinkhorn loop (div_rn_fast: div.rn.f32's fast path,
 * taken where its operands lie in [2^-60, 2^60)) against div.rn itself on the GPU, bit for bit.
 * What it protects: Sinkhorn's comb is the CPU's fp32 divisions in the CPU's order; the loop runs
 * 39 of them in a row and takes the fast path for speed, which is only right if it is div.rn on
 * that whole domain. The layer tests compare comb within a tolerance, which one ulp would pass. */
#include <stdint.h>
#include "check.h"
#include "kernels.h"

GPU_TEST(div_rn_fast_is_div_rn_on_its_range)
{
    /* 2^28 pairs a seed: every exponent pair ~10^4 times, the range's edges ~10^6 times */
    for (uint32_t seed = 1; seed <= 2; seed++) {
        int64_t mismatches = -1;
        CHECK(dsrtk_nn_div_rn_check(0, (int64_t)1 << 28, seed, &mismatches) == 0);
        CHECKF(mismatches == 0, "seed %u: %lld quotients differ from div.rn", seed, (long long)mismatches);
    }
}
