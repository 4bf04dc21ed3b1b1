/*
 * dtype.h - names and sizes of dsrt's dtypes (the values themselves live in numeric.h).
 */
#ifndef DSRT_DTYPE_H
#define DSRT_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include "numeric.h"

const char *dsrt_dtype_name(dsrt_dtype dt);
int dsrt_dtype_from_name(const char *name, dsrt_dtype *out); /* 0, or -1 with a message */
int dsrt_dtype_bits(dsrt_dtype dt);                           /* 4 for fp4e2m1 */
size_t dsrt_dtype_nbytes(dsrt_dtype dt, int64_t numel);        /* rounds fp4 up to whole bytes */

/* The dtype two operands compute and store in: equal dtypes keep theirs, an integer operand takes
 * the other's float dtype, float mixes and the storage-only formats (f8, e8m0, fp4) give f32, and
 * integer mixes give int64. */
dsrt_dtype dsrt_dtype_promote(dsrt_dtype a, dsrt_dtype b);

#endif
