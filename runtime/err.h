/*
 * err.h - how the core reports failure without ever aborting.
 *
 * Core functions return -1 (or NULL) after leaving one message in a thread-local buffer; the Lua
 * bindings raise that message with luaL_error. The core never longjmps, so C frames between the
 * failure and the binding always get to release what they hold, and embedders that do not use Lua
 * get the same messages.
 */
#ifndef DSRT_ERR_H
#define DSRT_ERR_H

#include <stdint.h>

#if defined(__GNUC__)
#define DSRT_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define DSRT_PRINTF(f, a)
#endif

int dsrt_err(const char *fmt, ...) DSRT_PRINTF(1, 2); /* sets the message, returns -1 */
void *dsrt_err_null(const char *fmt, ...) DSRT_PRINTF(1, 2); /* same, returns NULL */
const char *dsrt_err_msg(void);

/* "[2, 3, 4]" into buf; for messages */
const char *dsrt_shape_str(int ndim, const int64_t *shape, char *buf, int len);
#define DSRT_SHAPE_BUF 96

#endif
