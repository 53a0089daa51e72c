/* pingpong.c: the floor of a round trip between two processes: one byte
   each way, n times; prints round trips/s.
   usage: pingpong N [socket]
   default: two pipes (bench/queues.lua's queue_pingpong);
   socket:  one AF_UNIX socketpair, as a duplex Pipe and the pool's worker
            channels use (bench/process.lua, bench/pool.lua). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clock.h"

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 100000, i;
  int sock = argc > 2 && strcmp(argv[2], "socket") == 0;
  int a[2], b[2];                 /* parent writes a[1], reads b[0] */
  char c = 'x';
  double t0;
  pid_t pid;
  if (sock) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return 1;
    a[1] = b[0] = sv[0];          /* the parent's end */
    a[0] = b[1] = sv[1];          /* the child's end */
  } else if (pipe(a) != 0 || pipe(b) != 0) {
    return 1;
  }
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
