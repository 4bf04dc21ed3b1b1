/*
 * gemm.c - matmul: shape rules, batching, and the CPU GEMM.
 *
 * The CPU GEMM is the reference for cuBLAS and the workhorse of the CPU model, so it is a blocked
 * f32 kernel: 64x256 tiles of C spread over OpenMP threads, k walked in 256-wide panels so a panel
 * of B stays in L2, and the innermost loop over contiguous n so the compiler vectorises it. bf16
 * operands are widened to f32 first and the result rounded once, as cuBLAS does with fp32
 * accumulation.
 */
#include <stdlib.h>
#include <string.h>
#include "err.h"
#include "kernels.h"
#include "ops.h"

enum { TILE_M = 64, TILE_N = 256, TILE_K = 256 };

void dsrt_gemm_f32(int64_t m, int64_t n, int64_t k, const float *a, int64_t lda, const float *b, int64_t ldb,
                   float *c, int64_t ldc)
{
    int64_t tiles_m = (m + TILE_M - 1) / TILE_M, tiles_n = (n + TILE_N - 1) / TILE_N;
#pragma omp parallel for schedule(dynamic) if (m * n * k > 32768)
    for (int64_t t = 0; t < tiles_m * tiles_n; t++) {
        int64_t i0 = t / tiles_n * TILE_M, j0 = t % tiles_n * TILE_N;
        int64_t i1 = i0 + TILE_M < m ? i0 + TILE_M : m, j1 = j0 + TILE_N < n ? j0 + TILE_N : n;
        for (int64_t i = i0; i < i1; i++) memset(c + i * ldc + j0, 0, (size_t)(j1 - j0) * sizeof *c);
        for (int64_t p0 = 0; p0 < k; p0 += TILE_K) {
            int64_t p1 = p0 + TILE_K < k ? p0 + TILE_K : k;
            for (int64_t i = i0; i < i1; i++) {
                float *ci = c + i * ldc;
                for (int64_t p = p0; p < p1; p++) {
                    float aip = a[i * lda + p];
                    const float *bp = b + p * ldb;
                    for (int64_t j = j0; j < j1; j++) ci[j] += aip * bp[j];
                }
            }
        }
    }
}

/* a contiguous f32 copy of t (t itself when it already is one) */
static dsrt_tensor *as_f32(dsrt_tensor *t, dsrt_stream *s)
{
    if (t->dtype == DSRT_F32) return dsrt_tensor_contiguous(t, s);
    return dsrt_tensor_to(t, t->device, DSRT_F32, s, 0);
}

static int cpu_matmul(dsrt_tensor *out, dsrt_tensor *a, dsrt_tensor *b, int64_t batch, int64_t m, int64_t n,
                      int64_t k, int64_t sa, int64_t sb, dsrt_stream *s)
{
    dsrt_tensor *fa = as_f32(a, s), *fb = fa ? as_f32(b, s) : NULL;
    dsrt_tensor *fc = fb ? (out->dtype == DSRT_F32 ? (dsrt_tensor_retain(out), out) : dsrt_tensor_like(out, DSRT_F32, s)) : NULL;
    int rc = fc ? 0 : -1;
    if (!rc) {
        const float *pa = (const float *)fa->storage->data + fa->offset, *pb = (const float *)fb->storage->data + fb->offset;
        float *pc = (float *)fc->storage->data;
        for (int64_t i = 0; i < batch; i++) dsrt_gemm_f32(m, n, k, pa + i * sa, k, pb + i * sb, n, pc + i * m * n, n);
        if (fc != out) rc = dsrt_op_copy(out, fc, s);
    }
    dsrt_tensor_release(fa);
    dsrt_tensor_release(fb);
    dsrt_tensor_release(fc);
    return rc;
}

dsrt_tensor *dsrt_op_matmul(dsrt_tensor *a, dsrt_tensor *b, dsrt_stream *s)
{
    char sa_buf[96], sb_buf[96];
#define SHAPES dsrt_tensor_str(a, sa_buf, sizeof sa_buf), dsrt_tensor_str(b, sb_buf, sizeof sb_buf)
    if (a->device != b->device || a->device != s->device)
        return dsrt_err_null("matmul: %s and %s must be on the stream's device", SHAPES);
    if (a->dtype != b->dtype || (a->dtype != DSRT_F32 && a->dtype != DSRT_BF16))
        return dsrt_err_null("matmul: %s @ %s: both operands must be f32 or both bf16", SHAPES);
    if (a->ndim == 0 || b->ndim == 0) return dsrt_err_null("matmul: %s @ %s: operands need at least 1 dimension", SHAPES);
    /* 1-d operands become a row (a) or a column (b), removed from the result again */
    int64_t k = a->shape[a->ndim - 1], m = a->ndim > 1 ? a->shape[a->ndim - 2] : 1;
    int64_t n = b->ndim > 1 ? b->shape[b->ndim - 1] : 1, kb = b->ndim > 1 ? b->shape[b->ndim - 2] : b->shape[0];
    if (k != kb) return dsrt_err_null("matmul: %s @ %s: inner dimensions differ (%lld vs %lld)", SHAPES, (long long)k, (long long)kb);
    int abatch = a->ndim > 2 ? a->ndim - 2 : 0, bbatch = b->ndim > 2 ? b->ndim - 2 : 0;
    int nbatch = abatch > bbatch ? abatch : bbatch;
    int64_t bshape[DSRT_MAX_DIMS], batch = 1;
    for (int d = 0; d < nbatch; d++) {
        int da = d - (nbatch - abatch), db = d - (nbatch - bbatch);
        int64_t x = da >= 0 ? a->shape[da] : 1, y = db >= 0 ? b->shape[db] : 1;
        if (x != y && x != 1 && y != 1)
            return dsrt_err_null("matmul: %s @ %s: batch dimensions do not broadcast", SHAPES);
        bshape[d] = x == 1 ? y : x;
        batch *= bshape[d];
    }
#undef SHAPES
    /* expand each operand to [batch..., rows, cols] contiguous; a 2-d operand is shared (stride 0) */
    int64_t ashape[DSRT_MAX_DIMS], bfull[DSRT_MAX_DIMS], oshape[DSRT_MAX_DIMS];
    memcpy(ashape, bshape, sizeof bshape);
    memcpy(bfull, bshape, sizeof bshape);
    ashape[nbatch] = m, ashape[nbatch + 1] = k;
    bfull[nbatch] = k, bfull[nbatch + 1] = n;
    int64_t a2[2] = {m, k}, b2[2] = {k, n};
    dsrt_tensor *av = dsrt_tensor_reshape(a, 2 + (abatch ? abatch : 0), abatch ? a->shape : a2, s);
    if (av && abatch) {
        dsrt_tensor *e = dsrt_tensor_expand(av, nbatch + 2, ashape);
        dsrt_tensor_release(av);
        av = e;
    }
    dsrt_tensor *bv = av ? dsrt_tensor_reshape(b, 2 + (bbatch ? bbatch : 0), bbatch ? b->shape : b2, s) : NULL;
    if (bv && bbatch) {
        dsrt_tensor *e = dsrt_tensor_expand(bv, nbatch + 2, bfull);
        dsrt_tensor_release(bv);
        bv = e;
    }
    dsrt_tensor *ac = bv ? dsrt_tensor_contiguous(av, s) : NULL, *bc = ac ? dsrt_tensor_contiguous(bv, s) : NULL;
    int ond = 0;
    for (int d = 0; d < nbatch; d++) oshape[ond++] = bshape[d];
    if (a->ndim > 1) oshape[ond++] = m;
    if (b->ndim > 1) oshape[ond++] = n;
    dsrt_tensor *out = bc ? dsrt_tensor_new(a->dtype, ond, oshape, s->device, s) : NULL;
    int rc = out ? 0 : -1;
    int64_t stride_a = abatch ? m * k : 0, stride_b = bbatch ? k * n : 0;
    if (!rc && dsrt_tensor_numel(out)) {
        dsrt_tensor *ts[3] = {ac, bc, out};
        for (int i = 0; i < 3 && !rc; i++) rc = dsrt_storage_use(ts[i]->storage, s);
        if (!rc && s->device == DSRT_CPU) {
            rc = cpu_matmul(out, ac, bc, batch, m, n, k, stride_a, stride_b, s);
        } else if (!rc) {
            size_t esz = (size_t)dsrt_dtype_bits(a->dtype) / 8;
            const char *pa = (const char *)ac->storage->data + (size_t)ac->offset * esz;
            const char *pb = (const char *)bc->storage->data + (size_t)bc->offset * esz;
            if (dsrtk_matmul(s->device, a->dtype, batch, m, n, k, pa, stride_a, pb, stride_b, out->storage->data, m * n,
                             s->handle))
                rc = dsrt_err("matmul: %s", dsrtk_error());
        }
    }
    dsrt_tensor_release(av);
    dsrt_tensor_release(bv);
    dsrt_tensor_release(ac);
    dsrt_tensor_release(bc);
    if (rc) {
        dsrt_tensor_release(out);
        return NULL;
    }
    return out;
}
