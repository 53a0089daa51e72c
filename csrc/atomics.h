/*
 * atomics.h: the atomic operations and the spin-wait pause of every C file
 * that shares memory between processes (lock.c, sync*.c, queue*.c).
 *
 * One naming, spelled out so that nobody confuses them: add_fetch returns
 * the new value, fetch_add the old one (as the GCC builtins they wrap).
 * Everything is sequentially consistent unless the name says otherwise
 * (_relaxed, _acquire, _release): the lock's and the queues' wake-up
 * protocols are Dekker pairs (a store, then a load of another word, on
 * both sides), which need nothing weaker; on x86-64 the read-modify-writes
 * cost the same at any order.
 */
#ifndef MP_ATOMICS_H
#define MP_ATOMICS_H

#define mp_atomic_load(p)          __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define mp_atomic_load_relaxed(p)  __atomic_load_n((p), __ATOMIC_RELAXED)
#define mp_atomic_load_acquire(p)  __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define mp_atomic_store(p, v)      __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define mp_atomic_add_fetch(p, v)  __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)
#define mp_atomic_sub_fetch(p, v)  __atomic_sub_fetch((p), (v), __ATOMIC_SEQ_CST)
#define mp_atomic_fetch_add(p, v)  __atomic_fetch_add((p), (v), __ATOMIC_SEQ_CST)
#define mp_atomic_fetch_sub(p, v)  __atomic_fetch_sub((p), (v), __ATOMIC_SEQ_CST)
#define mp_atomic_fetch_or(p, v)   __atomic_fetch_or((p), (v), __ATOMIC_SEQ_CST)
#define mp_atomic_fetch_and(p, v)  __atomic_fetch_and((p), (v), __ATOMIC_SEQ_CST)
#define mp_atomic_exchange(p, v)   __atomic_exchange_n((p), (v), __ATOMIC_SEQ_CST)
/* Strong compare-and-swap: 1 and *p = d if *p == *e, else 0 and *e = *p. */
#define mp_atomic_cas(p, e, d)     __atomic_compare_exchange_n((p), (e), (d), 0, \
                                     __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)
#define mp_atomic_fence()          __atomic_thread_fence(__ATOMIC_SEQ_CST)

/* One step of a spin-wait: tells the CPU (and a hyperthread sibling) that
   this core only waits. */
static inline void mp_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__ __volatile__("pause" ::: "memory");
#elif defined(__aarch64__)
  __asm__ __volatile__("yield" ::: "memory");
#else
  __asm__ __volatile__("" ::: "memory");
#endif
}

#endif
