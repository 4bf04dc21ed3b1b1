/*
 * opmath.h - the per-element arithmetic of dsrt's generic ops, one definition for CPU and GPU.
 *
 * Float operators run in f32 and integer operators in int64 on both devices, so an op gives the
 * same bits everywhere except through the transcendental functions (exp, log, tanh, ...), whose
 * libm and CUDA versions differ by an ulp or two. Integer division and modulo floor like Lua's
 * `//` and `%`; division by zero gives 0 for integers instead of trapping.
 */
#ifndef DSRT_OPMATH_H
#define DSRT_OPMATH_H

#include "numeric.h"
#ifndef __CUDACC__
#include <math.h>
#endif

enum { DSRT_OP_ADD, DSRT_OP_SUB, DSRT_OP_MUL, DSRT_OP_DIV, DSRT_OP_IDIV, DSRT_OP_MOD, DSRT_OP_POW,
       DSRT_OP_MAXIMUM, DSRT_OP_MINIMUM,
       DSRT_OP_EQ, DSRT_OP_NE, DSRT_OP_LT, DSRT_OP_LE, DSRT_OP_GT, DSRT_OP_GE,
       DSRT_NBINARY };
enum { DSRT_OP_NEG, DSRT_OP_ABS, DSRT_OP_EXP, DSRT_OP_LOG, DSRT_OP_SQRT, DSRT_OP_RSQRT,
       DSRT_OP_SIN, DSRT_OP_COS, DSRT_OP_TANH, DSRT_OP_SIGMOID, DSRT_OP_SILU, DSRT_OP_RELU,
       DSRT_NUNARY };
enum { DSRT_RED_SUM, DSRT_RED_MEAN, DSRT_RED_MAX, DSRT_RED_MIN, DSRT_RED_ARGMAX, DSRT_RED_ARGMIN,
       DSRT_NREDUCE };

DSRT_HD int dsrt_op_is_compare(int op) { return op >= DSRT_OP_EQ; }

/* comparisons return 1.0f / 0.0f */
DSRT_HD float dsrt_binary_f32(int op, float x, float y)
{
    switch (op) {
    case DSRT_OP_ADD: return x + y;
    case DSRT_OP_SUB: return x - y;
    case DSRT_OP_MUL: return x * y;
    case DSRT_OP_DIV: return x / y;
    case DSRT_OP_IDIV: return floorf(x / y);
    case DSRT_OP_MOD: { float m = fmodf(x, y); return (m != 0.0f && ((m < 0.0f) != (y < 0.0f))) ? m + y : m; }
    case DSRT_OP_POW: return powf(x, y);
    case DSRT_OP_MAXIMUM: return (x != x || x > y) ? x : y;  /* NaN propagates, as torch */
    case DSRT_OP_MINIMUM: return (x != x || x < y) ? x : y;
    case DSRT_OP_EQ: return x == y;
    case DSRT_OP_NE: return x != y;
    case DSRT_OP_LT: return x < y;
    case DSRT_OP_LE: return x <= y;
    case DSRT_OP_GT: return x > y;
    default: return x >= y;
    }
}

DSRT_HD int64_t dsrt_binary_i64(int op, int64_t x, int64_t y)
{
    switch (op) {
    case DSRT_OP_ADD: return (int64_t)((uint64_t)x + (uint64_t)y);
    case DSRT_OP_SUB: return (int64_t)((uint64_t)x - (uint64_t)y);
    case DSRT_OP_MUL: return (int64_t)((uint64_t)x * (uint64_t)y);
    case DSRT_OP_IDIV: {
        if (y == 0 || (y == -1 && x == INT64_MIN)) return 0;
        int64_t q = x / y;
        return (q * y != x && ((x < 0) != (y < 0))) ? q - 1 : q;
    }
    case DSRT_OP_MOD: {
        if (y == 0 || y == -1) return 0;
        int64_t m = x % y;
        return (m != 0 && ((m < 0) != (y < 0))) ? m + y : m;
    }
    case DSRT_OP_MAXIMUM: return x > y ? x : y;
    case DSRT_OP_MINIMUM: return x < y ? x : y;
    case DSRT_OP_EQ: return x == y;
    case DSRT_OP_NE: return x != y;
    case DSRT_OP_LT: return x < y;
    case DSRT_OP_LE: return x <= y;
    case DSRT_OP_GT: return x > y;
    case DSRT_OP_GE: return x >= y;
    default: return 0; /* DIV and POW always run in float: the core never sends them here */
    }
}

DSRT_HD float dsrt_unary_f32(int op, float x)
{
    switch (op) {
    case DSRT_OP_NEG: return -x;
    case DSRT_OP_ABS: return fabsf(x);
    case DSRT_OP_EXP: return expf(x);
    case DSRT_OP_LOG: return logf(x);
    case DSRT_OP_SQRT: return sqrtf(x);
    case DSRT_OP_RSQRT: return 1.0f / sqrtf(x);
    case DSRT_OP_SIN: return sinf(x);
    case DSRT_OP_COS: return cosf(x);
    case DSRT_OP_TANH: return tanhf(x);
    case DSRT_OP_SIGMOID: return 1.0f / (1.0f + expf(-x));
    case DSRT_OP_SILU: return x / (1.0f + expf(-x));
    default: return x > 0.0f ? x : (x != x ? x : 0.0f); /* RELU keeps NaN */
    }
}

/* integer unary ops: NEG, ABS, RELU; the core sends the rest through f32 */
DSRT_HD int64_t dsrt_unary_i64(int op, int64_t x)
{
    switch (op) {
    case DSRT_OP_NEG: return (int64_t)(0 - (uint64_t)x);
    case DSRT_OP_ABS: return x < 0 ? (int64_t)(0 - (uint64_t)x) : x;
    default: return x > 0 ? x : 0;
    }
}

#endif
