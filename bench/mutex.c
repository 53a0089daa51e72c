/* mutex.c: the floors for bench/sync.lua, in plain C on the same machine:
   a process-shared, robust pthread mutex in shared memory.
   usage: mutex N 1   N lock+unlock pairs in one process; prints pairs/s
          mutex N 2   two processes each add 1 to a shared counter N times
                      under the mutex; prints increments/s */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clock.h"

struct shared {
  pthread_mutex_t mu;
  long counter;
};

static void work(struct shared *s, long n) {
  long i;
  for (i = 0; i < n; i++) {
    pthread_mutex_lock(&s->mu);
    s->counter++;
    pthread_mutex_unlock(&s->mu);
  }
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 1000000, i;
  int procs = argc > 2 ? atoi(argv[2]) : 1;
  pthread_mutexattr_t attr;
  struct shared *s;
  double t0;
  pid_t pid;
  s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (s == MAP_FAILED) return 1;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  if (pthread_mutex_init(&s->mu, &attr) != 0) return 1;
  s->counter = 0;
  t0 = now();
  if (procs == 1) {
    for (i = 0; i < n; i++) {
      pthread_mutex_lock(&s->mu);
      pthread_mutex_unlock(&s->mu);
    }
    printf("%.1f\n", (double)n / (now() - t0));
    return 0;
  }
  pid = fork();
  if (pid < 0) return 1;
  if (pid == 0) { work(s, n); _exit(0); }
  work(s, n);
  waitpid(pid, NULL, 0);
  if (s->counter != 2 * n) return 1;
  printf("%.1f\n", (double)(2 * n) / (now() - t0));
  return 0;
}
