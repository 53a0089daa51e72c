/*
 * shm.c: shared memory segments and futexes, the ground under sync.c and
 * queue.c.
 *
 * A segment is a memfd (memfd_create) mapped MAP_SHARED: it has no name, so
 * nothing is left in /dev/shm when a process is killed, and its fd survives
 * exec, so a spawned child maps the same memory from a passed fd. Futex
 * waits use absolute CLOCK_MONOTONIC deadlines (FUTEX_WAIT_BITSET), so a
 * timeout interrupted by a signal resumes with the time that is left. Both
 * waits here return EINTR to the caller, which lets the signal's Lua hook
 * run (mp_interrupted) before it sleeps again.
 */
#include "mp.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <math.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

MP_API void *mp_shm_create(lua_State *L, const char *name, size_t size,
                           int *fdp) {
  void *p;
  int fd = (int)syscall(SYS_memfd_create, name, MFD_CLOEXEC);
  if (fd < 0) {
    luaL_error(L, "memfd_create: %s", strerror(errno));
    return NULL;
  }
  if (ftruncate(fd, (off_t)size) != 0) {
    int e = errno;
    close(fd);
    luaL_error(L, "ftruncate: %s", strerror(e));
    return NULL;
  }
  p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    close(fd);
    luaL_error(L, "mmap: %s", strerror(e));
    return NULL;
  }
  *fdp = fd;
  return p;
}

MP_API void *mp_shm_map(int fd, size_t *sizep) {
  struct stat st;
  void *p;
  if (fstat(fd, &st) != 0 || st.st_size <= 0) return NULL;
  p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return NULL;
  *sizep = (size_t)st.st_size;
  return p;
}

MP_API void mp_shm_unmap(void *p, size_t size) {
  if (p != NULL) munmap(p, size);
}

/* An absolute CLOCK_MONOTONIC time in seconds as a timespec. */
static void abstime(double t, struct timespec *ts) {
  double s = floor(t);
  ts->tv_sec = (time_t)s;
  ts->tv_nsec = (long)((t - s) * 1e9);
  if (ts->tv_nsec >= 1000000000L) ts->tv_nsec = 999999999L;
}

MP_API int mp_sleep_until(double t) {
  struct timespec ts;
  abstime(t, &ts);
  return clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR
         ? EINTR : 0;
}

MP_API int mp_futex_wait(uint32_t *addr, uint32_t val, double deadline) {
  struct timespec ts, *tsp = NULL;
  long r;
  if (deadline >= 0) {
    abstime(deadline, &ts);
    tsp = &ts;
  }
  /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC time. Shared (not
     PRIVATE) futexes, since the word lives in memory of several processes. */
  r = syscall(SYS_futex, addr, FUTEX_WAIT_BITSET, val, tsp, NULL,
              FUTEX_BITSET_MATCH_ANY);
  if (r == 0) return 0;
  return errno;  /* EAGAIN: value changed; ETIMEDOUT; EINTR */
}

MP_API int mp_futex_wake(uint32_t *addr, int n) {
  return (int)syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
}

MP_API void mp_shm_open(lua_State *L) { (void)L; }
