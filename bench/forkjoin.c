/* forkjoin.c: the floors for bench/process.lua's fork_start_join and
   bench/pool.lua's start_close_join cases, in plain C on the same machine.
   usage: forkjoin N W
   W = 1: fork a child that exits at once, wait for it (N times).
   W = 2: fork two children that each wait for a byte on their own pipe,
          write the two bytes, wait for both (a pool of 2 started, closed
          and joined, with no pool in it). Prints cycles/s. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clock.h"

static pid_t child(int *wfd) {
  int p[2];
  pid_t pid;
  char c;
  if (pipe(p) != 0) exit(1);
  pid = fork();
  if (pid < 0) exit(1);
  if (pid == 0) {
    close(p[1]);
    _exit(read(p[0], &c, 1) == 1 ? 0 : 1);
  }
  close(p[0]);
  *wfd = p[1];
  return pid;
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 300, i;
  int w = argc > 2 ? atoi(argv[2]) : 1, k, fds[2];
  pid_t pids[2];
  double t0 = now();
  if (w < 1 || w > 2) return 2;
  for (i = 0; i < n; i++) {
    if (w == 1) {
      pid_t pid = fork();
      if (pid < 0) return 1;
      if (pid == 0) _exit(0);
      waitpid(pid, NULL, 0);
      continue;
    }
    for (k = 0; k < w; k++) pids[k] = child(&fds[k]);
    for (k = 0; k < w; k++) {
      if (write(fds[k], "x", 1) != 1) return 1;
      close(fds[k]);
    }
    for (k = 0; k < w; k++) waitpid(pids[k], NULL, 0);
  }
  printf("%.1f\n", (double)n / (now() - t0));
  return 0;
}
