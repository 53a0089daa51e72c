/*
 * wire.c: the one frame every stream of the library carries, and the
 * socket I/O under it (docs/design.md, "The layers": transports).
 *
 * A frame is a 16-byte header (payload length u64, number of fds u32,
 * kind u32), then the payload; its fds ride on its first bytes
 * (SCM_RIGHTS). A Connection's messages (conn.c) and a pool channel's
 * frames (pool.c, pool_worker.c) are such frames; their kinds are one list
 * (mp.h), so a frame of one stream read from another is refused by kind,
 * never misread. Byte order is the host's: both ends are on one machine.
 *
 * mp_sendv is the one send loop: whole iovecs, fds with the first bytes,
 * MSG_NOSIGNAL (a closed peer is EPIPE, never SIGPIPE), EINTR resumed or
 * handed to the signal's Lua hook (mp_interrupted), and with MSG_DONTWAIT
 * the non-blocking flush of the pool's parent (EAGAIN once the socket is
 * full, the iovecs advanced past what went) and the datagrams of a
 * queue's descriptor channel (queue_chan.c). mp_recv_fds is one recvmsg
 * that collects the fds that came.
 */
#include "mp.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

MP_API void mp_frame_put(char *h, uint64_t len, uint32_t nfds, uint32_t kind) {
  memcpy(h, &len, 8);
  memcpy(h + 8, &nfds, 4);
  memcpy(h + 12, &kind, 4);
}

MP_API void mp_frame_get(const char *h, mp_frame *f) {
  memcpy(&f->len, h, 8);
  memcpy(&f->nfds, h + 8, 4);
  memcpy(&f->kind, h + 12, 4);
}

MP_API int mp_sendv(lua_State *L, int fd, struct iovec *iov, int *niovp,
                    const mp_fdlist *fds, int flags, int *sent) {
  union {
    char buf[CMSG_SPACE(sizeof(int) * MP_MAX_FDS)];
    struct cmsghdr align;
  } u;
  struct msghdr msg;
  int first = 1, niov = *niovp;
  *sent = 0;
  while (niov > 0) {
    ssize_t n;
    if (!first && L != NULL && mp_interrupted(L)) {   /* a partial write */
      *niovp = niov;
      return MP_RAISED;
    }
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)niov;
    if (first && fds && fds->n > 0) {
      struct cmsghdr *cm;
      size_t sz = sizeof(int) * (size_t)fds->n;
      memset(u.buf, 0, sizeof u.buf);
      msg.msg_control = u.buf;
      msg.msg_controllen = CMSG_SPACE(sz);
      cm = CMSG_FIRSTHDR(&msg);
      cm->cmsg_level = SOL_SOCKET;
      cm->cmsg_type = SCM_RIGHTS;
      cm->cmsg_len = CMSG_LEN(sz);
      memcpy(CMSG_DATA(cm), fds->fd, sz);
    }
    n = sendmsg(fd, &msg, MSG_NOSIGNAL | flags);
    if (n < 0) {
      if (errno != EINTR) {
        *niovp = niov;
        return errno;
      }
      if (L != NULL && mp_interrupted(L)) {
        *niovp = niov;
        return MP_RAISED;
      }
      continue;
    }
    first = 0;
    *sent = 1;
    while (niov > 0 && (size_t)n >= iov->iov_len) {
      n -= (ssize_t)iov->iov_len;
      iov++;
      niov--;
    }
    if (niov > 0) {
      iov->iov_base = (char *)iov->iov_base + n;
      iov->iov_len -= (size_t)n;
    }
  }
  *niovp = 0;
  return 0;
}

MP_API int mp_sendall(int fd, struct iovec *iov, int niov, const mp_fdlist *fds) {
  int sent;
  return mp_sendv(NULL, fd, iov, &niov, fds, 0, &sent);
}

MP_API ssize_t mp_recv_fds(int fd, char *p, size_t len, int flags, mp_fdlist *fds,
                           int *bad) {
  union {
    char buf[CMSG_SPACE(sizeof(int) * MP_MAX_FDS)];
    struct cmsghdr align;
  } u;
  struct msghdr msg;
  struct iovec iov;
  struct cmsghdr *cm;
  ssize_t n;
  int cut = 0;
  iov.iov_base = p;
  iov.iov_len = len;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = u.buf;
  msg.msg_controllen = sizeof u.buf;
  n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | flags);
  if (n < 0) return n;
  if (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) cut = 1;
  for (cm = msg.msg_controllen ? CMSG_FIRSTHDR(&msg) : NULL; cm; cm = CMSG_NXTHDR(&msg, cm)) {
    if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
      int k = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int)), i;
      const char *d = (const char *)CMSG_DATA(cm);
      for (i = 0; i < k; i++) {
        int g;
        memcpy(&g, d + sizeof(int) * (size_t)i, sizeof g);
        if (fds->n < MP_MAX_FDS) fds->fd[fds->n++] = g;
        else { close(g); cut = 1; }
      }
    } else {
      cut = 1;                            /* credentials: not ours */
    }
  }
  if (bad) *bad = cut;
  return n;
}
