/*
 * shm.c: shared memory segments and futexes, the ground under sync.c and
 * queue.c.
 *
 * A segment is a memfd (memfd_create) mapped MAP_SHARED: it has no name, so
 * nothing is left in /dev/shm when a process is killed, and it is an fd, so
 * a process that did not inherit the mapping (a spawned child) maps the
 * same memory from the fd passed to it (SCM_RIGHTS; the fd itself is
 * close-on-exec). Futex waits use absolute CLOCK_MONOTONIC deadlines
 * (FUTEX_WAIT_BITSET), so a timeout interrupted by a signal resumes with
 * the time that is left. Both waits here return EINTR to the caller, which
 * lets the signal's Lua hook run (mp_interrupted) before it sleeps again.
 *
 * Every segment is sealed against shrinking (F_SEAL_SHRINK) as soon as it
 * has its size, and the seals are sealed (F_SEAL_SEAL): any process that
 * holds the fd can truncate a plain memfd (through /proc/self/fd/N, say),
 * and every other process that maps it then dies of SIGBUS at its next
 * access. Segments of a fixed size are sealed against growing too; a
 * queue's grows with its ring. A segment received with a handle is mapped
 * only if it carries the seal: then the size seen once is a floor for good,
 * and a mapping of that size can never fault.
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
                           int grows, int *fdp) {
  void *p;
  int seals = F_SEAL_SHRINK | F_SEAL_SEAL | (grows ? 0 : F_SEAL_GROW);
  int fd = (int)syscall(SYS_memfd_create, name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) {
    mp_raise_errno(L, errno, "memfd_create");
    return NULL;
  }
  if (ftruncate(fd, (off_t)size) != 0 || fcntl(fd, F_ADD_SEALS, seals) != 0) {
    int e = errno;
    close(fd);
    mp_raise_errno(L, e, "cannot size and seal a shared memory segment");
    return NULL;
  }
  p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    close(fd);
    mp_raise_errno(L, e, "mmap");
    return NULL;
  }
  *fdp = fd;
  return p;
}

MP_API const char *mp_shm_check(int fd, size_t min, size_t *sizep) {
  struct stat st;
  int seals = fcntl(fd, F_GET_SEALS);   /* the seal first: then the size */
  if (seals < 0 || !(seals & F_SEAL_SHRINK))
    return "its memory is not sealed against shrinking";
  if (fstat(fd, &st) != 0) return strerror(errno);
  if (st.st_size <= 0 || (uint64_t)st.st_size < min ||
      (uint64_t)st.st_size > (uint64_t)SIZE_MAX / 2)
    return "its memory is smaller than its header requires";
  *sizep = (size_t)st.st_size;
  return NULL;
}

MP_API void *mp_shm_map(int fd, size_t min, size_t *sizep, const char **why) {
  size_t size = 0;
  void *p;
  if ((*why = mp_shm_check(fd, min, &size)) != NULL) return NULL;
  p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    *why = strerror(errno);
    return NULL;
  }
  *sizep = size;
  return p;
}

MP_API int mp_shm_size(int fd, size_t *sizep) {
  struct stat st;
  if (fstat(fd, &st) != 0) return errno;
  *sizep = st.st_size > 0 ? (size_t)st.st_size : 0;
  return 0;
}

MP_API int mp_shm_grow(int fd, size_t size) {
  size_t have;
  int e = mp_shm_size(fd, &have);
  if (e != 0) return e;
  if (have >= size) return 0;          /* a sealed segment cannot shrink */
  return ftruncate(fd, (off_t)size) == 0 ? 0 : errno;
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

/* core._test.shm_unsealed(size) -> fd of a new memfd of size bytes (zeros)
   that is not sealed (specs only: a forged segment, which a received
   handle must refuse) */
static int shm_test_unsealed(lua_State *L) {
  lua_Integer size = luaL_checkinteger(L, 1);
  int fd;
  luaL_argcheck(L, size >= 0, 1, "size must be >= 0");
  fd = (int)syscall(SYS_memfd_create, "mp-test-unsealed", MFD_CLOEXEC);
  if (fd < 0) return mp_raise_errno(L, errno, "memfd_create");
  if (ftruncate(fd, (off_t)size) != 0) {
    int e = errno;
    close(fd);
    return mp_raise_errno(L, e, "ftruncate");
  }
  lua_pushinteger(L, fd);
  return 1;
}

MP_API void mp_shm_open(lua_State *L) {
  static const luaL_Reg tests[] = {
    {"shm_unsealed", shm_test_unsealed},
    {NULL, NULL}
  };
  mp_add_tests(L, tests);
}
