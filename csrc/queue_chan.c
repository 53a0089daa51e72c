/*
 * queue_chan.c: a queue's descriptor channel (queue.h), which carries the
 * fds of the items that hold handles (a Queue, an Event, a Pipe end...) to
 * whichever consumer takes them.
 *
 * The channel is a socketpair of datagram sockets made with the queue: every
 * process sends on one end (afd) and receives on the other (bfd); both
 * travel with the queue's handle. A put of an item with fds gives it an id
 * (a counter in the header), sends one datagram {magic, nfds, id} with the
 * fds (SCM_RIGHTS), then writes the item's record, marked with the same id;
 * a get that takes a marked record receives the datagram of that id. Both
 * happen under the queue's lock, so datagrams are in the order of their
 * records, and a consumer finds its item's datagram first once the
 * orphans before it are gone: the datagram of a producer killed between
 * its send and its commit, or of a consumer killed between taking the
 * record and receiving the datagram. An older id is such an orphan (its
 * fds are closed); a later one, or none, means the item's fds are lost
 * (the get raises, the later item's datagram stays for it). A datagram
 * that is malformed (its size, magic or fd count, a truncated control
 * message, an id never given) is dropped with its fds.
 *
 * Sends and receives never block (MSG_DONTWAIT: the sockets are shared by
 * every process, so their flags are not set); a full channel (its send
 * buffer, raised as far as the system allows) makes the put wait for room
 * (poll), say "full", or leave the item to the feeder. A connected pair is
 * not bound by the system's datagram queue length. Plain items never touch
 * the channel.
 */
#include "queue.h"

#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define DGRAM_MAGIC 0x4d504644u          /* "MPFD" */
#define CHAN_SNDBUF (64 << 20)           /* asked; the system caps it */

MP_API void mpq_chan_new(lua_State *L, mp_queue *q) {
  int sv[2], big = CHAN_SNDBUF;
  if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv) != 0)
    mp_raise_errno(L, errno, "Queue: socketpair");
  q->afd = sv[0];
  q->bfd = sv[1];
  /* best effort: the kernel caps it at its maximum (net.core.wmem_max) */
  setsockopt(q->afd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
}

/* Is fd a Unix datagram socket? */
static int is_dgram(int fd) {
  int v = 0;
  socklen_t n = sizeof v;
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &n) != 0 || v != SOCK_DGRAM) return 0;
  n = sizeof v;
  return getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &v, &n) == 0 && v == AF_UNIX;
}

MP_API const char *mpq_chan_check(int afd, int bfd) {
  if (!is_dgram(afd) || !is_dgram(bfd))
    return "its descriptor channel is not a pair of Unix datagram sockets";
  return NULL;
}

MP_API int mpq_mark_parse(const char *p, uint64_t len, uint64_t *id, int *nfds) {
  const unsigned char *u = (const unsigned char *)p;
  int i;
  if (len < MARK_LEN || u[0] != MARK_BYTE || u[1] == 0 || u[1] > MP_MAX_FDS)
    return 0;
  for (i = 2; i < 8; i++)
    if (u[i] != 0) return 0;
  memcpy(id, p + 8, 8);
  *nfds = u[1];
  return *id != 0;
}

MP_API int mpq_dgram_parse(const char *p, size_t len, uint64_t *id, int *nfds) {
  uint32_t magic, n;
  if (len != DGRAM_LEN) return 0;
  memcpy(&magic, p, 4);
  memcpy(&n, p + 4, 4);
  memcpy(id, p + 8, 8);
  if (magic != DGRAM_MAGIC || n == 0 || n > MP_MAX_FDS || *id == 0) return 0;
  *nfds = (int)n;
  return 1;
}

/* Receive the next datagram (its first DGRAM_LEN + 1 bytes, so that a
   longer one shows) and its fds, which go to fds: its length, or -1
   (errno). *bad: the control data was cut short or was not only fds. */
static ssize_t chan_recv(int fd, char *p, mp_fdlist *fds, int *bad) {
  ssize_t n;
  fds->n = 0;
  do n = mp_recv_fds(fd, p, DGRAM_LEN + 1, MSG_DONTWAIT, fds, bad);
  while (n < 0 && errno == EINTR);
  return n;
}

/* Drop every datagram the channel holds (see mpq_chan_send). */
static void chan_drain(mp_queue *q) {
  char h[DGRAM_LEN + 1];
  mp_fdlist fds;
  int bad;
  while (chan_recv(q->bfd, h, &fds, &bad) >= 0) mp_fdlist_close(&fds);
}

MP_API int mpq_chan_send(mp_queue *q, const int *fds, int n, char *mark, int ring_empty) {
  qshm *s = q->shm;
  char h[DGRAM_LEN];
  uint32_t magic = DGRAM_MAGIC, nf = (uint32_t)n;
  uint64_t id;
  struct iovec iov;
  mp_fdlist fl;
  int one = 1, sent, err;
  if (n <= 0 || n > MP_MAX_FDS) return EINVAL;
  /* the id is spent before the send: a producer killed after sending
     must not leave a datagram whose id the next one would give again */
  id = ++s->fdseq;
  memcpy(h, &magic, 4);
  memcpy(h + 4, &nf, 4);
  memcpy(h + 8, &id, 8);
  iov.iov_base = h;
  iov.iov_len = sizeof h;
  fl.n = n;
  memcpy(fl.fd, fds, sizeof(int) * (size_t)n);
  /* one datagram: it goes whole or not at all */
  err = mp_sendv(NULL, q->afd, &iov, &one, &fl, MSG_DONTWAIT, &sent);
  if (err == EAGAIN && ring_empty) {
    chan_drain(q);
    err = mp_sendv(NULL, q->afd, &iov, &one, &fl, MSG_DONTWAIT, &sent);
  }
  if (err != 0) return err;
  if (mpq_crash_stage == 3) _exit(9);
  memset(mark, 0, MARK_LEN);
  mark[0] = (char)MARK_BYTE;
  mark[1] = (char)n;
  memcpy(mark + 8, &id, 8);
  return 0;
}

MP_API void mpq_chan_wait(mp_queue *q, double deadline, double max_wait) {
  struct pollfd pfd;
  int ms = mp_remaining_ms(deadline), most = (int)(max_wait * 1000) + 1;
  pfd.fd = q->afd;
  pfd.events = POLLOUT;
  pfd.revents = 0;
  if (ms < 0 || ms > most) ms = most;
  poll(&pfd, 1, ms);
}

MP_API int mpq_chan_take(mp_queue *q, mpq_take *ft) {
  uint64_t last = q->shm->fdseq;  /* no genuine datagram names a later id */
  ft->fds.n = 0;
  if (ft->id > last) return 0;    /* a forged marker: leave the others be */
  for (;;) {
    char h[DGRAM_LEN + 1];
    uint64_t id = 0;
    int nfds = 0, bad, mine;
    ssize_t n;
    /* look at the next datagram's bytes; its fds stay in it */
    do n = recv(q->bfd, h, sizeof h, MSG_PEEK | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0) return 0;                  /* none (EAGAIN): ours is lost */
    mine = mpq_dgram_parse(h, (size_t)n, &id, &nfds) && id <= last;
    if (mine && id > ft->id) return 0;    /* a later item's: ours is lost */
    /* ours, an orphan or a forgery: receive it (and read what came) */
    n = chan_recv(q->bfd, h, &ft->fds, &bad);
    if (n < 0) return 0;
    if (mpq_dgram_parse(h, (size_t)n, &id, &nfds) && id == ft->id) {
      if (!bad && nfds == ft->nfds && ft->fds.n == nfds) return 1;
      mp_fdlist_close(&ft->fds);
      return 0;
    }
    mp_fdlist_close(&ft->fds);            /* an orphan, or malformed */
  }
}
