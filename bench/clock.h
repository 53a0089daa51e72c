/* clock.h: the clock the C floors in bench/ time themselves with (the
   monotonic clock, as core.monotonic reads it for the Lua cases). */
#ifndef BENCH_CLOCK_H
#define BENCH_CLOCK_H

#include <time.h>

/* seconds on the monotonic clock, as a double */
static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#endif
