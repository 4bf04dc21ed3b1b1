/*
 * dtype.c - dtype names as the Lua API spells them, and the promotion rule of the generic ops.
 */
#include "dtype.h"

#include <string.h>
#include "err.h"

static const struct { const char *name; int bits; } dtypes[DSRT_NDTYPES] = {
    [DSRT_F32] = {"f32", 32},        [DSRT_BF16] = {"bf16", 16},      [DSRT_F16] = {"f16", 16},
    [DSRT_F8E4M3] = {"f8e4m3", 8},   [DSRT_F8E8M0] = {"f8e8m0", 8},   [DSRT_FP4E2M1] = {"fp4e2m1", 4},
    [DSRT_I8] = {"i8", 8},           [DSRT_U8] = {"u8", 8},           [DSRT_I32] = {"i32", 32},
    [DSRT_I64] = {"i64", 64},        [DSRT_BOOL] = {"bool", 8},
};

/* spellings people bring from torch and safetensors */
static const struct { const char *alias; dsrt_dtype dt; } aliases[] = {
    {"float32", DSRT_F32}, {"float", DSRT_F32}, {"bfloat16", DSRT_BF16}, {"float16", DSRT_F16},
    {"half", DSRT_F16}, {"float8_e4m3fn", DSRT_F8E4M3}, {"f8_e4m3", DSRT_F8E4M3},
    {"float8_e8m0fnu", DSRT_F8E8M0}, {"f8_e8m0", DSRT_F8E8M0}, {"fp4", DSRT_FP4E2M1},
    {"int8", DSRT_I8}, {"uint8", DSRT_U8}, {"int32", DSRT_I32}, {"int64", DSRT_I64}, {"long", DSRT_I64},
};

const char *dsrt_dtype_name(dsrt_dtype dt)
{
    return (unsigned)dt < DSRT_NDTYPES ? dtypes[dt].name : "?";
}

int dsrt_dtype_from_name(const char *name, dsrt_dtype *out)
{
    for (int i = 0; i < DSRT_NDTYPES; i++)
        if (strcmp(name, dtypes[i].name) == 0) return *out = (dsrt_dtype)i, 0;
    for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++)
        if (strcmp(name, aliases[i].alias) == 0) return *out = aliases[i].dt, 0;
    return dsrt_err("unknown dtype '%s' (expected f32, bf16, f16, f8e4m3, f8e8m0, fp4e2m1, i8, u8, "
                    "i32, i64 or bool)", name);
}

int dsrt_dtype_bits(dsrt_dtype dt) { return dtypes[dt].bits; }

size_t dsrt_dtype_nbytes(dsrt_dtype dt, int64_t numel)
{
    return ((size_t)numel * (size_t)dtypes[dt].bits + 7) / 8;
}

dsrt_dtype dsrt_dtype_promote(dsrt_dtype a, dsrt_dtype b)
{
    int af = dsrt_dtype_is_float(a), bf = dsrt_dtype_is_float(b);
    if (a == b) return a <= DSRT_F16 || !af ? a : DSRT_F32;
    if (af && bf) return DSRT_F32;
    if (af) return a <= DSRT_F16 ? a : DSRT_F32;
    if (bf) return b <= DSRT_F16 ? b : DSRT_F32;
    return DSRT_I64;
}
