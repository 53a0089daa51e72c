/* relay.c: the floors of calls served by a third process, as a manager's
   proxies make them (bench/manager.lua); one byte a hop, blocking reads
   and poll, no spinning. Prints round trips/s.
   usage: relay chain N     a round trip from A to B and back, relayed by a
                            server S: A->S->B->S->A, four hops (a manager
                            Queue's put+get round trip at its least)
          relay fanin N K   K clients, each making N request/answer round
                            trips with one server that polls their K
                            sockets (d:incr from K processes at its least);
                            the rate is of all K together */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clock.h"

#define MAXK 64

static void hop_in(int fd, char *c) { if (read(fd, c, 1) != 1) _exit(1); }
static void hop_out(int fd, char c) { if (write(fd, &c, 1) != 1) _exit(1); }

/* the server: answer (or pass on) every byte that comes until all its
   peers have closed; in a chain, a byte from peer 0 goes to peer 1 and
   back */
static void serve(int *fd, int k, int chain) {
  struct pollfd p[MAXK];
  int open = k, i;
  for (i = 0; i < k; i++) { p[i].fd = fd[i]; p[i].events = POLLIN; }
  while (open > 0) {
    if (poll(p, (nfds_t)k, -1) < 0) _exit(1);
    for (i = 0; i < k; i++) {
      char c;
      if (!(p[i].revents & (POLLIN | POLLHUP))) continue;
      if (read(p[i].fd, &c, 1) != 1) { p[i].fd = -1; open--; continue; }
      hop_out(chain ? fd[1 - i] : fd[i], c);
    }
  }
  _exit(0);
}

int main(int argc, char **argv) {
  int chain = argc > 1 && strcmp(argv[1], "chain") == 0;
  long n = argc > 2 ? atol(argv[2]) : 10000, j;
  int k = chain ? 2 : (argc > 3 ? atoi(argv[3]) : 4), i;
  int srv[MAXK], cli[MAXK], go[2];
  pid_t pids[MAXK + 1];
  double t0;
  char c = 'x';
  if (k < 1 || k > MAXK || n < 1 || pipe(go) != 0) return 2;
  for (i = 0; i < k; i++) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return 1;
    srv[i] = sv[0];
    cli[i] = sv[1];
  }
  pids[0] = fork();
  if (pids[0] < 0) return 1;
  if (pids[0] == 0) {
    for (i = 0; i < k; i++) close(cli[i]);
    serve(srv, k, chain);
  }
  for (i = 0; i < k; i++) close(srv[i]);
  /* the clients (a chain's B, echoing) wait for the start byte */
  for (i = chain ? 1 : 0; i < k; i++) {
    pids[i + 1] = fork();
    if (pids[i + 1] < 0) return 1;
    if (pids[i + 1] == 0) {
      if (!chain) hop_in(go[0], &c);
      for (j = 0; j < n; j++) {
        if (chain) { hop_in(cli[i], &c); hop_out(cli[i], c); }
        else { hop_out(cli[i], c); hop_in(cli[i], &c); }
      }
      _exit(0);
    }
  }
  t0 = now();
  if (chain) {
    for (j = 0; j < n; j++) { hop_out(cli[0], c); hop_in(cli[0], &c); }
  } else {
    for (i = 0; i < k; i++) hop_out(go[1], c);
    for (i = 1; i <= k; i++) waitpid(pids[i], NULL, 0);
  }
  printf("%.0f\n", (double)(chain ? n : n * k) / (now() - t0));
  for (i = 0; i < k; i++) close(cli[i]);
  if (chain) waitpid(pids[2], NULL, 0);
  waitpid(pids[0], NULL, 0);
  return 0;
}
