/*
 * host_sampler.c - where a dsrt process spends its wall-clock time on the host, for a machine with
 * neither perf nor nsys (the GPU image). Preloaded (LD_PRELOAD), it takes a backtrace of the
 * running thread every DSRT_HOST_SAMPLE_US microseconds of wall-clock time (default 50) while
 * sampling is on, and at exit writes the process's executable mappings and the backtraces to
 * $DSRT_HOST_SAMPLES; tools/host_report.py turns them into self and inclusive shares by function.
 *
 * Wall clock, not CPU time: a host that waits (cudaStreamSynchronize, a launch queue) shows where it
 * waits, which is the point. The interval timer is ITIMER_REAL: ITIMER_PROF counts at the kernel's
 * tick (4 ms here), far too coarse for a 1 ms decode step.
 *
 * On from the start, or with DSRT_HOST_SAMPLES_WAIT=1 only between SIGUSR1 and SIGUSR2, which a Lua
 * script sends itself with os.execute("kill -USR1 $PPID") (the shell's parent is the process).
 *
 * What it protects: the process under study. The handler only reads the stack into a preallocated
 * buffer (backtrace() is primed once at load, so the handler never loads libgcc_s); the variables
 * are removed from the environment at load, so a child (the shell of os.execute) neither samples
 * nor overwrites the file; the timer restarts interrupted system calls (SA_RESTART).
 */
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

enum { DEPTH = 48, MAX_SAMPLES = 100000 };

static void *frames[MAX_SAMPLES][DEPTH];
static int depths[MAX_SAMPLES];
static volatile sig_atomic_t count, sampling;
static char out_path[1024];

static void take_sample(int sig)
{
    (void)sig;
    if (!sampling || count >= MAX_SAMPLES) return;
    int i = count++;
    depths[i] = backtrace(frames[i], DEPTH);
}

static void start(int sig) { (void)sig; sampling = 1; }
static void stop(int sig) { (void)sig; sampling = 0; }

__attribute__((constructor)) static void sampler_init(void)
{
    const char *path = getenv("DSRT_HOST_SAMPLES");
    if (!path) return;
    snprintf(out_path, sizeof out_path, "%s", path);
    const char *wait = getenv("DSRT_HOST_SAMPLES_WAIT"), *us = getenv("DSRT_HOST_SAMPLE_US");
    long interval = us ? atol(us) : 50;
    sampling = !(wait && strcmp(wait, "1") == 0);
    unsetenv("DSRT_HOST_SAMPLES");
    unsetenv("DSRT_HOST_SAMPLES_WAIT");
    unsetenv("DSRT_HOST_SAMPLE_US");
    unsetenv("LD_PRELOAD");
    void *prime[2];
    backtrace(prime, 2);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_flags = SA_RESTART;
    sa.sa_handler = take_sample;
    sigaction(SIGALRM, &sa, NULL);
    sa.sa_handler = start;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = stop;
    sigaction(SIGUSR2, &sa, NULL);
    struct itimerval timer = {{0, interval > 0 ? interval : 50}, {0, interval > 0 ? interval : 50}};
    setitimer(ITIMER_REAL, &timer, NULL);
}

__attribute__((destructor)) static void sampler_write(void)
{
    if (!out_path[0]) return;
    struct itimerval off;
    memset(&off, 0, sizeof off);
    setitimer(ITIMER_REAL, &off, NULL);
    FILE *out = fopen(out_path, "w");
    if (!out) {
        fprintf(stderr, "host_sampler: cannot write %s\n", out_path);
        return;
    }
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[1024];
    while (maps && fgets(line, sizeof line, maps))
        if (strstr(line, " r-xp ")) fprintf(out, "M %s", line);
    if (maps) fclose(maps);
    for (int i = 0; i < count; i++) {
        fputc('S', out);
        for (int k = 0; k < depths[i]; k++) fprintf(out, " %lx", (unsigned long)frames[i][k]);
        fputc('\n', out);
    }
    fclose(out);
}
