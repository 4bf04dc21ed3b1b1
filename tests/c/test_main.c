/* test_main.c - the C tests' main() (see check.h); the tests live in the other test_*.c files. */
#define CHECK_MAIN
#include "check.h"
