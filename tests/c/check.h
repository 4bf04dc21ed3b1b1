/*
 * check.h - the C unit tests' harness: no framework, one header.
 *
 *   TEST(name) { CHECK(x == 1); CHECKF(y < 2, "y = %d", y); }   -- a CPU test
 *   GPU_TEST(name) { ... }                                          -- runs only under --gpu
 *
 * CHECK records a failure (file:line and the expression) and carries on, so one run shows every
 * broken check of a test; a test fails when any of its checks did. Tests register themselves
 * from constructors, so every tests/c/test_*.c linked into the one binary is found without a
 * list to maintain. tests/c/test_main.c defines CHECK_MAIN before including this file, which
 * brings in the registry and main():
 *
 *   test_c          runs the CPU tests
 *   test_c --gpu    runs only the GPU tests; with no CUDA device each of them fails
 *   test_c NAME...  runs the tests whose name contains one of the NAMEs (with or without --gpu)
 *
 * The last line printed is exactly "N passed, M failed" (test functions, not checks), and the
 * exit status is 0 only when nothing failed.
 */
#ifndef DSRT_CHECK_H
#define DSRT_CHECK_H

#include <stdio.h>

void check_register(const char *name, void (*fn)(void), int gpu);
void check_fail(const char *file, int line, const char *expr, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Failures seen in the running test; a test may read it to stop early (e.g. after a NULL). */
extern int check_failures;

#define CHECK(cond) \
    do { if (!(cond)) check_fail(__FILE__, __LINE__, #cond, NULL); } while (0)
/* CHECK with a printf-style explanation, for checks inside loops */
#define CHECKF(cond, ...) \
    do { if (!(cond)) check_fail(__FILE__, __LINE__, #cond, __VA_ARGS__); } while (0)
/* CHECK that stops the test when it fails (for pointers the rest of the test needs) */
#define REQUIRE(cond) \
    do { if (!(cond)) { check_fail(__FILE__, __LINE__, #cond, NULL); return; } } while (0)

#define CHECK_REGISTER_(name, gpu)                                                         \
    static void name(void);                                                                \
    __attribute__((constructor)) static void check_register_##name(void)                   \
    { check_register(#name, name, gpu); }                                                  \
    static void name(void)
#define TEST(name) CHECK_REGISTER_(name, 0)
#define GPU_TEST(name) CHECK_REGISTER_(name, 1)

#ifdef CHECK_MAIN
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

int dsrt_device_count(void);

enum { CHECK_MAX_TESTS = 1024, CHECK_MAX_PRINTED = 8 };

typedef struct { const char *name; void (*fn)(void); int gpu; } check_test;
static check_test check_tests[CHECK_MAX_TESTS];
static int check_ntests;
int check_failures;

void check_register(const char *name, void (*fn)(void), int gpu)
{
    if (check_ntests == CHECK_MAX_TESTS) {
        fprintf(stderr, "check.h: more than %d tests\n", CHECK_MAX_TESTS);
        exit(2);
    }
    check_tests[check_ntests].name = name;
    check_tests[check_ntests].fn = fn;
    check_tests[check_ntests++].gpu = gpu;
}

static const char *check_current;

void check_fail(const char *file, int line, const char *expr, const char *fmt, ...)
{
    if (++check_failures > CHECK_MAX_PRINTED) {
        if (check_failures == CHECK_MAX_PRINTED + 1) printf("  %s: (further failures not shown)\n", check_current);
        return;
    }
    printf("  %s:%d: %s: CHECK(%s) failed", file, line, check_current, expr);
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        printf(": ");
        vprintf(fmt, ap);
        va_end(ap);
    }
    printf("\n");
    fflush(stdout);
}

static int check_by_name(const void *a, const void *b)
{
    return strcmp(((const check_test *)a)->name, ((const check_test *)b)->name);
}

int main(int argc, char **argv)
{
    int gpu = 0, nfilters = 0, passed = 0, failed = 0;
    const char *filters[64];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--gpu")) gpu = 1;
        else if (nfilters < 64) filters[nfilters++] = argv[i];
    }
    /* constructor order depends on the link; run in name order instead */
    qsort(check_tests, (size_t)check_ntests, sizeof check_tests[0], check_by_name);
    int have_gpu = gpu ? dsrt_device_count() > 0 : 0;
    for (int i = 0; i < check_ntests; i++) {
        if (check_tests[i].gpu != gpu) continue;
        int selected = nfilters == 0;
        for (int f = 0; f < nfilters && !selected; f++) selected = strstr(check_tests[i].name, filters[f]) != NULL;
        if (!selected) continue;
        check_current = check_tests[i].name;
        check_failures = 0;
        if (gpu && !have_gpu) check_fail(__FILE__, __LINE__, "dsrt_device_count() > 0", "--gpu given but no CUDA device");
        else check_tests[i].fn();
        if (check_failures) {
            printf("FAIL %s\n", check_current);
            failed++;
        } else {
            passed++;
        }
        fflush(stdout);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
#endif /* CHECK_MAIN */

#endif
