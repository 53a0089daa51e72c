/* pingpong.c: the baseline for bench/queues.lua's "pingpong" case: two
   processes bounce one byte through two pipes; prints round trips/s.
   usage: pingpong N */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 100000, i;
  int a[2], b[2];
  char c = 'x';
  double t0;
  pid_t pid;
  if (pipe(a) != 0 || pipe(b) != 0) return 1;
  pid = fork();
  if (pid < 0) return 1;
  if (pid == 0) {
    for (i = 0; i < n; i++) {
      if (read(a[0], &c, 1) != 1) _exit(1);
      if (write(b[1], &c, 1) != 1) _exit(1);
    }
    _exit(0);
  }
  t0 = now();
  for (i = 0; i < n; i++) {
    if (write(a[1], &c, 1) != 1) return 1;
    if (read(b[0], &c, 1) != 1) return 1;
  }
  printf("%.0f\n", (double)n / (now() - t0));
  waitpid(pid, NULL, 0);
  return 0;
}
