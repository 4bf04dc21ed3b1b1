/*
 * err.c - the thread-local failure message (see err.h).
 */
#include "err.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char message[1024];

static void set_message(const char *fmt, va_list ap)
{
    vsnprintf(message, sizeof message, fmt, ap);
}

int dsrt_err(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    set_message(fmt, ap);
    va_end(ap);
    return -1;
}

void *dsrt_err_null(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    set_message(fmt, ap);
    va_end(ap);
    return NULL;
}

const char *dsrt_err_msg(void) { return message[0] ? message : "unknown error"; }

const char *dsrt_shape_str(int ndim, const int64_t *shape, char *buf, int len)
{
    int n = snprintf(buf, (size_t)len, "[");
    for (int d = 0; d < ndim && n < len; d++)
        n += snprintf(buf + n, (size_t)(len - n), d ? ", %lld" : "%lld", (long long)shape[d]);
    if (n < len) snprintf(buf + n, (size_t)(len - n), "]");
    return buf;
}
