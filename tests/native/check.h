/* check.h: what the C test programs of tests/native share: CHECK(cond) prints the failed condition, where, and
 * sp_last_error(), then exits with 1. Include after sparrow.h. */
#ifndef SP_TEST_CHECK_H
#define SP_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond)                                                                                  \
    do {                                                                                             \
        if (!(cond)) {                                                                               \
            fprintf(stderr, "check failed: %s (%s:%d): %s\n", #cond, __FILE__, __LINE__, sp_last_error()); \
            exit(1);                                                                                 \
        }                                                                                            \
    } while (0)

#endif
