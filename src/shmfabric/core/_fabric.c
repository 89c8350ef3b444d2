/*
 * _fabric.c -- the compiled core of shmfabric: packet pool, rings, tape rings, wake-ups.
 *
 * Only index arithmetic, atomics, wake-ups and copies live here. Layout computation, validation
 * of a mapped region, naming, liveness policy and error messages are Python's (shmfabric.core).
 *
 * Memory ordering. Every acquire/release pair is labelled and names its partner:
 *   R1 (producer publishes ring head)     pairs with A2 (consumer reads ring head)
 *   R2 (consumer publishes ring tail)     pairs with A1 (producer reads ring tail)
 *   R3 (free-stack push CAS)              pairs with A3 (free-stack pop load/CAS)
 *   R4 (tape entry seq, complete)         pairs with A4 (tape reader loads seq)
 *   R5 (tape head store)                  pairs with A5 (tape reader loads head)
 *   F1 (sender fence before reading `waiting`) pairs with F2 (sleeper fence after setting it):
 *      the classic store-load (Dekker) pattern, which needs seq_cst fences on both sides.
 *   F1 also pairs with F4 (reclaimer fence after marking a dead node's rings down, before it
 *      scans the owner table): a sender that checked "destination up" before the reclaim either
 *      has its owner tags seen by the scan, or sees `down` after F1 and takes its frames back
 *      (finish_send); reclaim_slot's CAS frees each slot once, whoever comes first.
 *   F5 (a node's fence after marking itself inside a pool operation, before it reads
 *      `sweeping`) pairs with F6 (the sweeper's fence after setting `sweeping`, before it reads
 *      the nodes' pool_ops): either the node sees the sweep and stays out, or the sweeper sees
 *      the node inside and waits for it (Dekker again). A node that stays out too long cancels
 *      the sweep with a CAS of `sweeping`; the sweeper's own CAS of it, after its look, tells it
 *      whether its look was undisturbed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <linux/futex.h>
#include <stdbool.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <stddef.h>

#include "fabric_layout.h"

#define LOAD_RELAXED(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define LOAD_ACQUIRE(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE_RELAXED(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define STORE_RELEASE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define CPU_RELAX() __builtin_ia32_pause()

#define CACHE_CAP 512   /* private free-slot cache per network */
#define CHAIN_LEN 64    /* slots moved per CAS between the cache and the shared stack */

static PyObject *FabricError;
static PyObject *ReleasedError;
static PyObject *FrameSizeError;
static PyObject *NodeReclaimedError;

/* ------------------------------------------------------------------------------------------ */
/* small helpers                                                                               */

/* Argument converters ("O&"). PyArg's "I"/"H" formats wrap out-of-range values silently (0x12345
 * became ethertype 0x2345, -1 became 65535), so integer arguments are parsed as Python ints and
 * range-checked here, with an error that names the argument. */
static int parse_uint_arg(PyObject *o, unsigned long long max, const char *what, unsigned long long *out)
{
    if (!PyLong_Check(o) || PyBool_Check(o)) { /* True is an int: tape_send(True, ...) wrote to tape 1 */
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what, Py_TYPE(o)->tp_name);
        return 0;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return 0;
    if (overflow || v < 0 || (unsigned long long)v > max) {
        PyErr_Format(PyExc_ValueError, "%s must be between 0 and %llu, not %R", what, max, o);
        return 0;
    }
    *out = (unsigned long long)v;
    return 1;
}
/* "O&" converters for unsigned arguments of a known width: each is parse_uint_arg with its
 * bound and its name in the error (PyArg_Parse* needs one function per converter). */
#define UINT_CONVERTER(fn, bound, what)                     \
    static int fn(PyObject *o, void *out)                   \
    {                                                       \
        unsigned long long v;                               \
        if (!parse_uint_arg(o, (bound), (what), &v))        \
            return 0;                                       \
        *(unsigned int *)out = (unsigned int)v;             \
        return 1;                                           \
    }
UINT_CONVERTER(conv_ethertype, 0xffffu, "ethertype")
UINT_CONVERTER(conv_meta, 0xffffffffu, "meta")
UINT_CONVERTER(conv_incarnation, 0xffffffffu, "incarnation")
UINT_CONVERTER(conv_tape, 0xffffffffu, "tape")  /* then checked against n_mcast */
UINT_CONVERTER(conv_flags, 0xffffu, "flags")    /* a tape entry's flags are 16 bits */
UINT_CONVERTER(conv_code, 0xffu, "code")        /* compared with one byte per frame */
UINT_CONVERTER(conv_memif_index, 0xffffu, "a memif ring index or mask")
UINT_CONVERTER(conv_memif_count, 0xffffffffu, "a memif count or size")
#undef UINT_CONVERTER

static PyObject *RingDownError;
/* A destination node id: any int is accepted here and range-checked by dest_ring against
 * max_nodes; one that does not even fit a long long is an unknown destination too (not an
 * OverflowError), like any other id out of range. */
static int conv_dst(PyObject *o, void *out)
{
    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "destination must be a node id (int), not %.100s", Py_TYPE(o)->tp_name);
        return 0;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return 0;
    if (overflow) {
        PyErr_Format(RingDownError, "unknown destination node %R", o);
        return 0;
    }
    *(long long *)out = v;
    return 1;
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static long futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns)
{
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tsp = &ts;
    }
    /* Not FUTEX_PRIVATE: the word lives in a MAP_SHARED mapping used by other processes. */
    return syscall(SYS_futex, addr, FUTEX_WAIT, expected, tsp, NULL, 0);
}

static long futex_wake(uint32_t *addr, int n) { return syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0); }

typedef struct {
    uint8_t *base;
    sf_superblock *sb;
    uint64_t size;
} region_view;

static inline sf_node *node_at(const region_view *r, uint32_t i)
{
    return (sf_node *)(r->base + r->sb->off_nodes + (uint64_t)i * r->sb->node_size);
}
static inline sf_network *net_at(const region_view *r, uint32_t i)
{
    return (sf_network *)(r->base + r->sb->off_networks) + i;
}
static inline sf_ring *ring_at(const region_view *r, uint32_t src, uint32_t dst)
{
    return (sf_ring *)(r->base + r->sb->off_rings + ((uint64_t)src * r->sb->max_nodes + dst) * r->sb->ring_stride);
}
static inline sf_tape *tape_at(const region_view *r, uint32_t i)
{
    return (sf_tape *)(r->base + r->sb->off_tapes + (uint64_t)i * r->sb->tape_stride);
}
static inline sf_tape_entry *tape_entry(const region_view *r, sf_tape *t, uint64_t seq)
{
    uint64_t esz = sizeof(sf_tape_entry) + r->sb->tape_entry_size;
    esz = (esz + 63) & ~63ull;
    return (sf_tape_entry *)(t->entries + (seq & (r->sb->tape_entries - 1)) * esz);
}
static inline uint32_t *net_next(const region_view *r, sf_network *n) { return (uint32_t *)(r->base + n->off_next); }
static inline uint32_t *net_chain(const region_view *r, sf_network *n) { return (uint32_t *)(r->base + n->off_chain); }
static inline uint32_t *net_owner(const region_view *r, sf_network *n) { return (uint32_t *)(r->base + n->off_owner); }
static inline uint8_t *slot_ptr(const region_view *r, sf_network *n, uint32_t slot)
{
    return r->base + n->off_slots + (uint64_t)slot * n->slot_size + n->headroom;
}

/* ------------------------------------------------------------------------------------------ */
/* the shared free stack of slot chains                                                        */

/* Push a chain top..bottom (linked through next[], bottom's next = 0) of `count` slots. */
static void stack_push_chain(const region_view *r, sf_network *n, uint32_t top, uint32_t count)
{
    uint32_t *chain = net_chain(r, n);
    uint64_t old = LOAD_RELAXED(&n->free_head), nw;
    do {
        STORE_RELAXED(&chain[top], (uint32_t)(old & 0xffffffffu));
        nw = (((old >> 32) + 1) << 32) | (uint64_t)(top + 1);
        /* R3: the release makes next[]/chain[] of the chain visible to the popper (A3). */
    } while (!__atomic_compare_exchange_n(&n->free_head, &old, nw, true, __ATOMIC_RELEASE, __ATOMIC_RELAXED));
    __atomic_fetch_add(&n->free_count, (int64_t)count, __ATOMIC_RELAXED);
}

/* Pop one chain; returns its top slot + 1, or 0 if the stack is empty. */
static uint32_t stack_pop_chain(const region_view *r, sf_network *n)
{
    uint32_t *chain = net_chain(r, n);
    uint64_t old = LOAD_ACQUIRE(&n->free_head), nw; /* A3 pairs with R3 */
    for (;;) {
        uint32_t top1 = (uint32_t)(old & 0xffffffffu);
        if (!top1 || top1 > n->n_slots) /* empty, or a corrupt head: dry rather than off the pool */
            return 0;
        /* chain[] may be rewritten by a concurrent push of the same slot after another popper
         * took it; then the tag has moved on and our CAS fails, so a stale read is harmless. */
        uint32_t next1 = LOAD_RELAXED(&chain[top1 - 1]);
        nw = (((old >> 32) + 1) << 32) | next1;
        if (__atomic_compare_exchange_n(&n->free_head, &old, nw, true, __ATOMIC_ACQUIRE, __ATOMIC_ACQUIRE))
            return top1;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Region: the mapped buffer and the operations that are not one node's hot path              */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    region_view r;
    int have_view;
} RegionObject;

static PyTypeObject Region_Type;

static int Region_init(RegionObject *self, PyObject *args, PyObject *kw)
{
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "O", &obj))
        return -1;
    if (PyObject_GetBuffer(obj, &self->view, PyBUF_WRITABLE) < 0)
        return -1;
    self->have_view = 1;
    if ((size_t)self->view.len < sizeof(sf_superblock)) {
        PyErr_SetString(FabricError, "region buffer smaller than its superblock");
        return -1;
    }
    self->r.base = self->view.buf;
    self->r.sb = self->view.buf;
    self->r.size = (uint64_t)self->view.len;
    /* The Python side validated every offset before constructing us (shmfabric.core.region);
     * these checks only keep a bug there from turning into a wild write here. */
    sf_superblock *sb = self->r.sb;
    if (sb->magic != SF_MAGIC || sb->version != SF_VERSION || sb->total_size > self->r.size) {
        PyErr_SetString(FabricError, "region superblock not valid (validate before mapping)");
        return -1;
    }
    return 0;
}

static void Region_dealloc(RegionObject *self)
{
    if (self->have_view)
        PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A mutex in the region: process-shared, and robust (a holder killed while holding it hands it
 * over with EOWNERDEAD). */
static void init_shared_mutex(pthread_mutex_t *m)
{
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
}

/* format(): lay out the free chains of every pool and initialise the tape locks. Called once
 * by the creator on a zero-filled file, before any node attaches. */
static PyObject *Region_format(RegionObject *self, PyObject *noargs)
{
    region_view *r = &self->r;
    for (uint32_t ni = 0; ni < r->sb->n_networks; ni++) {
        sf_network *n = net_at(r, ni);
        uint32_t *next = net_next(r, n);
        n->free_head = 0;
        n->free_count = 0;
        /* push chains from the highest slots down so that low slots come out first */
        uint32_t total = n->n_slots;
        uint32_t end = total;
        while (end > 0) {
            uint32_t start = end > CHAIN_LEN ? end - CHAIN_LEN : 0;
            for (uint32_t s = start; s < end; s++)
                next[s] = (s + 1 < end) ? s + 2 : 0;
            stack_push_chain(r, n, start, end - start);
            end = start;
        }
    }
    init_shared_mutex(&r->sb->pool_lock);
    for (uint32_t ti = 0; ti < 1 + r->sb->n_mcast; ti++)
        init_shared_mutex(&tape_at(r, ti)->lock);
    Py_RETURN_NONE;
}

/* A descriptor past a ring's head whose frame was given back (take_back, take_unpublished) has
 * slot UINT32_MAX and len 0, set in one store. No written entry looks so (a frame has a length),
 * nor a never-written one (all zero): a scan past a head skips given-back entries and stops at
 * the first never-written one, so it never reads a ring's pages further than they were written
 * (reading a hole of the tmpfs file commits a page: a full scan of every outbound ring at each
 * reclaim would commit the whole ring area of a fabric sized for many nodes and long rings, most
 * of which no pair ever uses). */
static inline void desc_give_back(sf_desc *d)
{
    STORE_RELAXED(&d->slot_len, (uint64_t)UINT32_MAX); /* little-endian: slot UINT32_MAX, then len 0 */
}

static inline bool desc_given_back(const sf_desc *d)
{
    return d->len == 0 && d->slot == UINT32_MAX;
}

/* free one slot straight to the shared stack if `expect_owner` still owns it. `give_back` (or
 * NULL): the descriptor that named the slot, given back between the untag and the push, so a rerun
 * of a reclaim killed here never finds the slot both free and still named (take_unpublished). */
static int reclaim_slot(region_view *r, sf_network *n, uint32_t slot, uint32_t expect_owner, sf_desc *give_back)
{
    uint32_t *owner = net_owner(r, n);
    uint32_t exp = expect_owner;
    if (!__atomic_compare_exchange_n(&owner[slot], &exp, 0, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
        return 0;
    if (give_back) {
        desc_give_back(give_back);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
    }
    net_next(r, n)[slot] = 0;
    stack_push_chain(r, n, slot, 1);
    return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* the pool sweep: slots lost by a node killed inside a free-stack operation                   */

/* How long a sweep may hold pool operations off. It waits this long at most for the operations
 * under way (one takes about a microsecond: a node still inside after this was descheduled,
 * stopped or killed), and a node held off this long cancels the sweep and goes on, so a sweeper
 * that is stopped or slow never stops traffic. */
#define SWEEP_HOLD_NS 2000000
/* How long a reclaim waits for the pool lock (a sweep or another reclaim holds it), and an
 * attach in all; a holder stopped (SIGSTOP, a debugger) must not stall the watchdogs. */
#define RECLAIM_LOCK_NS 50000000
#define ATTACH_LOCK_NS 5000000000LL

/* Take the region's pool lock (robust, process-shared), waiting at most `timeout_ns` (0: only
 * if free). 0 when taken, else an errno (ETIMEDOUT, EBUSY). A holder that died leaves it
 * EOWNERDEAD; what it was doing (a reclaim: a slot untagged and not yet pushed; a sweep: some
 * of its finds not yet pushed) may have left slots nowhere, so a sweep becomes pending. */
static int pool_lock(sf_superblock *sb, int64_t timeout_ns)
{
    int rc;
    if (timeout_ns <= 0) {
        rc = pthread_mutex_trylock(&sb->pool_lock);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts); /* pthread_mutex_timedlock's clock */
        int64_t ns = ts.tv_nsec + timeout_ns % 1000000000LL;
        ts.tv_sec += timeout_ns / 1000000000LL + ns / 1000000000LL;
        ts.tv_nsec = ns % 1000000000LL;
        rc = pthread_mutex_timedlock(&sb->pool_lock, &ts);
    }
    if (rc == EOWNERDEAD) {
        STORE_RELAXED(&sb->sweeping, 0);
        STORE_RELAXED(&sb->sweep_pending, 1);
        pthread_mutex_consistent(&sb->pool_lock);
        rc = 0;
    }
    return rc;
}

static void pool_unlock(sf_superblock *sb) { pthread_mutex_unlock(&sb->pool_lock); }

/* Count the slots the free stack of `n` reaches, marking them in `mark` (n_slots bytes, zeroed)
 * if given. -1 if the walk meets a link out of the pool or a slot twice: the stack changed
 * under a walk that was not protected from that, or it is corrupt. */
static int64_t stack_walk(const region_view *r, sf_network *n, uint8_t *mark, uint64_t head)
{
    uint32_t *next = net_next(r, n), *chain = net_chain(r, n);
    uint32_t n_slots = n->n_slots;
    int64_t count = 0;
    uint32_t top1 = (uint32_t)(head & 0xffffffffu);
    while (top1) {
        if (top1 > n_slots || count >= n_slots)
            return -1;
        for (uint32_t s1 = top1; s1;) {
            if (s1 > n_slots || ++count > n_slots)
                return -1;
            uint32_t s = s1 - 1;
            if (mark) {
                if (mark[s])
                    return -1;
                mark[s] = 1;
            }
            s1 = LOAD_RELAXED(&next[s]);
        }
        top1 = LOAD_RELAXED(&chain[top1 - 1]);
    }
    return count;
}

/* With pool_lock held (so no reclaim, attach or other sweep runs): give back every slot that no
 * owner holds and the free stack does not reach, and correct free_count. Such slots exist only
 * after a node was killed inside a pool operation (cache_refill between its pop and its
 * tagging, cache_flush between untagging and its push, take_back between a reclaim_slot's
 * untag and push) or a reclaim was killed inside reclaim_slot.
 *
 * While slots move, a chain just popped or about to be pushed looks the same for an instant, so
 * the look is made with pool operations held off (`sweeping`, F5/F6): the sweep waits up to
 * SWEEP_HOLD_NS for those under way, then walks the stacks and scans the owner tables. Slots
 * found lost then stay lost (nobody reaches them), so they are pushed after operations resume.
 * Returns the slots given back, -1 if the sweep could not look undisturbed (a node stayed
 * inside an operation, or cancelled the sweep after waiting SWEEP_HOLD_NS: try again later),
 * -2 if a free stack is corrupt. */
static int64_t sweep_locked(region_view *r)
{
    sf_superblock *sb = r->sb;
    uint32_t n_nets = sb->n_networks < SF_MAX_NETWORKS ? sb->n_networks : SF_MAX_NETWORKS;
    uint32_t *found[SF_MAX_NETWORKS] = {0};
    uint32_t n_found[SF_MAX_NETWORKS] = {0};
    int64_t drift[SF_MAX_NETWORKS] = {0};
    int64_t result = 0;
    uint32_t id = sb->sweep_gen + 1;
    if (!id)
        id = 1;
    sb->sweep_gen = id;
    STORE_RELAXED(&sb->sweeping, id);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* F6 pairs with F5 */
    uint32_t hwm = LOAD_ACQUIRE(&sb->node_hwm); /* stable: attaches take pool_lock */
    uint64_t deadline = now_ns() + SWEEP_HOLD_NS;
    for (uint32_t i = 0; i < hwm && result == 0; i++) {
        while (LOAD_ACQUIRE(&node_at(r, i)->pool_ops) & 1) {
            if (now_ns() > deadline || LOAD_RELAXED(&sb->sweeping) != id) {
                result = -1;
                break;
            }
            CPU_RELAX();
        }
    }
    for (uint32_t ni = 0; ni < n_nets && result == 0; ni++) {
        sf_network *n = net_at(r, ni);
        uint8_t *mark = calloc(n->n_slots ? n->n_slots : 1, 1);
        found[ni] = malloc(sizeof(uint32_t) * (n->n_slots ? n->n_slots : 1));
        if (!mark || !found[ni]) {
            free(mark);
            result = -1;
            break;
        }
        int64_t on_stack = stack_walk(r, n, mark, LOAD_ACQUIRE(&n->free_head));
        if (on_stack < 0) {
            free(mark);
            result = -2; /* unless a cancelled sweep saw the stack move: checked below */
            break;
        }
        uint32_t *owner = net_owner(r, n);
        for (uint32_t s = 0; s < n->n_slots; s++)
            if (!mark[s] && !LOAD_RELAXED(&owner[s]))
                found[ni][n_found[ni]++] = s;
        /* a pop cut short before it counted its slots off left the count too high */
        drift[ni] = on_stack - LOAD_RELAXED(&n->free_count);
        free(mark);
    }
    /* Operations resume. The CAS fails if a node cancelled the sweep: then it may have moved
     * slots while we looked, and what we found is not to be trusted. */
    uint32_t exp = id;
    if (!__atomic_compare_exchange_n(&sb->sweeping, &exp, 0, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
        result = -1;
    else
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (uint32_t ni = 0; ni < n_nets; ni++) {
        if (result == 0) {
            sf_network *n = net_at(r, ni);
            uint32_t *next = net_next(r, n);
            uint32_t *f = found[ni];
            for (uint32_t at = 0; at < n_found[ni]; at += CHAIN_LEN) {
                uint32_t k = n_found[ni] - at < CHAIN_LEN ? n_found[ni] - at : CHAIN_LEN;
                for (uint32_t j = 0; j < k; j++) /* bottom first: f[at] ends the chain */
                    next[f[at + j]] = j ? f[at + j - 1] + 1 : 0;
                stack_push_chain(r, n, f[at + k - 1], k);
            }
            if (drift[ni])
                __atomic_fetch_add(&n->free_count, drift[ni], __ATOMIC_RELAXED);
        }
        free(found[ni]);
    }
    if (result == 0) {
        int64_t given = 0;
        for (uint32_t ni = 0; ni < n_nets; ni++)
            given += n_found[ni];
        STORE_RELAXED(&sb->sweep_pending, 0);
        __atomic_fetch_add(&sb->swept_slots, (uint64_t)given, __ATOMIC_RELAXED);
        __atomic_fetch_add(&sb->sweeps, 1, __ATOMIC_RELAXED);
        return given;
    }
    return result;
}

/* A node held off by a sweep (`sweeping` == s): wait for it to end, or cancel it after
 * SWEEP_HOLD_NS. Never blocks on a lock, so a sweeper stopped mid-way cannot stop traffic. */
static void __attribute__((noinline, cold)) sweep_wait(sf_superblock *sb, uint32_t s)
{
    uint64_t deadline = now_ns() + SWEEP_HOLD_NS;
    while (LOAD_ACQUIRE(&sb->sweeping) == s) {
        if (now_ns() > deadline) {
            uint32_t e = s;
            __atomic_compare_exchange_n(&sb->sweeping, &e, 0, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
            return;
        }
        sched_yield();
    }
}

/* The stamp a producer leaves in a descriptor's flags above SF_DESC_USER (see take_unpublished):
 * bits 1-3 the lap of ring index `index` (which time round the ring; past the published head an
 * entry is from this lap or the one before, so the low bits tell them apart), bits 4-15 the
 * low bits of the ring's consumer epoch when it was written (which incarnation of the
 * destination it was meant for). */
static inline uint16_t desc_stamp(uint32_t index, uint32_t ring_size, uint32_t epoch)
{
    return (uint16_t)((((index >> __builtin_ctz(ring_size)) & 0x7u) << 1) | ((epoch & 0xfffu) << 4));
}

/* Fill a descriptor past the ring head, then stamp it, then tag its slot for the destination, in
 * that order. The stamp (in `flags`) is what take_unpublished trusts: until it lands, the entry
 * is the previous lap's (its slot and len those of a frame consumed long ago, whose slot the
 * receiver may hold still, under its own tag), so the stamp must be the last field written; the
 * compiler merged slot and len into one store after flags before (a sender killed between them
 * made its reclaim free a slot the receiver held: a double free, found in CI). A sender killed
 * before the tag leaves a slot that is still its own (its owner scan frees it), never one tagged
 * for dst outside any ring. Compiler barriers are enough: the reclaim runs after this process is
 * gone. */
static inline void desc_put(sf_desc *d, uint32_t slot, uint16_t pool, uint16_t flags, uint32_t meta, uint32_t len,
                            uint32_t *owner, uint32_t dst_tag)
{
    d->slot = slot;
    d->pool = pool;
    d->meta = meta;
    d->len = len;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    STORE_RELAXED(&d->flags, flags);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    STORE_RELAXED(owner, dst_tag);
}

/* Drain every ring into node `idx` as if we were its consumer (it is dead or not yet up), freeing
 * slots still tagged with `tag`. Returns the number of slots freed. */
static uint64_t drain_inbound(region_view *r, uint32_t idx, uint32_t tag, bool mark_down)
{
    uint64_t freed = 0;
    uint32_t hwm = LOAD_ACQUIRE(&r->sb->node_hwm);
    for (uint32_t s = 0; s < hwm; s++) {
        sf_ring *g = ring_at(r, s, idx);
        if (mark_down) {
            uint32_t ep = LOAD_RELAXED(&g->down);
            if (!(ep & 1))
                STORE_RELEASE(&g->down, ep + 1); /* odd: down (a sender's publish CAS now fails) */
        }
        uint32_t head = LOAD_ACQUIRE(&g->head); /* A2 pairs with R1 */
        uint32_t tail = g->tail;
        if (sf_ring_count(head, tail) > r->sb->ring_size) /* garbage indices: no ring holds more */
            tail = head - r->sb->ring_size;
        for (; tail != head; tail++) {
            sf_desc *d = &g->desc[tail & (r->sb->ring_size - 1)];
            if (d->pool < r->sb->n_networks && d->slot < net_at(r, d->pool)->n_slots)
                freed += reclaim_slot(r, net_at(r, d->pool), d->slot, tag, NULL);
        }
        STORE_RELEASE(&g->tail, tail); /* R2 pairs with A1 */
    }
    return freed;
}

/* Free the frames a dead node wrote into its outbound rings but never published. A sender tags
 * each slot for the destination before it publishes the ring head; killed in between, those
 * slots belong to a live receiver that never sees them, and the dead node's owner scan does not
 * find them (their tag is the receiver's). A sender writes each descriptor, stamped with the
 * ring lap and the destination's epoch (desc_stamp), before it retags the slot; past the
 * published head, an entry of the current lap was written and not published (take_back gives
 * back the ones it took back). Only entries stamped with the epoch the ring still has (or, the
 * destination down, the one before) are freed: if the destination went away and came back since,
 * its own reclaim freed them (its owner scan), and the new incarnation may hold those slots now
 * under its own tag. Every entry of the lap is given back. Only the producer writes descriptors,
 * so receivers pay nothing for this. The node is dead or stopped (state RECLAIM): it writes past
 * that head again only if it resumes, and then its publish fails. */
static uint64_t take_unpublished(region_view *r, uint32_t idx)
{
    uint64_t freed = 0;
    uint32_t hwm = LOAD_ACQUIRE(&r->sb->node_hwm);
    uint32_t size = r->sb->ring_size;
    for (uint32_t dst = 0; dst < hwm; dst++) {
        sf_ring *g = ring_at(r, idx, dst);
        uint32_t head = LOAD_ACQUIRE(&g->head);
        uint32_t tail = LOAD_ACQUIRE(&g->tail);
        if (sf_ring_count(head, tail) > size) /* garbage indices */
            continue;
        /* The destination's tag, read between two reads of the epoch: equal, it is the tag of the
         * incarnation the epoch names (a reclaim bumps the epoch before it frees, and a claim
         * bumps the generation before the epoch goes even again). */
        uint32_t ep = __atomic_load_n(&g->down, __ATOMIC_SEQ_CST);
        uint32_t gen = __atomic_load_n(&node_at(r, dst)->gen, __ATOMIC_SEQ_CST);
        bool can_free = __atomic_load_n(&g->down, __ATOMIC_SEQ_CST) == ep;
        uint32_t stamp_ep = ep;
        if (can_free && (ep & 1)) {
            /* Down: the destination's reclaim ran (reclaims and claims hold the pool lock, as we
             * do). What it left tagged for it past this head was tagged after its owner scan, by
             * this sender, in the epoch before: orphans, freed here (leaked before). */
            stamp_ep = ep - 1;
        } else if (can_free) {
            /* Up: the epoch moves on by 2 (still up) so that this sender, if it is not dead but
             * stopped inside a send (reclaimed by its heartbeat from another pid namespace), fails
             * its publish when it resumes and takes back nothing (the entries are given back
             * below), instead of publishing entries whose slots are free again. */
            can_free = __atomic_compare_exchange_n(&g->down, &ep, ep + 2, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
        }
        uint32_t dst_tag = sf_owner_tag(dst, gen);
        uint32_t space = sf_ring_space(head, tail, size);
        for (uint32_t j = 0; j < space; j++) {
            sf_desc *d = &g->desc[(head + j) & (size - 1)];
            if (desc_given_back(d))
                continue; /* by take_back, or by an earlier run of this reclaim whose reclaimer
                           * died (the run is resumed) */
            if (!d->len)
                break; /* never written: the producer writes in order, nothing past it either */
            if ((d->flags & 0xeu) != (desc_stamp(head + j, size, 0) & 0xeu))
                break; /* an earlier lap: consumed */
            /* This lap's, so written and never published. Freed if meant for the incarnation
             * that still holds the id (else its reclaim freed it, and a new incarnation may hold
             * the slot now), and given back in any case: no stamped entry outlives this reclaim
             * (after 2,048 restarts of the destination its 12 epoch bits would match again).
             * The entry is given back before the slot is pushed: a rerun (this reclaimer killed)
             * must not find a stamped entry naming a slot already free, which the live
             * destination may have taken again under its own tag (a double free). Killed between
             * the untag and the push, the slot is nobody's and on no stack: the lock's
             * EOWNERDEAD makes a sweep pending, which gives it back. */
            if (can_free && (d->flags & ~SF_DESC_USER) == desc_stamp(head + j, size, stamp_ep) &&
                d->pool < r->sb->n_networks && d->slot < net_at(r, d->pool)->n_slots)
                freed += reclaim_slot(r, net_at(r, d->pool), d->slot, dst_tag, d);
            desc_give_back(d); /* (also when the slot was not ours to free) */
        }
    }
    return freed;
}

/* claim_node(name, network, pid, start_time, pidns) -> index or -1 when the table is full */
static PyObject *Region_claim_node(RegionObject *self, PyObject *args)
{
    const char *name;
    Py_ssize_t name_len;
    unsigned int network, pid;
    unsigned long long start_time, pidns;
    if (!PyArg_ParseTuple(args, "s#IIKK", &name, &name_len, &network, &pid, &start_time, &pidns))
        return NULL;
    region_view *r = &self->r;
    long claimed = -1;
    int rc;
    /* Under the pool lock: the drain below frees slots (no sweep may count them meanwhile), and
     * node_hwm grows only while no sweep is looking at the nodes below it. */
    Py_BEGIN_ALLOW_THREADS
    rc = pool_lock(r->sb, ATTACH_LOCK_NS);
    for (uint32_t i = 0; i < r->sb->max_nodes && rc == 0; i++) {
        sf_node *nd = node_at(r, i);
        uint32_t exp = SF_NODE_FREE;
        if (!__atomic_compare_exchange_n(&nd->state, &exp, SF_NODE_ATTACHING, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            continue;
        uint32_t hwm = LOAD_RELAXED(&r->sb->node_hwm);
        while (hwm < i + 1 && !__atomic_compare_exchange_n(&r->sb->node_hwm, &hwm, i + 1, true, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            ;
        uint32_t old_tag = sf_owner_tag(i, nd->gen);
        /* A late sender of the previous incarnation may have left frames in our inbound rings
         * after its reclaim: free those still tagged for it, drop the rest. One may also have
         * tagged slots for it after its reclaim's owner scan and died (or been taken back) before
         * publishing them, while the ring was down: nothing else would ever free those. No live
         * holder is left for that tag (a sender's publish to it fails: the epoch moved on, and its
         * take_back's CAS finds them free), so every slot still carrying it is given back. */
        drain_inbound(r, i, old_tag, false);
        for (uint32_t ni = 0; ni < r->sb->n_networks; ni++) {
            sf_network *n = net_at(r, ni);
            uint32_t *owner = net_owner(r, n);
            for (uint32_t sl = 0; sl < n->n_slots; sl++)
                if (LOAD_RELAXED(&owner[sl]) == old_tag)
                    reclaim_slot(r, n, sl, old_tag, NULL);
        }
        /* The generation moves before the epochs go even below (take_unpublished reads gen
         * between two reads of an epoch and trusts that order). */
        STORE_RELAXED(&nd->gen, nd->gen + 1);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        nd->pid = pid;
        nd->network = network;
        nd->start_time = start_time;
        nd->pidns = pidns;
        nd->heartbeat_ns = now_ns();
        memset(nd->name, 0, SF_NAME_LEN);
        memcpy(nd->name, name, name_len < SF_NAME_LEN - 1 ? name_len : SF_NAME_LEN - 1);
        /* no thread of ours waits yet; the tag makes a late thread of an earlier incarnation
         * (stopped while it waited, reclaimed, resumed now) unable to move the count */
        STORE_RELAXED(&nd->waiting, (uint32_t)(nd->gen << 16));
        nd->tx_frames = nd->tx_bytes = nd->rx_frames = nd->rx_bytes = 0;
        nd->tx_ring_full = nd->tx_drops = nd->rx_lapped = nd->tape_rx = nd->tape_tx = nd->wakeups = nd->tx_nobuf = 0;
        nd->rx_bad = 0;
        memset(nd->cached, 0, sizeof nd->cached);
        nd->mcast_mask = 0;
        for (uint32_t d = 0; d < r->sb->max_nodes; d++) {
            sf_ring *g = ring_at(r, d, i);
            uint32_t ep = LOAD_RELAXED(&g->down);
            if (ep & 1)
                STORE_RELAXED(&g->down, ep + 1); /* even again: up, in a new epoch */
        }
        if (nd->pool_ops & 1) { /* left odd by an incarnation nobody reclaimed: even again */
            nd->pool_ops += 1;
            STORE_RELAXED(&r->sb->sweep_pending, 1);
        }
        STORE_RELEASE(&nd->state, SF_NODE_UP);
        claimed = (long)i;
        break;
    }
    if (rc == 0)
        pool_unlock(r->sb);
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_Format(FabricError, "the fabric's pool lock was held for %lld s (a process stopped or stuck while it "
                     "reclaimed a node or swept the pools; find it with `fuser` on the region file)",
                     ATTACH_LOCK_NS / 1000000000LL);
        return NULL;
    }
    return PyLong_FromLong(claimed);
}

/* reclaim(index, from_state, gen) -> slots returned to the pools, or -1 if the entry is no longer
 * in from_state with generation gen (another node won the race, or a new node took the slot).
 * Marks every ring into the node down, drains them and returns every slot the node owned.
 *
 * from_state may be RECLAIM: a reclaim whose process died half-way (killed, or its machine
 * stopped it for good) left the entry in RECLAIM. Every step below is idempotent (rings already
 * down stay down, reclaim_slot frees a slot only while it still carries the dead node's tag,
 * take_unpublished clears what it gave back), so the reclaim is simply run again. It is safe to
 * resume only because a reclaim runs entirely under the pool lock, RECLAIM included: whoever
 * holds the lock and still finds an entry in RECLAIM knows its reclaimer is gone (the robust
 * lock came back EOWNERDEAD, which also schedules a sweep for a slot it untagged and did not
 * push). No pid or start time of the reclaimer needs recording. */
static PyObject *Region_reclaim(RegionObject *self, PyObject *args)
{
    unsigned int idx, from_state, gen;
    if (!PyArg_ParseTuple(args, "III", &idx, &from_state, &gen))
        return NULL;
    region_view *r = &self->r;
    if (idx >= r->sb->max_nodes) {
        PyErr_SetString(PyExc_IndexError, "node index out of range");
        return NULL;
    }
    sf_node *nd = node_at(r, idx);
    /* state and gen in one CAS: the caller judged incarnation `gen` dead; if a new node has
     * claimed the slot since (gen moved on), leave it alone */
    uint64_t exp = ((uint64_t)gen << 32) | from_state;
    uint64_t nw = ((uint64_t)gen << 32) | SF_NODE_RECLAIM;
    int64_t freed = 0;
    bool lost = false, busy = false;
    Py_BEGIN_ALLOW_THREADS
    int locked = pool_lock(r->sb, RECLAIM_LOCK_NS) == 0;
    if (!locked) { /* a sweep or another reclaim holds it (or a process stopped holding it) */
        busy = true;
        goto out;
    }
    if (!__atomic_compare_exchange_n(&nd->state_gen, &exp, nw, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
        lost = true;
        goto out;
    }
    /* killed inside a pool operation: slots may be on no stack and in no owner's hands */
    uint32_t ops = LOAD_ACQUIRE(&nd->pool_ops);
    if (ops & 1) {
        STORE_RELAXED(&r->sb->sweep_pending, 1);
        STORE_RELEASE(&nd->pool_ops, ops + 1);
    }
    uint32_t tag = sf_owner_tag(idx, nd->gen);
    freed += drain_inbound(r, idx, tag, true);
    freed += take_unpublished(r, idx);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* F4 pairs with F1: `down` is set before the owner scan */
    for (uint32_t ni = 0; ni < r->sb->n_networks; ni++) {
        sf_network *n = net_at(r, ni);
        uint32_t *owner = net_owner(r, n);
        for (uint32_t s = 0; s < n->n_slots; s++)
            if (LOAD_RELAXED(&owner[s]) == tag)
                freed += reclaim_slot(r, n, s, tag, NULL);
        STORE_RELAXED(&nd->cached[ni], 0);
    }
    STORE_RELEASE(&nd->state, SF_NODE_FREE);
    if (LOAD_RELAXED(&r->sb->sweep_pending)) {
        int64_t swept = sweep_locked(r);
        if (swept > 0) /* -1/-2: still pending; the next reclaim or sweep() tries again */
            freed += swept;
    }
out:
    if (locked)
        pool_unlock(r->sb);
    Py_END_ALLOW_THREADS
    if (lost)
        return PyLong_FromLong(-1);
    if (busy)
        return PyLong_FromLong(-2);
    return PyLong_FromLongLong(freed);
}

/* sweep(force=False) -> slots given back (0 if none were lost), or -1 if it could not look
 * undisturbed (a node stayed inside a pool operation, or a reclaim holds the lock: try again).
 * Without force it sweeps only when slots may be lost: a reclaim found a node killed inside a
 * pool operation (and the sweep it ran then could not finish), or a holder of the pool lock died. */
static PyObject *Region_sweep(RegionObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"force", NULL};
    int force = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kwlist, &force))
        return NULL;
    region_view *r = &self->r;
    int64_t got;
    Py_BEGIN_ALLOW_THREADS
    /* Tried even when nothing is pending: taking a lock whose holder died (a sweeper killed
     * among its pushes, with no node of its own whose reclaim would notice) makes it pending. */
    if (pool_lock(r->sb, 0) == 0) {
        got = force || LOAD_RELAXED(&r->sb->sweep_pending) ? sweep_locked(r) : 0;
        pool_unlock(r->sb);
    } else { /* busy: a reclaim or another sweep runs */
        got = force || LOAD_RELAXED(&r->sb->sweep_pending) ? -1 : 0;
    }
    Py_END_ALLOW_THREADS
    if (got == -2) {
        PyErr_SetString(FabricError, "a pool's free stack is corrupt (a link leaves the pool or meets a slot twice); "
                                     "stop every node and re-create the fabric");
        return NULL;
    }
    return PyLong_FromLongLong(got);
}

/* The network named by a method's one argument (its index), or NULL with IndexError set. */
static sf_network *network_arg(RegionObject *self, PyObject *args)
{
    unsigned int ni;
    if (!PyArg_ParseTuple(args, "I", &ni))
        return NULL;
    if (ni >= self->r.sb->n_networks) {
        PyErr_SetString(PyExc_IndexError, "network index out of range");
        return NULL;
    }
    return net_at(&self->r, ni);
}

/* stack_walk(network) -> slots the free stack reaches, or -1 if the walk met a bad link (the
 * stack changed under it: only meaningful while no node moves slots, e.g. in tests). */
static PyObject *Region_stack_walk(RegionObject *self, PyObject *args)
{
    region_view *r = &self->r;
    sf_network *n = network_arg(self, args);
    if (!n)
        return NULL;
    uint8_t *mark = calloc(n->n_slots ? n->n_slots : 1, 1);
    if (!mark)
        return PyErr_NoMemory();
    int64_t got = stack_walk(r, n, mark, LOAD_ACQUIRE(&n->free_head));
    free(mark);
    return PyLong_FromLongLong(got);
}

/* pool_audit(network) -> (n_slots, stack_count, {owner_tag: count}) by scanning the owner table */
static PyObject *Region_pool_audit(RegionObject *self, PyObject *args)
{
    region_view *r = &self->r;
    sf_network *n = network_arg(self, args);
    if (!n)
        return NULL;
    uint32_t *owner = net_owner(r, n);
    PyObject *owners = PyDict_New();
    if (!owners)
        return NULL;
    for (uint32_t s = 0; s < n->n_slots; s++) {
        uint32_t o = LOAD_RELAXED(&owner[s]);
        PyObject *k = PyLong_FromUnsignedLong(o);
        PyObject *v = PyDict_GetItemWithError(owners, k);
        long c = v ? PyLong_AsLong(v) + 1 : 1;
        PyObject *cv = PyLong_FromLong(c);
        PyDict_SetItem(owners, k, cv);
        Py_DECREF(k);
        Py_DECREF(cv);
    }
    return Py_BuildValue("(ILN)", n->n_slots, (long long)LOAD_RELAXED(&n->free_count), owners);
}

/* ring_stats(src, dst) -> (head, tail, down, enq_frames, deq_frames, full_events) */
static PyObject *Region_ring_stats(RegionObject *self, PyObject *args)
{
    unsigned int s, d;
    if (!PyArg_ParseTuple(args, "II", &s, &d))
        return NULL;
    if (s >= self->r.sb->max_nodes || d >= self->r.sb->max_nodes) {
        PyErr_SetString(PyExc_IndexError, "node index out of range");
        return NULL;
    }
    sf_ring *g = ring_at(&self->r, s, d);
    return Py_BuildValue("(IIIKKK)", LOAD_ACQUIRE(&g->head), LOAD_ACQUIRE(&g->tail), LOAD_RELAXED(&g->down) & 1u,
                         (unsigned long long)LOAD_RELAXED(&g->enq_frames), (unsigned long long)LOAD_RELAXED(&g->deq_frames),
                         (unsigned long long)LOAD_RELAXED(&g->full_events));
}

/* node_state(index) -> state, read with acquire */
static PyObject *Region_node_state(RegionObject *self, PyObject *arg)
{
    unsigned long i = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (i >= self->r.sb->max_nodes) {
        PyErr_SetString(PyExc_IndexError, "node index out of range");
        return NULL;
    }
    return PyLong_FromUnsignedLong(LOAD_ACQUIRE(&node_at(&self->r, (uint32_t)i)->state));
}

/* set_node_state(index, expected, new) -> bool (CAS) */
static PyObject *Region_cas_node_state(RegionObject *self, PyObject *args)
{
    unsigned int i, exp, nw;
    if (!PyArg_ParseTuple(args, "III", &i, &exp, &nw))
        return NULL;
    if (i >= self->r.sb->max_nodes) {
        PyErr_SetString(PyExc_IndexError, "node index out of range");
        return NULL;
    }
    uint32_t e = exp;
    bool ok = __atomic_compare_exchange_n(&node_at(&self->r, i)->state, &e, nw, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    return PyBool_FromLong(ok);
}

static PyObject *Region_wake_all(RegionObject *self, PyObject *noargs);

static PyMethodDef Region_methods[] = {
    {"format", (PyCFunction)Region_format, METH_NOARGS, "Initialise pools and tape locks of a new region."},
    {"claim_node", (PyCFunction)Region_claim_node, METH_VARARGS, "Claim a free node entry; -1 if full."},
    {"reclaim", (PyCFunction)Region_reclaim, METH_VARARGS, "Return a dead node's slots (index, state, gen); -1 if lost the race."},
    {"pool_audit", (PyCFunction)Region_pool_audit, METH_VARARGS, "Count slots per owner tag."},
    {"sweep", (PyCFunction)(void (*)(void))Region_sweep, METH_VARARGS | METH_KEYWORDS,
     "Give back slots lost by a node killed inside a pool operation; -1 if busy."},
    {"stack_walk", (PyCFunction)Region_stack_walk, METH_VARARGS, "Slots the free stack reaches (-1: bad link)."},
    {"ring_stats", (PyCFunction)Region_ring_stats, METH_VARARGS, "Indices and counters of ring src->dst."},
    {"node_state", (PyCFunction)Region_node_state, METH_O, "State of a node entry."},
    {"cas_node_state", (PyCFunction)Region_cas_node_state, METH_VARARGS, "Compare-and-set a node state."},
    {"wake_all", (PyCFunction)Region_wake_all, METH_NOARGS, "Ring every node's doorbell."},
    {NULL}};

static PyTypeObject Region_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmfabric.core._fabric.Region",
    .tp_basicsize = sizeof(RegionObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Region_init,
    .tp_dealloc = (destructor)Region_dealloc,
    .tp_methods = Region_methods,
    .tp_doc = "A mapped shmfabric region (validated by shmfabric.core.region first).",
};

static inline void ring_doorbell(sf_node *nd)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* F1 pairs with F2 */
    if (LOAD_RELAXED(&nd->waiting) & SF_WAITING_COUNT) {
        __atomic_fetch_add(&nd->doorbell, 1, __ATOMIC_RELEASE);
        futex_wake(&nd->doorbell, INT_MAX);
    }
}

static PyObject *Region_wake_all(RegionObject *self, PyObject *noargs)
{
    uint32_t hwm = LOAD_ACQUIRE(&self->r.sb->node_hwm);
    for (uint32_t i = 0; i < hwm; i++) {
        sf_node *nd = node_at(&self->r, i);
        __atomic_fetch_add(&nd->doorbell, 1, __ATOMIC_RELEASE);
        futex_wake(&nd->doorbell, INT_MAX);
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------ */
/* Port: one attached node's private handle; the hot path                                     */

enum { WAIT_POLL = 0, WAIT_BLOCK = 1, WAIT_ADAPTIVE = 2 };

typedef struct {
    PyObject_HEAD
    RegionObject *region;
    region_view r;
    sf_node *me;
    uint32_t index, tag, network;
    uint32_t *cache[SF_MAX_NETWORKS];
    uint32_t ncache[SF_MAX_NETWORKS];
    uint32_t cache_hi[SF_MAX_NETWORKS]; /* most slots the cache may hold (its share of the pool) */
    uint64_t *tape_cursor; /* 1 + n_mcast */
    uint32_t rr;           /* first ring to look at next time, for fairness */
    uint32_t crr;          /* ... and for recv_control, which stops at its limit too */
    int wait_mode;
    int64_t spin_ns;
    int closed;
    /* fileno() support: a notifier thread turns the futex doorbell into an eventfd */
    int efd;
    pthread_t notifier;
    int notifier_on;
    uint32_t notifier_stop;
    uint32_t signalled; /* process-private futex word: 1 while efd is readable */
    uint8_t mac[6];
    unsigned long fork_gen; /* fork_gen of the process that attached */
    uint32_t ops;           /* our copy of me->pool_ops (only we write it) */
    /* Set (with the GIL held) first thing when the port closes; a thread waiting without the GIL
     * (port_wait, a tape lock) watches it and leaves. */
    uint32_t closing;
    /* Threads inside a wait with the GIL released that still use the node entry (port_wait's
     * `waiting` count, a tape write). port_close waits for them to leave before the entry can be
     * reclaimed, so none of them ever touches the entry of a later incarnation. */
    uint32_t inflight;
    uint64_t state_gen;     /* our entry's state_gen while it is ours: UP | gen << 32 */
    uint32_t wait_tag;      /* our incarnation's tag in the entry's `waiting` word (gen << 16) */
    Py_ssize_t exports;     /* memoryviews of this port's buffers and frames alive (detach waits) */
    int sealed;             /* a detach is under way: no new memoryview (seal(), then close()) */
    uint64_t mcast_valid;   /* bits of the multicast groups that exist (1 << n_mcast) - 1 */
} PortObject;

static PyTypeObject Port_Type;

/* A port belongs to the process that attached it. A child forked afterwards inherits the handle
 * but not the right to use it: each ring has one producer, and the private slot cache, the open
 * batches and the wake-up thread are the parent's. fork_gen changes in every child (atfork), so
 * an inherited port is recognised with one load, and the child neither sends through it nor,
 * when it exits, gives the parent's slots back or detaches it. */
static unsigned long fork_gen;
static void on_fork_child(void) { fork_gen++; }
static inline int port_foreign(const PortObject *p) { return p->fork_gen != fork_gen; }
#define FORKED_MSG "this node was attached by the parent process; a forked child must attach its own node"
#define RECLAIMED_MSG "this node was reclaimed while it was stopped or unresponsive (its heartbeat went stale); " \
                      "its slots went back to the pools and its id may belong to another node now: attach again"

/* Our entry still holds our incarnation. A node in another pid namespace is judged by its
 * heartbeat alone, so one stopped (SIGSTOP, a debugger, a frozen container) for longer than the
 * liveness limit is reclaimed while it still runs; when it resumes, this one load (the state and
 * generation share a word; a reclaim CASes it) tells every hot-path entry that the entry, the
 * slots of its cache and its rings are not its own any more. Acquire: pairs with the reclaim's
 * CAS, so what we do next is ordered after seeing it. */
static inline int port_alive(const PortObject *p) { return LOAD_ACQUIRE(&p->me->state_gen) == p->state_gen; }

/* For a thread that waits without the GIL: the port is closing, or its entry is not ours any
 * more. Checked after every wake-up, before the entry or its rings are used again. */
static inline int port_gone(const PortObject *p) { return LOAD_ACQUIRE(&p->closing) || !port_alive(p); }

/* The entry was reclaimed under us (called with the GIL): forget the cached slots without giving
 * them back (the reclaim's owner scan already freed them, and others may hold them now) and
 * close (closed = 2: later calls raise NodeReclaimedError). Our threads asleep on the doorbell are
 * woken so they see it now, not at the end of their slice (the doorbell may be another
 * incarnation's by now: it gets a spurious wake-up, which it checks and ignores). */
static void __attribute__((cold)) port_mark_reclaimed(PortObject *p)
{
    for (int i = 0; i < SF_MAX_NETWORKS; i++)
        p->ncache[i] = 0;
    STORE_RELEASE(&p->closing, 1);
    p->closed = 2;
    if (LOAD_ACQUIRE(&p->inflight) || p->notifier_on) {
        __atomic_fetch_add(&p->me->doorbell, 1, __ATOMIC_RELEASE);
        futex_wake(&p->me->doorbell, INT_MAX);
    }
}

/* Count this thread in the entry's `waiting` (it may sleep on the doorbell), or not: 0 if the word
 * no longer carries our incarnation's tag (the entry was claimed again after a reclaim: its count
 * is another node's) or the count is full. One CAS, so the check and the change are one step:
 * a thread stopped between them and resumed after a new claim finds the word changed and
 * retries against the new tag, which never matches. Relaxed, as the fetch_add it replaces: the
 * caller's fence F2 orders it before its look at the rings. */
static inline int waiting_enter(PortObject *p)
{
    uint32_t w = LOAD_RELAXED(&p->me->waiting);
    do {
        if ((w & ~SF_WAITING_COUNT) != p->wait_tag || (w & SF_WAITING_COUNT) == SF_WAITING_COUNT)
            return 0;
    } while (!__atomic_compare_exchange_n(&p->me->waiting, &w, w + 1, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return 1;
}

/* Undo waiting_enter, only on our incarnation's count (never below zero). Between a reclaim and
 * the next claim the word still has our tag: a decrement then is harmless (the claim rewrites
 * the word). */
static inline void waiting_leave(PortObject *p)
{
    uint32_t w = LOAD_RELAXED(&p->me->waiting);
    do {
        if ((w & ~SF_WAITING_COUNT) != p->wait_tag || !(w & SF_WAITING_COUNT))
            return;
    } while (!__atomic_compare_exchange_n(&p->me->waiting, &w, w - 1, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
}

static inline sf_network *port_net(PortObject *p, uint32_t pool) { return net_at(&p->r, pool); }

static inline void publish_cached(PortObject *p, uint32_t pool) { STORE_RELAXED(&p->me->cached[pool], p->ncache[pool]); }

/* Mark this node inside a pool operation (pool_ops odd), unless a sweep is looking for lost
 * slots: then stay out until it is done, or cancel it after SWEEP_HOLD_NS (sweep_wait). A sweep
 * is rare: only after a node was killed inside such an operation. Costs one fence per chain of
 * slots. */
static inline void pool_enter(PortObject *p)
{
    sf_superblock *sb = p->r.sb;
    for (;;) {
        STORE_RELAXED(&p->me->pool_ops, ++p->ops);
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* F5 pairs with F6 */
        uint32_t s = LOAD_ACQUIRE(&sb->sweeping); /* pairs with the sweeper's CAS back to 0 */
        if (__builtin_expect(!s, 1))
            return;
        STORE_RELEASE(&p->me->pool_ops, ++p->ops);
        sweep_wait(sb, s);
    }
}

static inline void pool_exit(PortObject *p) { STORE_RELEASE(&p->me->pool_ops, ++p->ops); }

/* Refill the private cache from the shared stack (one chain). Returns false if the pool is dry. */
static bool cache_refill(PortObject *p, uint32_t pool)
{
    region_view *r = &p->r;
    sf_network *n = port_net(p, pool);
    pool_enter(p);
    uint32_t top1 = stack_pop_chain(r, n);
    if (!top1) {
        pool_exit(p);
        return false;
    }
    uint32_t *next = net_next(r, n), *owner = net_owner(r, n);
    uint32_t s1 = top1, count = 0;
    /* Links are slot+1 and never above n_slots; one that is (a corrupt region) ends the chain
     * here, so no walk ever leaves the pool. */
    uint32_t n_slots = n->n_slots;
    while (s1 && p->ncache[pool] < p->cache_hi[pool]) {
        uint32_t s = s1 - 1;
        s1 = next[s];
        if (s1 > n_slots)
            s1 = 0;
        STORE_RELAXED(&owner[s], p->tag);
        p->cache[pool][p->ncache[pool]++] = s;
        count++;
    }
    uint32_t rest = 0;
    if (s1) { /* the chain is longer than the cache's share of a small pool: give the rest back */
        for (uint32_t x = s1; x && x <= n_slots && rest < n_slots; x = next[x - 1])
            rest++;
        stack_push_chain(r, n, s1 - 1, rest); /* counts `rest` back into free_count */
    }
    /* the pop took count + rest slots off the stack; the push above returned `rest` */
    __atomic_fetch_sub(&n->free_count, (int64_t)(count + rest), __ATOMIC_RELAXED);
    pool_exit(p);
    publish_cached(p, pool);
    return true;
}

/* Give `count` slots from the cache's end back to the shared stack as chains. */
static void cache_flush(PortObject *p, uint32_t pool, uint32_t count)
{
    region_view *r = &p->r;
    sf_network *n = port_net(p, pool);
    uint32_t *next = net_next(r, n), *owner = net_owner(r, n);
    pool_enter(p);
    while (count) {
        uint32_t k = count < CHAIN_LEN ? count : CHAIN_LEN;
        uint32_t *src = &p->cache[pool][p->ncache[pool] - k];
        for (uint32_t j = 0; j < k; j++) {
            next[src[j]] = (j + 1 < k) ? src[j + 1] + 1 : 0;
            STORE_RELAXED(&owner[src[j]], 0);
        }
        stack_push_chain(r, n, src[0], k);
        p->ncache[pool] -= k;
        count -= k;
    }
    pool_exit(p);
    publish_cached(p, pool);
}

static inline bool slot_get(PortObject *p, uint32_t pool, uint32_t *slot)
{
    if (!p->ncache[pool] && !cache_refill(p, pool))
        return false;
    *slot = p->cache[pool][--p->ncache[pool]];
    return true;
}

static inline void slot_put(PortObject *p, uint32_t pool, uint32_t slot)
{
    if (p->ncache[pool] >= p->cache_hi[pool])
        cache_flush(p, pool, p->ncache[pool] - p->cache_hi[pool] / 2);
    p->cache[pool][p->ncache[pool]++] = slot;
}

static void make_mac(uint8_t *mac, uint32_t index)
{
    /* locally administered unicast: 02:73:66 ("sf") : 00 : index */
    mac[0] = 0x02; mac[1] = 0x73; mac[2] = 0x66; mac[3] = 0x00;
    mac[4] = (uint8_t)(index >> 8); mac[5] = (uint8_t)index;
}

static inline void write_header(uint8_t *f, const uint8_t *dst, const uint8_t *src, uint16_t ethertype)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    f[12] = (uint8_t)(ethertype >> 8);
    f[13] = (uint8_t)ethertype;
}

static int Port_init(PortObject *self, PyObject *args, PyObject *kw)
{
    RegionObject *region;
    unsigned int index;
    if (!PyArg_ParseTuple(args, "O!I", &Region_Type, &region, &index))
        return -1;
    Py_INCREF(region);
    self->region = region;
    self->r = region->r;
    self->efd = -1;
    if (index >= self->r.sb->max_nodes) {
        PyErr_SetString(PyExc_IndexError, "node index out of range");
        return -1;
    }
    self->index = index;
    self->me = node_at(&self->r, index);
    if (LOAD_ACQUIRE(&self->me->state) != SF_NODE_UP) {
        PyErr_SetString(FabricError, "node entry is not up (claim it first)");
        return -1;
    }
    self->tag = sf_owner_tag(index, self->me->gen);
    self->state_gen = ((uint64_t)self->me->gen << 32) | SF_NODE_UP;
    self->wait_tag = (uint32_t)(self->me->gen << 16);
    /* n_mcast is at most 64 (validated when the region was opened); the bits past it name
     * tapes that do not exist, and tape_cursor has no room for them */
    self->mcast_valid = self->r.sb->n_mcast >= 64 ? ~0ull : (1ull << self->r.sb->n_mcast) - 1;
    self->network = self->me->network;
    self->ops = LOAD_RELAXED(&self->me->pool_ops) & ~1u; /* even: claim_node made it so */
    for (uint32_t i = 0; i < self->r.sb->n_networks && i < SF_MAX_NETWORKS; i++) {
        self->cache[i] = PyMem_Malloc(sizeof(uint32_t) * CACHE_CAP);
        if (!self->cache[i]) {
            PyErr_NoMemory();
            return -1;
        }
        /* A cache never keeps more than its share of the pool: a node that only receives puts
         * every slot it frees into its cache, and with a fixed CACHE_CAP it would end up holding
         * all of a small pool while every sender finds the shared stack empty. */
        uint32_t share = net_at(&self->r, i)->n_slots / (2 * self->r.sb->max_nodes);
        self->cache_hi[i] = share < 2 ? 2 : share > CACHE_CAP ? CACHE_CAP : share;
    }
    uint32_t ntapes = 1 + self->r.sb->n_mcast;
    self->tape_cursor = PyMem_Malloc(sizeof(uint64_t) * ntapes);
    if (!self->tape_cursor) {
        PyErr_NoMemory();
        return -1;
    }
    for (uint32_t t = 0; t < ntapes; t++)
        self->tape_cursor[t] = LOAD_ACQUIRE(&tape_at(&self->r, t)->head); /* start at "now" */
    self->wait_mode = WAIT_ADAPTIVE;
    self->fork_gen = fork_gen;
    self->spin_ns = 50000;
    make_mac(self->mac, index);
    return 0;
}

static void port_stop_notifier(PortObject *p);

/* Give every cached slot back; called on close (with the GIL held). */
static void port_close(PortObject *p)
{
    STORE_RELEASE(&p->closing, 1);
    if (port_foreign(p)) { /* an inherited handle: the slots in its cache are the parent's */
        port_stop_notifier(p);
        if (!p->closed)
            p->closed = 1;
        return;
    }
    /* Threads of ours blocked in a receive or a tape lock: wake them (they watch `closing`) and
     * wait until they have left, so that none of them touches the entry (its `waiting` count,
     * a counter) after the reclaim that follows a detach, when another node may own it. Each
     * leaves within a few microseconds of the wake-up: port_wait checks `closing` before and
     * after every sleep, a tape lock waits in slices of TAPE_SLICE_NS. A port already closed
     * because its entry was reclaimed under it (closed == 2) waits for them too: when close
     * returns, no thread of ours is inside the port any more. */
    if (LOAD_ACQUIRE(&p->inflight)) {
        Py_BEGIN_ALLOW_THREADS
        while (LOAD_ACQUIRE(&p->inflight)) { /* pairs with the waiter's release decrement */
            __atomic_fetch_add(&p->me->doorbell, 1, __ATOMIC_RELEASE);
            futex_wake(&p->me->doorbell, INT_MAX);
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
        Py_END_ALLOW_THREADS
    }
    port_stop_notifier(p);
    if (p->closed)
        return;
    if (!port_alive(p)) { /* reclaimed while we were away: the cached slots are not ours */
        port_mark_reclaimed(p);
        return;
    }
    for (uint32_t i = 0; i < p->r.sb->n_networks && i < SF_MAX_NETWORKS; i++)
        if (p->cache[i] && p->ncache[i])
            cache_flush(p, i, p->ncache[i]);
    p->closed = 1;
}

static void Port_dealloc(PortObject *self)
{
    if (self->region && !self->closed && self->me && LOAD_ACQUIRE(&self->me->state) == SF_NODE_UP)
        port_close(self);
    else
        port_stop_notifier(self);
    for (int i = 0; i < SF_MAX_NETWORKS; i++)
        PyMem_Free(self->cache[i]);
    PyMem_Free(self->tape_cursor);
    Py_XDECREF(self->region);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Why a port cannot be used (sets the exception); the cold half of CHECK_OPEN. */
static void __attribute__((noinline, cold)) port_refuse(PortObject *p)
{
    if (p->closing) {
        PyErr_SetString(p->closed == 2 ? NodeReclaimedError : FabricError,
                        p->closed == 2 ? RECLAIMED_MSG : "node is detached");
    } else if (port_foreign(p)) {
        PyErr_SetString(FabricError, FORKED_MSG);
    } else { /* reclaimed: see port_alive */
        port_mark_reclaimed(p); /* remembered (closed = 2), so later calls say why too */
        port_stop_notifier(p);
        PyErr_SetString(NodeReclaimedError, RECLAIMED_MSG);
    }
}

#define CHECK_OPEN(p)                                                                   \
    do {                                                                                \
        if (__builtin_expect((p)->closing || port_foreign(p) || !port_alive(p), 0)) {  \
            port_refuse(p);                                                             \
            return NULL;                                                                \
        }                                                                               \
    } while (0)

/* For paths that give slots back without raising (a batch released, a buffer dropped): false
 * if the port is closed, inherited, or its entry was reclaimed (then it is marked so). */
static inline int port_usable(PortObject *p)
{
    if (p->closing || port_foreign(p))
        return 0;
    if (__builtin_expect(!port_alive(p), 0)) {
        port_mark_reclaimed(p);
        return 0;
    }
    return 1;
}

/* Look up a unicast destination; sets an exception and returns NULL if it cannot take frames.
 * *epoch is the ring's consumer epoch, which finish_send's publish requires unchanged. */
static sf_ring *dest_ring(PortObject *p, long long dst, uint32_t want, uint32_t *dst_tag, uint32_t *epoch)
{
    /* compared as a 64-bit value: a cast to uint32_t first would send id 2^32 + k to node k */
    if (dst < 0 || (unsigned long long)dst >= p->r.sb->max_nodes) {
        PyErr_Format(RingDownError, "unknown destination node %lld (valid ids are 0..%u)", dst, p->r.sb->max_nodes - 1);
        return NULL;
    }
    sf_node *d = node_at(&p->r, (uint32_t)dst);
    sf_ring *g = ring_at(&p->r, p->index, (uint32_t)dst);
    uint32_t ep = LOAD_ACQUIRE(&g->down);
    if (LOAD_ACQUIRE(&d->state) != SF_NODE_UP || (ep & 1)) {
        p->me->tx_drops++;
        PyErr_Format(RingDownError, "destination node %lld is not attached (down or never up)", dst);
        return NULL;
    }
    uint32_t gen = LOAD_RELAXED(&d->gen);
    if (want && gen != want) {
        /* The sender named the incarnation it resolved (`incarnation=`), and another one holds
         * the id now: maybe another node (a restart order can swap ids). */
        p->me->tx_drops++;
        PyErr_Format(RingDownError, "destination node %lld is another incarnation now (%u, not %u): "
                     "resolve its name again", dst, gen, want);
        return NULL;
    }
    *dst_tag = sf_owner_tag((uint32_t)dst, gen);
    *epoch = ep;
    return g;
}

/* Give back frames that were written into ring `g` at `head` but will not be consumed: free the
 * slots still tagged for the destination (a reclaim may have freed some already: its CAS wins). */
static void take_back(PortObject *p, sf_ring *g, uint32_t head, uint32_t n, uint32_t dst_tag)
{
    uint32_t mask = p->r.sb->ring_size - 1;
    pool_enter(p);
    for (uint32_t j = 0; j < n; j++) {
        sf_desc *d = &g->desc[(head + j) & mask];
        /* given back already (we were stopped inside this send and reclaimed meanwhile: the
         * reclaim gave these entries back), or not a slot: nothing to free */
        if (!desc_given_back(d) && d->pool < p->r.sb->n_networks && d->slot < net_at(&p->r, d->pool)->n_slots)
            reclaim_slot(&p->r, net_at(&p->r, d->pool), d->slot, dst_tag, NULL);
        desc_give_back(d); /* not a frame waiting to be published (take_unpublished) */
    }
    pool_exit(p);
    STORE_RELAXED(&p->me->tx_drops, p->me->tx_drops + n);
}

/* Publish n frames at head; `full` frames were refused for lack of ring space (only those count as
 * ring-full: an empty pool, an oversized frame or a bad item is counted elsewhere or raised). */
static inline void finish_send(PortObject *p, sf_ring *g, uint32_t head, uint32_t n, uint32_t full, uint64_t bytes, long long dst,
                               uint32_t dst_tag, uint32_t epoch)
{
    if (n) {
        /* R1 pairs with A2. A CAS of head and the consumer epoch together, not a plain store: if
         * the destination died (and maybe a new node took its slot) since dest_ring, the reclaim
         * may have freed our slots, and publishing would hand them to the new node. */
        uint64_t want = ((uint64_t)epoch << 32) | head;
        uint64_t next = ((uint64_t)epoch << 32) | (uint32_t)(head + n);
        if (__builtin_expect(!__atomic_compare_exchange_n(&g->head_down, &want, next, false, __ATOMIC_RELEASE,
                                                          __ATOMIC_RELAXED), 0)) {
            take_back(p, g, head, n, dst_tag);
            n = 0;
            goto counted;
        }
        STORE_RELAXED(&g->enq_frames, g->enq_frames + n);
        STORE_RELAXED(&p->me->tx_frames, p->me->tx_frames + n);
        STORE_RELAXED(&p->me->tx_bytes, p->me->tx_bytes + bytes);
        ring_doorbell(node_at(&p->r, (uint32_t)dst)); /* its fence is F1 */
        if (__builtin_expect(LOAD_RELAXED(&g->down) != epoch, 0)) {
            /* F1 pairs with F4: the destination went away right after we published, and its
             * reclaim may have drained the ring before our frames were there. Free what is still
             * tagged for it; what the reclaim freed already fails the CAS. */
            take_back(p, g, head, n, dst_tag);
        }
    }
counted:
    if (full) {
        STORE_RELAXED(&g->full_events, g->full_events + 1);
        STORE_RELAXED(&p->me->tx_ring_full, p->me->tx_ring_full + full);
    }
}

/* send_batch(dst, frames, ethertype=0x88B5, meta=0, raw=False, control=False, incarnation=0) -> number
 * sent. The rest did not fit. A non-zero incarnation: refused unless dst is still that one. */
static PyObject *send_frames(PortObject *p, long long dst, PyObject *const *items, Py_ssize_t count,
                             unsigned int ethertype, unsigned int meta, int raw, int control, unsigned int incarnation);

static PyObject *Port_send_batch(PortObject *p, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"dst", "frames", "ethertype", "meta", "raw", "control", "incarnation", NULL};
    long long dst;
    PyObject *seq;
    unsigned int ethertype = 0x88B5, meta = 0, incarnation = 0;
    int raw = 0, control = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O|O&O&ppO&", kwlist, conv_dst, &dst, &seq, conv_ethertype, &ethertype,
                                     conv_meta, &meta, &raw, &control, conv_incarnation, &incarnation))
        return NULL;
    CHECK_OPEN(p);
    PyObject *fast = PySequence_Fast(seq, "frames must be a sequence of bytes-like objects");
    if (!fast)
        return NULL;
    PyObject *res = send_frames(p, dst, PySequence_Fast_ITEMS(fast), PySequence_Fast_GET_SIZE(fast), ethertype, meta, raw,
                                control, incarnation);
    Py_DECREF(fast);
    return res;
}

/* The body of send_batch and send: copy `count` frames into slots and publish them to dst. */
static PyObject *send_frames(PortObject *p, long long dst, PyObject *const *items, Py_ssize_t count,
                             unsigned int ethertype, unsigned int meta, int raw, int control, unsigned int incarnation)
{
    uint32_t dst_tag, epoch;
    sf_ring *g = dest_ring(p, dst, incarnation, &dst_tag, &epoch);
    if (!g)
        return NULL;
    region_view *r = &p->r;
    uint32_t mask = r->sb->ring_size - 1;
    uint32_t head = g->head;
    uint32_t tail = LOAD_ACQUIRE(&g->tail); /* A1 pairs with R2 */
    uint32_t space = sf_ring_space(head, tail, r->sb->ring_size);
    uint32_t want = count > (Py_ssize_t)UINT32_MAX ? UINT32_MAX : (uint32_t)count;
    uint32_t n = want < space ? want : space;
    uint32_t pool = p->network;
    sf_network *net = port_net(p, pool);
    uint32_t *owner = net_owner(r, net);
    uint32_t hlen = raw ? 0 : SF_ETH_HLEN;
    uint32_t maxlen = net->mtu + SF_ETH_HLEN;
    uint8_t dmac[6];
    make_mac(dmac, (uint32_t)dst);
    uint64_t bytes = 0;
    uint32_t i = 0;
    for (; i < n; i++) {
        Py_buffer b;
        PyObject *it = items[i];
        const char *data;
        Py_ssize_t len;
        int release = 0;
        if (PyBytes_CheckExact(it)) { /* the common case without the buffer-protocol round trip */
            data = PyBytes_AS_STRING(it);
            len = PyBytes_GET_SIZE(it);
        } else {
            if (PyObject_GetBuffer(it, &b, PyBUF_SIMPLE) < 0)
                break;
            data = b.buf;
            len = b.len;
            release = 1;
        }
        if ((uint64_t)len + hlen > maxlen || (raw && len < SF_ETH_HLEN)) {
            if (release)
                PyBuffer_Release(&b);
            if (raw && len < SF_ETH_HLEN)
                PyErr_Format(FrameSizeError, "frame %u is %zd bytes, shorter than the 14-byte header", i, len);
            else
                PyErr_Format(FrameSizeError, "frame %u payload is %zd bytes, larger than the network MTU %u",
                             i, len - (raw ? SF_ETH_HLEN : 0), net->mtu);
            break;
        }
        uint32_t slot;
        if (!slot_get(p, pool, &slot)) {
            if (release)
                PyBuffer_Release(&b);
            STORE_RELAXED(&p->me->tx_nobuf, p->me->tx_nobuf + (n - i));
            break;
        }
        uint8_t *f = slot_ptr(r, net, slot);
        if (!raw)
            write_header(f, dmac, p->mac, (uint16_t)ethertype);
        memcpy(f + hlen, data, len);
        if (release)
            PyBuffer_Release(&b);
        desc_put(&g->desc[(head + i) & mask], slot, (uint16_t)pool,
                 (control ? SF_DESC_CONTROL : 0) | desc_stamp(head + i, r->sb->ring_size, epoch), meta,
                 (uint32_t)len + hlen, &owner[slot], dst_tag);
        bytes += (uint64_t)len + hlen - SF_ETH_HLEN; /* payload bytes (a raw frame's len has its header) */
    }
    finish_send(p, g, head, i, want - n, bytes, dst, dst_tag, epoch);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromUnsignedLong(i);
}

/* send(dst, frame, ethertype=0x88B5, meta=0) -> bool */
static PyObject *Port_send(PortObject *p, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"dst", "frame", "ethertype", "meta", "raw", NULL};
    long long dst;
    PyObject *obj;
    unsigned int ethertype = 0x88B5, meta = 0;
    int raw = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O|O&O&p", kwlist, conv_dst, &dst, &obj, conv_ethertype, &ethertype,
                                     conv_meta, &meta, &raw))
        return NULL;
    CHECK_OPEN(p);
    PyObject *res = send_frames(p, dst, &obj, 1, ethertype, meta, raw, 0, 0);
    if (!res)
        return NULL;
    long sent = PyLong_AsLong(res);
    Py_DECREF(res);
    return PyBool_FromLong(sent == 1);
}

/* --- inbound --------------------------------------------------------------------------------- */

enum { FS_OWNED = 0, FS_GONE = 1, FS_COPY = 2 };

typedef struct {
    uint8_t *data;
    uint32_t len;
    uint32_t slot;
    uint16_t pool;
    uint16_t flags;
    uint32_t meta;
    uint8_t state;
} frame_ref;

typedef struct {
    PyObject_HEAD
    PortObject *port;
    frame_ref *f;
    uint32_t n, cap;
    uint8_t *scratch; /* copies of tape frames */
    size_t scratch_used, scratch_cap;
    Py_ssize_t exports;
    int released;
    PyObject *control; /* list of control frames (bytes) taken from the tapes, or NULL */
} BatchObject;

typedef struct {
    PyObject_HEAD
    BatchObject *batch;
    uint32_t i;
} FrameObject;

static PyTypeObject Batch_Type, Frame_Type;

static bool tapes_pending(PortObject *p)
{
    region_view *r = &p->r;
    if (LOAD_ACQUIRE(&tape_at(r, 0)->head) != p->tape_cursor[0])
        return true;
    /* the mask lives in the region, which any process can write: only groups that exist */
    uint64_t mask = LOAD_RELAXED(&p->me->mcast_mask) & p->mcast_valid;
    while (mask) {
        uint32_t b = (uint32_t)__builtin_ctzll(mask);
        mask &= mask - 1;
        if (LOAD_ACQUIRE(&tape_at(r, 1 + b)->head) != p->tape_cursor[1 + b])
            return true;
    }
    return false;
}

static bool inbound_pending(PortObject *p)
{
    region_view *r = &p->r;
    uint32_t hwm = LOAD_ACQUIRE(&r->sb->node_hwm);
    for (uint32_t s = 0; s < hwm; s++) {
        sf_ring *g = ring_at(r, s, p->index);
        if (LOAD_ACQUIRE(&g->head) != g->tail)
            return true;
    }
    return tapes_pending(p);
}

/* Keep a copy of a control frame in batch.control (memory errors drop it: control traffic is
 * retried by its sender). */
static void batch_add_control(BatchObject *b, const uint8_t *data, uint32_t len)
{
    PyObject *cf = PyBytes_FromStringAndSize((const char *)data, len);
    if (cf && !b->control)
        b->control = PyList_New(0);
    if (cf && b->control)
        PyList_Append(b->control, cf);
    Py_XDECREF(cf);
    PyErr_Clear();
}

/* The next entry of tape `ti` still valid to read, skipping (and counting) what was lapped or
 * overwritten; NULL when this reader is at the head. *cur is its index and *s1 the sequence word
 * read before its contents (compare it after reading them: a change means the copy is torn). The
 * cursor is left on the entry: the caller moves it past. */
static sf_tape_entry *tape_peek(PortObject *p, uint32_t ti, uint64_t *cur_out, uint64_t *s1_out)
{
    region_view *r = &p->r;
    sf_tape *t = tape_at(r, ti);
    uint64_t entries = r->sb->tape_entries;
    for (;;) {
        uint64_t head = LOAD_ACQUIRE(&t->head); /* A5 pairs with R5 */
        uint64_t cur = p->tape_cursor[ti];
        if (cur == head)
            return NULL;
        if (head - cur > entries) { /* lapped: skip to the oldest entry still valid */
            uint64_t missed = head - entries - cur;
            STORE_RELAXED(&p->me->rx_lapped, p->me->rx_lapped + missed);
            p->tape_cursor[ti] = cur = head - entries;
        }
        sf_tape_entry *e = tape_entry(r, t, cur);
        uint64_t s1 = LOAD_ACQUIRE(&e->seq); /* A4 pairs with R4 */
        if (s1 != 2 * cur + 2) {              /* overwritten (or being overwritten) already */
            p->tape_cursor[ti] = cur + 1;
            STORE_RELAXED(&p->me->rx_lapped, p->me->rx_lapped + 1);
            continue;
        }
        *cur_out = cur;
        *s1_out = s1;
        return e;
    }
}

/* Read one tape into the batch (copying frames into scratch). */
static void read_tape(PortObject *p, BatchObject *b, uint32_t ti, uint32_t limit)
{
    region_view *r = &p->r;
    while (b->n < limit) {
        uint64_t cur, s1;
        sf_tape_entry *e = tape_peek(p, ti, &cur, &s1);
        if (!e)
            return;
        uint32_t len = e->len;
        if (len > r->sb->tape_entry_size)
            len = r->sb->tape_entry_size;
        if (b->scratch_used + len > b->scratch_cap) {
            size_t nc = (b->scratch_cap ? b->scratch_cap * 2 : 16384);
            while (nc < b->scratch_used + len)
                nc *= 2;
            /* frames already copied point into scratch: remember offsets, re-base after realloc */
            uint8_t *old = b->scratch;
            uint8_t *ns = PyMem_Realloc(b->scratch, nc);
            if (!ns)
                return;
            for (uint32_t k = 0; k < b->n; k++)
                if (b->f[k].state == FS_COPY)
                    b->f[k].data = ns + (b->f[k].data - old);
            b->scratch = ns;
            b->scratch_cap = nc;
        }
        uint8_t *dst = b->scratch + b->scratch_used;
        memcpy(dst, (uint8_t *)(e + 1), len);
        uint16_t flags = e->flags, src = e->src;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint64_t s2 = LOAD_RELAXED(&e->seq);
        p->tape_cursor[ti] = cur + 1;
        if (s2 != s1) { /* the writer lapped us while we copied: the copy is torn, drop it */
            STORE_RELAXED(&p->me->rx_lapped, p->me->rx_lapped + 1);
            continue;
        }
        if (src == p->index)
            continue; /* our own broadcast or multicast */
        if (flags & SF_DESC_CONTROL) { /* internal: handed to the Python layer, not the user */
            batch_add_control(b, dst, len);
            continue;
        }
        b->scratch_used += len;
        frame_ref *fr = &b->f[b->n++];
        fr->data = dst;
        fr->len = len;
        fr->slot = UINT32_MAX;
        fr->pool = UINT16_MAX;
        fr->flags = flags;
        fr->meta = src;
        fr->state = FS_COPY;
        STORE_RELAXED(&p->me->tape_rx, p->me->tape_rx + 1);
    }
}

/* Descriptors waiting in ring `g` (its tail in *tail), 0 when it is empty or its indices are
 * garbage (never legitimate: the region is writable by any process). */
static inline uint32_t ring_waiting(const region_view *r, sf_ring *g, uint32_t *tail)
{
    uint32_t head = LOAD_ACQUIRE(&g->head); /* A2 pairs with R1 */
    *tail = g->tail;
    uint32_t avail = head - *tail;
    return avail > r->sb->ring_size ? 0 : avail;
}

/* Where descriptor `d`'s frame is: its address, pool, slot and length (clamped to the MTU), or
 * NULL for a descriptor that names no slot: given back (a sender stopped inside a send, reclaimed,
 * then resumed, publishes entries its reclaim gave back) or corrupt (the region is writable by any
 * process). Such an entry is skipped and counted (rx_bad), never read as some slot: clamped to
 * slot 0, as before, the receiver took slot 0 once per entry, and later handed it out several
 * times at once. */
static inline uint8_t *desc_frame(const region_view *r, const sf_desc *d, uint32_t *pool, uint32_t *slot,
                                  uint32_t *len)
{
    *pool = d->pool;
    *slot = d->slot;
    if (__builtin_expect(*pool >= r->sb->n_networks, 0))
        return NULL;
    sf_network *n = net_at(r, *pool);
    if (__builtin_expect(*slot >= n->n_slots, 0))
        return NULL;
    *len = d->len <= n->mtu + SF_ETH_HLEN ? d->len : n->mtu + SF_ETH_HLEN;
    return slot_ptr(r, n, *slot);
}

/* Fill a batch from the inbound rings and tapes, without blocking. */
static void fill_batch(PortObject *p, BatchObject *b, uint32_t limit)
{
    region_view *r = &p->r;
    uint32_t hwm = LOAD_ACQUIRE(&r->sb->node_hwm);
    uint32_t mask = r->sb->ring_size - 1;
    uint64_t bytes = 0;
    uint32_t start_n = b->n;
    uint32_t start = p->rr < hwm ? p->rr : 0;
    for (uint32_t k = 0; k < hwm && b->n < limit; k++) {
        uint32_t s = start + k;
        if (s >= hwm)
            s -= hwm;
        sf_ring *g = ring_at(r, s, p->index);
        uint32_t tail;
        uint32_t avail = ring_waiting(r, g, &tail);
        if (!avail)
            continue;
        uint32_t take = limit - b->n;
        if (take > avail)
            take = avail;
        for (uint32_t j = 0; j < take; j++) {
            sf_desc *d = &g->desc[(tail + j) & mask];
            uint32_t pool, slot, len;
            uint8_t *data = desc_frame(r, d, &pool, &slot, &len);
            if (__builtin_expect(!data, 0)) {
                STORE_RELAXED(&p->me->rx_bad, p->me->rx_bad + 1);
                continue;
            }
            if (d->flags & SF_DESC_CONTROL) { /* a control message: to the Python layer, slot back now */
                batch_add_control(b, data, len);
                slot_put(p, pool, slot);
                continue;
            }
            frame_ref *fr = &b->f[b->n++];
            fr->data = data;
            __builtin_prefetch(fr->data); /* the header and first payload bytes the user reads next */
            fr->len = len;
            fr->slot = slot;
            fr->pool = (uint16_t)pool;
            fr->flags = d->flags & SF_DESC_USER;
            fr->meta = d->meta;
            fr->state = FS_OWNED;
            bytes += len >= SF_ETH_HLEN ? len - SF_ETH_HLEN : 0; /* payload bytes, as the sender counted them */
        }
        STORE_RELEASE(&g->tail, tail + take); /* R2 pairs with A1; descriptors were copied out */
        STORE_RELAXED(&g->deq_frames, g->deq_frames + take);
        if (b->n >= limit)
            p->rr = s + 1; /* resume after this ring next time so no peer starves */
    }
    uint32_t got = b->n - start_n;
    if (got) {
        STORE_RELAXED(&p->me->rx_frames, p->me->rx_frames + got);
        STORE_RELAXED(&p->me->rx_bytes, p->me->rx_bytes + bytes);
    }
    if (b->n < limit) {
        read_tape(p, b, 0, limit);
        /* only groups that exist: the mask lives in the region, which any process can write, and
         * a bit past n_mcast would read a tape beyond the tape area and write tape_cursor past
         * its array */
        uint64_t mm = LOAD_RELAXED(&p->me->mcast_mask) & p->mcast_valid;
        while (mm && b->n < limit) {
            uint32_t bit = (uint32_t)__builtin_ctzll(mm);
            mm &= mm - 1;
            read_tape(p, b, 1 + bit, limit);
        }
    }
}

/* Each sleep is at most this long, so signals, a detach by another thread and liveness changes
 * are noticed within it. timeout=None means one such slice. */
#define WAIT_SLICE_NS 200000000LL

/* Block (GIL released) until something may be waiting, `timeout_ns` (at most a slice; the
 * callers cut longer waits into slices) passes, the port is closing (another thread detaches
 * the node: port_close rings our doorbell and waits for us to leave, see `inflight`) or our
 * entry is not ours any more (reclaimed while this process was stopped: a sleeper resumed then
 * must not count itself out of, or read the rings of, the node that took the id since). The
 * caller counts itself in `inflight` around this, and checks port_gone before it reads the
 * rings (fill_batch). */
static void port_wait(PortObject *p, int64_t timeout_ns)
{
    if (timeout_ns < 0 || timeout_ns > WAIT_SLICE_NS)
        timeout_ns = WAIT_SLICE_NS;
    uint64_t deadline = now_ns() + (uint64_t)timeout_ns;
    if (p->wait_mode != WAIT_BLOCK) {
        uint64_t spin_end = p->wait_mode == WAIT_POLL ? deadline : now_ns() + (uint64_t)p->spin_ns;
        if (spin_end > deadline)
            spin_end = deadline;
        do {
            if (port_gone(p) || inbound_pending(p))
                return;
            for (int i = 0; i < 16; i++)
                CPU_RELAX();
        } while (now_ns() < spin_end);
        if (p->wait_mode == WAIT_POLL)
            return;
    }
    sf_node *me = p->me;
    /* `waiting` counts the node's threads that may sleep on its doorbell (a blocking receive and
     * the fileno() notifier can both); each counts itself only while it may sleep, and only in
     * its own incarnation's count (waiting_enter) */
    if (!waiting_enter(p)) {
        if (!port_gone(p)) { /* 65535 sleepers already (absurd): nap instead of sleeping on the doorbell */
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
        return;
    }
    for (;;) {
        uint32_t seq = LOAD_ACQUIRE(&me->doorbell);
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* F2 pairs with F1: `waiting` before the check */
        /* `closing` is read after the doorbell: port_close (and port_mark_reclaimed) set it before
         * they bump the doorbell, so either we see it here or the futex_wait below returns at once.
         * A reclaim rings nobody: a sleeper stopped with the process sees it at its next wake-up
         * (a doorbell, or the end of the slice), before it reads anything. */
        if (port_gone(p) || inbound_pending(p))
            break;
        uint64_t now = now_ns();
        if (now >= deadline)
            break;
        futex_wait(&me->doorbell, seq, (int64_t)(deadline - now));
        if (port_alive(p)) /* the counter is our incarnation's only while it is alive */
            STORE_RELAXED(&me->wakeups, me->wakeups + 1);
    }
    waiting_leave(p);
}

static BatchObject *new_batch(PortObject *p, uint32_t cap)
{
    BatchObject *b = PyObject_New(BatchObject, &Batch_Type);
    if (!b)
        return NULL;
    b->f = PyMem_Malloc(sizeof(frame_ref) * (cap ? cap : 1));
    if (!b->f) {
        Py_DECREF(b);
        return NULL;
    }
    Py_INCREF(p);
    b->port = p;
    b->n = 0;
    b->cap = cap;
    b->scratch = NULL;
    b->scratch_used = b->scratch_cap = 0;
    b->exports = 0;
    b->released = 0;
    b->control = NULL;
    return b;
}

static void port_clear_signal(PortObject *p);

/* A timeout with no deadline at all (inf, or more seconds than int64 nanoseconds hold): unlike
 * None, which returns an empty batch after a quiet slice, it waits until frames arrive, checking
 * for signals between slices. */
#define TMO_FOREVER INT64_MAX

/* None -> -1 (one slice: return now and then, for signals), a number of seconds -> nanoseconds
 * (0 = do not wait), inf or a number too large for int64 nanoseconds (about 292 years, an int
 * too large even for a float included) -> TMO_FOREVER. NaN is refused: it compares false with
 * everything, so no deadline is meant. (t * 1e9 converted to int64_t is undefined past
 * INT64_MAX; it gave INT64_MIN, i.e. "None".) */
static int parse_timeout(PyObject *timeout, int64_t *ns)
{
    *ns = -1;
    if (timeout == Py_None)
        return 0;
    double t = PyFloat_AsDouble(timeout);
    if (t == -1.0 && PyErr_Occurred()) {
        if (!PyLong_Check(timeout) || !PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear(); /* an int beyond a double (10**400): as inf, or as -inf */
        t = _PyLong_Sign(timeout) > 0 ? HUGE_VAL : -HUGE_VAL;
    }
    if (t != t) {
        PyErr_SetString(PyExc_ValueError, "timeout must be a number of seconds or None, not NaN");
        return -1;
    }
    if (t <= 0)
        *ns = 0;
    else if (t >= 9.2e9) /* 9.2e18 ns is still below INT64_MAX (9.22e18) */
        *ns = TMO_FOREVER;
    else
        *ns = (int64_t)(t * 1e9);
    return 0;
}

/* After a wait, or after taking frames: the port was closed by another thread, or its entry was
 * reclaimed under it (then it is marked so). Sets the exception. GIL held. */
static void __attribute__((noinline, cold)) port_refuse_after_wait(PortObject *p, const char *detached_msg)
{
    if (!p->closing && !port_foreign(p) && !port_alive(p)) {
        port_refuse(p); /* marks it reclaimed, stops the notifier */
        return;
    }
    PyErr_SetString(p->closed == 2 ? NodeReclaimedError : FabricError, p->closed == 2 ? RECLAIMED_MSG : detached_msg);
}

/* recv_batch(max_frames=256, timeout=None) -> FrameBatch. timeout 0 never blocks; None waits
 * until frames arrive or one slice (WAIT_SLICE_NS) passes, returning an empty batch then so
 * signals are seen; a number waits that long, inf until frames arrive. */
static PyObject *Port_recv_batch(PortObject *p, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"max_frames", "timeout", NULL};
    Py_ssize_t maxf = 256; /* "n", not "I": 2^32 + 5 must not become 5 */
    PyObject *timeout = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|nO", kwlist, &maxf, &timeout))
        return NULL;
    CHECK_OPEN(p);
    if (maxf <= 0 || maxf > 65536) {
        PyErr_SetString(PyExc_ValueError, "max_frames must be between 1 and 65536");
        return NULL;
    }
    int64_t tmo;
    if (parse_timeout(timeout, &tmo) < 0)
        return NULL;
    if (tmo < 0) /* None: one slice, in every wait mode */
        tmo = WAIT_SLICE_NS;
    BatchObject *b = new_batch(p, (uint32_t)maxf);
    if (!b)
        return NULL;
    fill_batch(p, b, (uint32_t)maxf);
    if (b->n == 0 && !b->control && tmo != 0) {
        /* a wake-up may bring only our own broadcast (skipped): wait out the rest of the time */
        uint64_t deadline = tmo == TMO_FOREVER ? 0 : now_ns() + (uint64_t)tmo;
        for (;;) {
            int64_t left = WAIT_SLICE_NS; /* back here now and then, for signals */
            if (tmo != TMO_FOREVER) {
                uint64_t now = now_ns();
                if (now >= deadline)
                    break;
                if ((int64_t)(deadline - now) < left)
                    left = (int64_t)(deadline - now);
            }
            if (p->closing) /* detached by a signal handler run by PyErr_CheckSignals below */
                break;
            __atomic_fetch_add(&p->inflight, 1, __ATOMIC_RELAXED); /* with the GIL, so port_close sees it */
            Py_BEGIN_ALLOW_THREADS
            port_wait(p, left);
            __atomic_fetch_sub(&p->inflight, 1, __ATOMIC_RELEASE); /* before the GIL: port_close waits without it */
            Py_END_ALLOW_THREADS
            /* another thread detached the node while we slept, or the entry was reclaimed (and
             * maybe claimed again) while this process was stopped: its rings are not ours to read */
            if (port_gone(p))
                break;
            fill_batch(p, b, (uint32_t)maxf);
            if (b->n || b->control)
                break;
            if (PyErr_CheckSignals() < 0) {
                Py_DECREF(b);
                return NULL;
            }
        }
        if (port_gone(p) && !b->n && !b->control) {
            Py_DECREF(b); /* empty: it took nothing from the rings */
            port_refuse_after_wait(p, "node was detached while this thread waited to receive");
            return NULL;
        }
    }
    /* Still ours after the rings were read: if the entry was reclaimed before or while we read
     * them (this process stopped between CHECK_OPEN or port_gone and fill_batch), the frames may
     * be the next incarnation's, or slots the reclaim freed; they are not handed out (the
     * batch's release gives nothing back: port_usable). One load: the state_gen line is read by
     * CHECK_OPEN already. Coherence orders it: the rings' heads were read with acquire, after a
     * claim that followed the reclaim's CAS of this word. */
    if (__builtin_expect(!port_alive(p), 0)) {
        Py_DECREF(b);
        port_refuse_after_wait(p, "node was detached while this thread received");
        return NULL;
    }
    if (p->notifier_on && b->n < maxf)
        port_clear_signal(p);
    return (PyObject *)b;
}

/* The control messages at the front of tape `ti`, up to `limit` in `out`: recv_control's tape
 * part. It stops at the first data frame (left for recv_batch, so the tape's order holds); our
 * own entries are skipped and lost ones counted, as read_tape does. A message that cannot be
 * copied (no memory) is dropped, as batch_add_control drops it: control traffic is retried. */
static void tape_take_control(PortObject *p, uint32_t ti, PyObject *out, Py_ssize_t limit)
{
    region_view *r = &p->r;
    while (PyList_GET_SIZE(out) < limit) {
        uint64_t cur, s1;
        sf_tape_entry *e = tape_peek(p, ti, &cur, &s1);
        if (!e)
            return;
        uint16_t flags = e->flags, src = e->src;
        if (src != p->index && !(flags & SF_DESC_CONTROL))
            return; /* a data frame (or a torn read of one being rewritten: recv_batch sorts it out) */
        PyObject *cf = NULL;
        if (src != p->index) {
            uint32_t len = e->len;
            if (len > r->sb->tape_entry_size)
                len = r->sb->tape_entry_size;
            cf = PyBytes_FromStringAndSize((const char *)(e + 1), len);
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint64_t s2 = LOAD_RELAXED(&e->seq);
        p->tape_cursor[ti] = cur + 1;
        if (s2 != s1) { /* the writer lapped us while we copied: the copy is torn, drop it */
            STORE_RELAXED(&p->me->rx_lapped, p->me->rx_lapped + 1);
            Py_XDECREF(cf);
            continue;
        }
        if (cf)
            PyList_Append(out, cf);
        Py_XDECREF(cf);
        PyErr_Clear();
    }
}

/* recv_control(max_messages=64) -> list of bytes: the control messages at the front of every
 * inbound ring and tape, without blocking and without taking a data frame. Each ring (and tape)
 * is read up to its first data frame only, so no ring's order changes: what follows a data frame
 * waits for recv_batch. This is what a node blocked on a full next hop calls to answer its
 * manager (whose ring to it carries only control messages) without touching its data path. Call
 * it from the thread that receives: like recv_batch, it is a ring's only consumer. */
static PyObject *Port_recv_control(PortObject *p, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"max_messages", NULL};
    Py_ssize_t maxm = 64;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|n", kwlist, &maxm))
        return NULL;
    CHECK_OPEN(p);
    if (maxm <= 0 || maxm > 65536) {
        PyErr_SetString(PyExc_ValueError, "max_messages must be between 1 and 65536");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    region_view *r = &p->r;
    uint32_t hwm = LOAD_ACQUIRE(&r->sb->node_hwm);
    uint32_t mask = r->sb->ring_size - 1;
    uint32_t start = p->crr < hwm ? p->crr : 0; /* round robin, as fill_batch: no sender starves the rest */
    for (uint32_t k = 0; k < hwm && PyList_GET_SIZE(out) < maxm; k++) {
        uint32_t s = start + k;
        if (s >= hwm)
            s -= hwm;
        sf_ring *g = ring_at(r, s, p->index);
        uint32_t tail;
        uint32_t avail = ring_waiting(r, g, &tail);
        if (!avail)
            continue;
        uint32_t j = 0;
        while (j < avail && PyList_GET_SIZE(out) < maxm) {
            sf_desc *d = &g->desc[(tail + j) & mask];
            if (!(d->flags & SF_DESC_CONTROL))
                break; /* a data frame: it and all behind it stay for recv_batch */
            uint32_t pool, slot, len;
            uint8_t *data = desc_frame(r, d, &pool, &slot, &len);
            if (!data) { /* names no slot: skipped (as fill_batch) */
                STORE_RELAXED(&p->me->rx_bad, p->me->rx_bad + 1);
                j++;
                continue;
            }
            PyObject *cf = PyBytes_FromStringAndSize((const char *)data, len);
            if (cf)
                PyList_Append(out, cf);
            Py_XDECREF(cf);
            PyErr_Clear(); /* no memory: dropped, as batch_add_control drops it */
            slot_put(p, pool, slot);
            j++;
        }
        if (j) {
            STORE_RELEASE(&g->tail, tail + j); /* R2 pairs with A1; descriptors were copied out */
            STORE_RELAXED(&g->deq_frames, g->deq_frames + j);
        }
        if (PyList_GET_SIZE(out) >= maxm)
            p->crr = s + 1; /* resume after this ring next time */
    }
    if (PyList_GET_SIZE(out) < maxm) {
        tape_take_control(p, 0, out, maxm);
        uint64_t mm = LOAD_RELAXED(&p->me->mcast_mask) & p->mcast_valid; /* as fill_batch */
        while (mm && PyList_GET_SIZE(out) < maxm) {
            uint32_t bit = (uint32_t)__builtin_ctzll(mm);
            mm &= mm - 1;
            tape_take_control(p, 1 + bit, out, maxm);
        }
    }
    if (__builtin_expect(!port_alive(p), 0)) { /* reclaimed while this process was stopped: see recv_batch */
        Py_DECREF(out);
        port_refuse_after_wait(p, "node was detached while this thread received");
        return NULL;
    }
    /* The fileno() eventfd is cleared as recv_batch clears it: the notifier looks again after a
     * clear and signals again if data frames (or more control messages) are still waiting. */
    if (p->notifier_on)
        port_clear_signal(p);
    return out;
}

/* wait(timeout=None) -> bool: block until frames may be waiting, without taking them. None
 * waits one slice at most (False after it if nothing came). */
static PyObject *Port_wait(PortObject *p, PyObject *args)
{
    PyObject *timeout = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &timeout))
        return NULL;
    CHECK_OPEN(p);
    int64_t tmo;
    if (parse_timeout(timeout, &tmo) < 0)
        return NULL;
    if (tmo < 0) /* None: one slice, in every wait mode */
        tmo = WAIT_SLICE_NS;
    bool ready = false;
    uint64_t deadline = tmo == 0 || tmo == TMO_FOREVER ? 0 : now_ns() + (uint64_t)tmo;
    for (;;) {
        int64_t left = 0; /* 0: a look */
        if (tmo == TMO_FOREVER) {
            left = WAIT_SLICE_NS;
        } else if (tmo > 0) {
            uint64_t now = now_ns();
            left = now >= deadline ? 0 : (int64_t)(deadline - now);
            if (left > WAIT_SLICE_NS)
                left = WAIT_SLICE_NS;
        }
        if (p->closing)
            break;
        __atomic_fetch_add(&p->inflight, 1, __ATOMIC_RELAXED);
        Py_BEGIN_ALLOW_THREADS
        if (left)
            port_wait(p, left);
        ready = !port_gone(p) && inbound_pending(p);
        __atomic_fetch_sub(&p->inflight, 1, __ATOMIC_RELEASE);
        Py_END_ALLOW_THREADS
        if (ready || port_gone(p) || tmo == 0 || (tmo != TMO_FOREVER && now_ns() >= deadline))
            break;
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
    if (port_gone(p)) {
        port_refuse_after_wait(p, "node was detached while this thread waited");
        return NULL;
    }
    return PyBool_FromLong(ready);
}

/* --- tapes (broadcast / multicast) ------------------------------------------------------------ */

/* How long tape_send waits for a tape's writer lock by default. A writer holds it for one copy
 * of at most a tape entry (microseconds); a holder still there after this is stopped (SIGSTOP,
 * a debugger) or starved, and waiting on it for ever would hang every broadcast, attach and
 * detach in the fabric for as long as it stays stopped. */
#define TAPE_LOCK_NS 1000000000LL
/* The lock is waited for in slices this long, so a detach by another thread (`closing`), a
 * reclaim of our entry and signals (Ctrl-C) are seen between them. */
#define TAPE_SLICE_NS 50000000LL

static PyObject *TapeBusyError;

/* tape_send(tape, frame, flags=0, timeout=1.0) -> None. frame is a whole frame (header included).
 * Raises TapeBusyError if the tape's writer lock stays held for `timeout` seconds. */
static PyObject *Port_tape_send(PortObject *p, PyObject *args)
{
    unsigned int ti, flags = 0;
    Py_buffer fb;
    PyObject *tmo_o = NULL;
    double tmo_s = TAPE_LOCK_NS / 1e9;
    if (!PyArg_ParseTuple(args, "O&y*|O&O", conv_tape, &ti, &fb, conv_flags, &flags, &tmo_o))
        return NULL;
    if (tmo_o) {
        tmo_s = PyFloat_AsDouble(tmo_o);
        if (tmo_s == -1.0 && PyErr_Occurred()) {
            if (!PyLong_Check(tmo_o) || !PyErr_ExceptionMatches(PyExc_OverflowError)) {
                PyBuffer_Release(&fb);
                return NULL;
            }
            PyErr_Clear(); /* an int beyond a double: out of range below, like inf */
            tmo_s = _PyLong_Sign(tmo_o) > 0 ? HUGE_VAL : -HUGE_VAL;
        }
    }
    if (!(tmo_s >= 0) || tmo_s > 3600.0) {
        PyBuffer_Release(&fb);
        PyErr_SetString(PyExc_ValueError, "tape lock timeout must be between 0 and 3600 seconds");
        return NULL;
    }
    if (p->closing || port_foreign(p) || !port_alive(p)) { /* CHECK_OPEN, with the buffer to release */
        PyBuffer_Release(&fb);
        port_refuse(p);
        return NULL;
    }
    if (fb.len < SF_ETH_HLEN) { /* as a raw send: a frame carries at least its header */
        PyErr_Format(FrameSizeError, "frame is %zd bytes, shorter than the 14-byte header", fb.len);
        PyBuffer_Release(&fb);
        return NULL;
    }
    if (ti > p->r.sb->n_mcast || (uint64_t)fb.len > p->r.sb->tape_entry_size) {
        PyErr_Format(PyExc_ValueError, "tape %u does not exist or frame of %zd bytes exceeds the tape entry size %u",
                     ti, fb.len, p->r.sb->tape_entry_size);
        PyBuffer_Release(&fb);
        return NULL;
    }
    region_view *r = &p->r;
    sf_tape *t = tape_at(r, ti);
    int rc;
    uint64_t deadline = now_ns() + (uint64_t)(int64_t)(tmo_s * 1e9);
    /* The lock is waited for in slices, the GIL released during each and taken back between
     * them to run signal handlers (Ctrl-C interrupts a long wait) and to see a detach by another
     * thread or a reclaim of our entry. inflight: a detach by another thread waits until we have
     * left the entry (we write its tape_tx counter below); counted during each slice and, once
     * the lock is ours, until the entry is written. */
    for (;;) {
        if (p->closing || !port_alive(p)) {
            rc = ECANCELED;
            break;
        }
        uint64_t now = now_ns();
        int64_t slice = deadline > now ? (int64_t)(deadline - now) : 0;
        if (slice > TAPE_SLICE_NS)
            slice = TAPE_SLICE_NS;
        __atomic_fetch_add(&p->inflight, 1, __ATOMIC_RELAXED);
        Py_BEGIN_ALLOW_THREADS
        rc = pthread_mutex_trylock(&t->lock);
        if (rc == EBUSY && slice > 0) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts); /* pthread_mutex_timedlock's clock */
            int64_t ns = ts.tv_nsec + slice;
            ts.tv_sec += ns / 1000000000LL;
            ts.tv_nsec = ns % 1000000000LL;
            rc = pthread_mutex_timedlock(&t->lock, &ts);
        }
        if ((rc == 0 || rc == EOWNERDEAD) && port_gone(p)) { /* detached or reclaimed meanwhile: write nothing */
            if (rc == EOWNERDEAD) /* a writer died holding the lock: the tape is still consistent, because a
                                   * half-written entry keeps an odd seq that readers skip */
                pthread_mutex_consistent(&t->lock);
            pthread_mutex_unlock(&t->lock);
            rc = ECANCELED;
        }
        if (rc != 0 && rc != EOWNERDEAD)
            __atomic_fetch_sub(&p->inflight, 1, __ATOMIC_RELEASE); /* before the GIL: port_close waits without it */
        Py_END_ALLOW_THREADS
        if (rc == 0 || rc == EOWNERDEAD || (rc != EBUSY && rc != ETIMEDOUT))
            break;
        if (now_ns() >= deadline) {
            rc = ETIMEDOUT;
            break;
        }
        if (PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&fb);
            return NULL;
        }
    }
    if (rc == EOWNERDEAD) /* see above */
        pthread_mutex_consistent(&t->lock);
    else if (rc != 0) {
        PyBuffer_Release(&fb);
        if (rc == ECANCELED)
            port_refuse_after_wait(p, "node was detached while this thread waited to write a tape");
        else if (rc == ETIMEDOUT) {
            char secs[32]; /* PyErr_Format has no %g */
            snprintf(secs, sizeof secs, "%.3g", tmo_s);
            PyErr_Format(TapeBusyError, "the %s tape's writer lock was held for %s s (a process stopped or stuck "
                         "while writing it; find it with `fuser` on the region file); nothing was sent",
                         ti ? "multicast" : "broadcast", secs);
        } else
            PyErr_Format(FabricError, "tape lock failed: %s", strerror(rc));
        return NULL;
    }
    /* The lock is ours and the GIL again: no detach of ours ran since (port_close waits for
     * inflight). Our entry may have been reclaimed meanwhile, though (this process stopped):
     * then the index in the entry's `src` names another node, so nothing is written. */
    if (!port_alive(p)) {
        pthread_mutex_unlock(&t->lock);
        __atomic_fetch_sub(&p->inflight, 1, __ATOMIC_RELEASE);
        PyBuffer_Release(&fb);
        port_refuse_after_wait(p, "node was detached while this thread waited to write a tape");
        return NULL;
    }
    uint64_t seq = t->head;
    sf_tape_entry *e = tape_entry(r, t, seq);
    STORE_RELAXED(&e->seq, 2 * seq + 1);
    __atomic_thread_fence(__ATOMIC_RELEASE); /* the odd seq is seen before any new byte */
    e->len = (uint32_t)fb.len;
    e->src = (uint16_t)p->index;
    e->flags = (uint16_t)flags;
    memcpy((uint8_t *)(e + 1), fb.buf, fb.len);
    STORE_RELEASE(&e->seq, 2 * seq + 2); /* R4 pairs with A4 */
    STORE_RELEASE(&t->head, seq + 1);    /* R5 pairs with A5 */
    pthread_mutex_unlock(&t->lock);
    PyBuffer_Release(&fb);
    STORE_RELAXED(&p->me->tape_tx, p->me->tape_tx + 1);
    __atomic_fetch_sub(&p->inflight, 1, __ATOMIC_RELEASE); /* with the GIL held since the check: no detach ran */
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* F1 pairs with F2, for every reader */
    uint32_t hwm = LOAD_ACQUIRE(&r->sb->node_hwm);
    for (uint32_t i = 0; i < hwm; i++) {
        sf_node *nd = node_at(r, i);
        if (i != p->index && (LOAD_RELAXED(&nd->waiting) & SF_WAITING_COUNT)) {
            __atomic_fetch_add(&nd->doorbell, 1, __ATOMIC_RELEASE);
            futex_wake(&nd->doorbell, INT_MAX);
        }
    }
    Py_RETURN_NONE;
}

/* set_mcast(mask) sets which multicast tapes this node reads (bit i = tape 1+i). */
static PyObject *Port_set_mcast(PortObject *p, PyObject *arg)
{
    CHECK_OPEN(p);
    unsigned long long mask = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (mask & ~p->mcast_valid) {
        PyErr_Format(PyExc_ValueError, "multicast mask %R names groups that do not exist (this fabric has %u "
                     "multicast groups: bits 0..%d)", arg, p->r.sb->n_mcast, (int)p->r.sb->n_mcast - 1);
        return NULL;
    }
    uint64_t old = p->me->mcast_mask & p->mcast_valid;
    for (uint32_t b = 0; b < p->r.sb->n_mcast && b < 64; b++)
        if ((mask >> b & 1) && !(old >> b & 1))
            p->tape_cursor[1 + b] = LOAD_ACQUIRE(&tape_at(&p->r, 1 + b)->head);
    STORE_RELEASE(&p->me->mcast_mask, (uint64_t)mask);
    Py_RETURN_NONE;
}

/* --- zero-copy send buffers ------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PortObject *port;
    uint32_t pool, slot;
    uint8_t *data;
    Py_ssize_t exports;
    int sent;
} BufferObject;

static PyTypeObject Buffer_Type;

/* alloc() -> Buffer: a pool slot whose payload the caller writes, then send_buffer() sends. */
static PyObject *Port_alloc(PortObject *p, PyObject *noargs)
{
    CHECK_OPEN(p);
    uint32_t slot;
    if (!slot_get(p, p->network, &slot)) {
        PyErr_SetString(PyExc_MemoryError, "packet pool exhausted: no free slot in this network");
        return NULL;
    }
    BufferObject *b = PyObject_New(BufferObject, &Buffer_Type);
    if (!b) {
        slot_put(p, p->network, slot);
        return NULL;
    }
    Py_INCREF(p);
    b->port = p;
    b->pool = p->network;
    b->slot = slot;
    b->data = slot_ptr(&p->r, port_net(p, p->network), slot);
    b->exports = 0;
    b->sent = 0;
    return (PyObject *)b;
}

static void Buffer_dealloc(BufferObject *b)
{
    if (!b->sent && port_usable(b->port))
        slot_put(b->port, b->pool, b->slot);
    Py_DECREF(b->port);
    PyObject_Free(b);
}

static int Buffer_getbuffer(BufferObject *b, Py_buffer *view, int flags)
{
    if (b->sent) {
        PyErr_SetString(ReleasedError, "buffer was already sent; allocate a new one");
        return -1;
    }
    /* After a detach (or a reclaim, or in a forked child) the slot is not this node's any more:
     * the reclaim freed it and another node may be filling it. */
    if (!port_usable(b->port)) {
        PyErr_SetString(ReleasedError, b->port->closed == 2 ? "buffer's node was reclaimed; its slot is no longer valid"
                                                            : "buffer's node is detached (or belongs to the parent "
                                                              "process); its slot is no longer valid");
        return -1;
    }
    if (b->port->sealed) {
        PyErr_SetString(ReleasedError, "buffer's node is detaching; its slot goes back to the pool");
        return -1;
    }
    sf_network *n = port_net(b->port, b->pool);
    if (PyBuffer_FillInfo(view, (PyObject *)b, b->data + SF_ETH_HLEN, n->mtu, 0, flags) < 0)
        return -1;
    b->exports++;
    b->port->exports++; /* detach refuses while views exist (they would write a freed slot) */
    return 0;
}
static void Buffer_releasebuffer(BufferObject *b, Py_buffer *view)
{
    b->exports--;
    b->port->exports--;
}

static PyBufferProcs Buffer_as_buffer = {(getbufferproc)Buffer_getbuffer, (releasebufferproc)Buffer_releasebuffer};

static PyObject *Buffer_get_capacity(BufferObject *b, void *c) { return PyLong_FromUnsignedLong(port_net(b->port, b->pool)->mtu); }

static PyGetSetDef Buffer_getset[] = {{"capacity", (getter)Buffer_get_capacity, NULL, "payload bytes this buffer holds (the MTU)", NULL}, {NULL}};

static PyTypeObject Buffer_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmfabric.core._fabric.Buffer",
    .tp_basicsize = sizeof(BufferObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Buffer_dealloc,
    .tp_as_buffer = &Buffer_as_buffer,
    .tp_getset = Buffer_getset,
    .tp_doc = "A pool slot being filled for a zero-copy send; memoryview(buf) is its payload.",
};

/* send_buffer(dst, buf, length, ethertype=0x88B5, meta=0, incarnation=0) -> bool; with an incarnation
 * (not 0), UnknownDestinationError once another incarnation holds the id (as send_batch) */
static PyObject *Port_send_buffer(PortObject *p, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"dst", "buf", "length", "ethertype", "meta", "incarnation", NULL};
    long long dst;
    BufferObject *b;
    Py_ssize_t length;
    unsigned int ethertype = 0x88B5, meta = 0, incarnation = 0;
    /* length as "n" (Py_ssize_t, overflow-checked), not "I": 2^32 + 5 would have sent 5 bytes */
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O&O!n|O&O&O&", kwlist, conv_dst, &dst, &Buffer_Type, &b, &length,
                                     conv_ethertype, &ethertype, conv_meta, &meta, conv_incarnation, &incarnation))
        return NULL;
    if (length < 0) {
        PyErr_Format(PyExc_ValueError, "length must not be negative (got %zd)", length);
        return NULL;
    }
    CHECK_OPEN(p);
    if (b->port != p) {
        PyErr_SetString(PyExc_ValueError, "buffer belongs to another node");
        return NULL;
    }
    if (b->sent) {
        PyErr_SetString(ReleasedError, "buffer was already sent; allocate a new one");
        return NULL;
    }
    if (b->exports) {
        PyErr_SetString(PyExc_BufferError, "release the buffer's memoryviews before sending it");
        return NULL;
    }
    sf_network *n = port_net(p, b->pool);
    if ((size_t)length > n->mtu) {
        PyErr_Format(FrameSizeError, "length %zd larger than the network MTU %u", length, n->mtu);
        return NULL;
    }
    uint32_t dst_tag, epoch;
    sf_ring *g = dest_ring(p, dst, incarnation, &dst_tag, &epoch);
    if (!g)
        return NULL;
    uint32_t head = g->head;
    uint32_t tail = LOAD_ACQUIRE(&g->tail); /* A1 pairs with R2 */
    if (!sf_ring_space(head, tail, p->r.sb->ring_size)) {
        finish_send(p, g, head, 0, 1, 0, dst, dst_tag, epoch); /* ring full */
        Py_RETURN_FALSE;
    }
    uint8_t dmac[6];
    make_mac(dmac, (uint32_t)dst);
    write_header(b->data, dmac, p->mac, (uint16_t)ethertype);
    desc_put(&g->desc[head & (p->r.sb->ring_size - 1)], b->slot, (uint16_t)b->pool,
             desc_stamp(head, p->r.sb->ring_size, epoch), meta, (uint32_t)length + SF_ETH_HLEN, &net_owner(&p->r, n)[b->slot],
             dst_tag);
    b->sent = 1;
    finish_send(p, g, head, 1, 0, (uint64_t)length, dst, dst_tag, epoch);
    Py_RETURN_TRUE;
}

/* --- forwarding ---------------------------------------------------------------------------- */

static int batch_check(BatchObject *b)
{
    if (b->released) {
        PyErr_SetString(ReleasedError, "frame batch was released; its frames are no longer valid");
        return -1;
    }
    return 0;
}

/* forward the frames [lo, hi) of batch b (skipping gone ones, and, with `codes`, those whose
 * code is not `code`) to dst. */
static PyObject *forward_frames(PortObject *p, long long dst, BatchObject *b, uint32_t lo, uint32_t hi, int single,
                                const uint8_t *codes, uint8_t code, uint32_t want)
{
    CHECK_OPEN(p);
    if (b->port != p) {
        PyErr_SetString(PyExc_ValueError, "frames belong to another node");
        return NULL;
    }
    if (batch_check(b) < 0)
        return NULL;
    if (b->exports) {
        PyErr_SetString(PyExc_BufferError, "release the frames' memoryviews before forwarding them");
        return NULL;
    }
    uint32_t dst_tag, epoch;
    sf_ring *g = dest_ring(p, dst, want, &dst_tag, &epoch);
    if (!g)
        return NULL;
    region_view *r = &p->r;
    uint32_t mask = r->sb->ring_size - 1;
    uint32_t head = g->head;
    uint32_t tail = LOAD_ACQUIRE(&g->tail); /* A1 pairs with R2 */
    uint32_t space = sf_ring_space(head, tail, r->sb->ring_size);
    uint32_t sent = 0, full = 0;
    uint64_t bytes = 0;
    uint8_t dmac[6];
    make_mac(dmac, (uint32_t)dst);
    for (uint32_t i = lo; i < hi; i++) {
        frame_ref *fr = &b->f[i];
        if (fr->state == FS_GONE || (codes && codes[i] != code))
            continue;
        if (__builtin_expect(!fr->len, 0)) {
            /* Not a frame (an empty tape entry another build wrote, or a corrupt one), and a zero
             * len in a ring means "never written" to take_unpublished, which stops there: sent, its
             * slot (and those of the frames after it) would leak if we died before publishing
             * them. Dropped here. */
            if (fr->state == FS_OWNED)
                slot_put(p, fr->pool, fr->slot);
            fr->state = FS_GONE;
            STORE_RELAXED(&p->me->tx_drops, p->me->tx_drops + 1);
            continue;
        }
        if (sent == space) {
            full++;
            continue;
        }
        uint32_t pool = fr->pool, slot = fr->slot;
        if (fr->state == FS_COPY) { /* a tape frame lives in scratch: it needs a slot first */
            pool = p->network;
            if (fr->len > port_net(p, pool)->mtu + SF_ETH_HLEN || !slot_get(p, pool, &slot)) {
                p->me->tx_nobuf++;
                continue;
            }
            memcpy(slot_ptr(r, port_net(p, pool), slot), fr->data, fr->len);
        }
        /* rewrite the MAC header in place: the frame now goes from us to dst */
        uint8_t *fd = slot_ptr(r, port_net(p, pool), slot);
        if (fr->len >= SF_ETH_HLEN) {
            memcpy(fd, dmac, 6);
            memcpy(fd + 6, p->mac, 6);
        }
        desc_put(&g->desc[(head + sent) & mask], slot, (uint16_t)pool,
                 (fr->flags & SF_DESC_USER) | desc_stamp(head + sent, r->sb->ring_size, epoch), fr->meta, fr->len,
                 &net_owner(r, port_net(p, pool))[slot], dst_tag);
        if (fr->state == FS_COPY)
            fr->data = fd; /* (unused after this; keep it pointing at live memory) */
        fr->state = FS_GONE;
        bytes += fr->len >= SF_ETH_HLEN ? fr->len - SF_ETH_HLEN : 0; /* payload bytes */
        sent++;
    }
    finish_send(p, g, head, sent, full, bytes, dst, dst_tag, epoch);
    if (single)
        return PyBool_FromLong(sent == 1);
    return PyLong_FromUnsignedLong(sent);
}

static PyObject *Port_forward(PortObject *p, PyObject *args)
{
    long long dst;
    FrameObject *f;
    if (!PyArg_ParseTuple(args, "O&O!", conv_dst, &dst, &Frame_Type, &f))
        return NULL;
    if (f->batch->f[f->i].state == FS_GONE && !f->batch->released) {
        PyErr_SetString(ReleasedError, "frame was already forwarded");
        return NULL;
    }
    return forward_frames(p, dst, f->batch, f->i, f->i + 1, 1, NULL, 0, 0);
}

static PyObject *Port_forward_batch(PortObject *p, PyObject *args)
{
    long long dst;
    BatchObject *b;
    if (!PyArg_ParseTuple(args, "O&O!", conv_dst, &dst, &Batch_Type, &b))
        return NULL;
    return forward_frames(p, dst, b, 0, b->n, 0, NULL, 0, 0);
}

/* forward_where(dst, batch, codes, code, incarnation=0) -> int: forward, without copying, the frames i of the
 * batch with codes[i] == code (codes: one byte per frame, e.g. a function's verdicts). Frames
 * that did not fit stay in the batch; call again to retry them. */
static PyObject *Port_forward_where(PortObject *p, PyObject *args)
{
    long long dst;
    BatchObject *b;
    Py_buffer cb;
    unsigned int code, want = 0;
    if (!PyArg_ParseTuple(args, "O&O!y*O&|O&", conv_dst, &dst, &Batch_Type, &b, &cb, conv_code, &code,
                          conv_incarnation, &want))
        return NULL;
    if ((size_t)cb.len < b->n) {
        PyBuffer_Release(&cb);
        PyErr_Format(PyExc_ValueError, "codes has %zd entries for a batch of %u frames", cb.len, b->n);
        return NULL;
    }
    PyObject *r = forward_frames(p, dst, b, 0, b->n, 0, (const uint8_t *)cb.buf, (uint8_t)code, want);
    PyBuffer_Release(&cb);
    return r;
}

/* --- fileno(): eventfd fed by a notifier thread ------------------------------------------------ */

static void *notifier_main(void *arg)
{
    PortObject *p = arg;
    sf_node *me = p->me;
    while (!LOAD_ACQUIRE(&p->notifier_stop)) {
        /* Our entry reclaimed (this process was stopped) and maybe claimed again: stop touching
         * it. The eventfd is made readable once more, so a select() on it returns and the next
         * receive raises NodeReclaimedError. */
        if (!port_alive(p))
            break;
        if (LOAD_ACQUIRE(&p->signalled)) {
            /* wait until the consumer drained and cleared the eventfd */
            syscall(SYS_futex, &p->signalled, FUTEX_WAIT_PRIVATE, 1, &(struct timespec){0, 100000000}, NULL, 0);
            continue;
        }
        uint32_t seq = LOAD_ACQUIRE(&me->doorbell);
        if (!waiting_enter(p)) { /* not our incarnation's count any more (or 65535 sleepers) */
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
            continue;
        }
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* F2 pairs with F1 */
        if (!port_alive(p) || inbound_pending(p)) {
            /* signalled: until the consumer drains, nobody sleeps on the doorbell, so senders
             * need not ring it (a system call per send otherwise) */
            waiting_leave(p);
            if (!port_alive(p))
                break;
            STORE_RELEASE(&p->signalled, 1);
            uint64_t one = 1;
            ssize_t w = write(p->efd, &one, sizeof one);
            (void)w;
            continue;
        }
        futex_wait(&me->doorbell, seq, 100000000);
        waiting_leave(p);
    }
    if (!LOAD_ACQUIRE(&p->notifier_stop)) { /* left because of the reclaim */
        STORE_RELEASE(&p->signalled, 1);
        uint64_t one = 1;
        ssize_t w = write(p->efd, &one, sizeof one);
        (void)w;
    }
    return NULL;
}

static void port_clear_signal(PortObject *p)
{
    uint64_t v;
    if (!LOAD_ACQUIRE(&p->signalled))
        return;
    ssize_t rd = read(p->efd, &v, sizeof v); /* non-blocking */
    (void)rd;
    STORE_RELEASE(&p->signalled, 0);
    syscall(SYS_futex, &p->signalled, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static PyObject *Port_fileno(PortObject *p, PyObject *noargs)
{
    CHECK_OPEN(p);
    if (!p->notifier_on) {
        p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (p->efd < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        p->notifier_stop = 0;
        p->signalled = 0;
        if (pthread_create(&p->notifier, NULL, notifier_main, p) != 0) {
            close(p->efd);
            p->efd = -1;
            PyErr_SetString(FabricError, "cannot start the wake-up thread");
            return NULL;
        }
        p->notifier_on = 1;
    }
    return PyLong_FromLong(p->efd);
}

static void port_stop_notifier(PortObject *p)
{
    if (!p->notifier_on)
        return;
    if (port_foreign(p)) { /* the thread stayed in the parent: nothing to stop or join here */
        close(p->efd);
        p->efd = -1;
        p->notifier_on = 0;
        return;
    }
    STORE_RELEASE(&p->notifier_stop, 1);
    __atomic_fetch_add(&p->me->doorbell, 1, __ATOMIC_RELEASE);
    futex_wake(&p->me->doorbell, INT_MAX);
    STORE_RELEASE(&p->signalled, 0);
    syscall(SYS_futex, &p->signalled, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(p->notifier, NULL);
    Py_END_ALLOW_THREADS
    close(p->efd);
    p->efd = -1;
    p->notifier_on = 0;
}

/* --- misc ------------------------------------------------------------------------------------ */

static PyObject *Port_set_wait_mode(PortObject *p, PyObject *args)
{
    int mode;
    double spin_us = 50.0;
    if (!PyArg_ParseTuple(args, "i|d", &mode, &spin_us))
        return NULL;
    if (mode < WAIT_POLL || mode > WAIT_ADAPTIVE) {
        PyErr_SetString(PyExc_ValueError, "wait mode must be 0 (poll), 1 (block) or 2 (adaptive)");
        return NULL;
    }
    p->wait_mode = mode;
    p->spin_ns = (int64_t)(spin_us * 1000.0);
    Py_RETURN_NONE;
}

#define VIEWS_MSG "%zd memoryview(s) of this node's buffers or frames still exist; release them (or leave their " \
                  "`with memoryview(...)` blocks) before detaching"

/* seal(): the first step of a detach. Refuses (BufferError) while memoryviews of the node's
 * buffers or frames exist; otherwise no new one can be taken from here on, so the close that
 * follows (after the BYE, which releases the GIL while it waits for the tape lock) cannot be
 * refused by a view taken meanwhile, half-way through the detach. */
static PyObject *Port_seal(PortObject *p, PyObject *noargs)
{
    if (p->closed || port_foreign(p))
        Py_RETURN_NONE;
    if (p->exports) {
        PyErr_Format(PyExc_BufferError, VIEWS_MSG, p->exports);
        return NULL;
    }
    p->sealed = 1;
    Py_RETURN_NONE;
}

static PyObject *Port_close(PortObject *p, PyObject *noargs)
{
    /* A memoryview of a buffer or a received frame writes into its slot; once the node is gone
     * the slot is another node's, so close (detach) is refused while any exists, as a batch's
     * release is. (An inherited handle in a forked child only drops its copy: nothing is freed.) */
    if (p->exports && !p->closed && !port_foreign(p)) {
        PyErr_Format(PyExc_BufferError, VIEWS_MSG, p->exports);
        return NULL;
    }
    port_close(p);
    Py_RETURN_NONE;
}

static PyObject *Port_heartbeat(PortObject *p, PyObject *noargs)
{
    /* Not once the entry was reclaimed: it may be another node's now, and our beat would keep
     * that node looking alive after it died. No error: the watchdog beats for every node. */
    if (!p->closing && port_alive(p))
        STORE_RELAXED(&p->me->heartbeat_ns, now_ns());
    Py_RETURN_NONE;
}

static PyObject *Port_get_exports(PortObject *p, void *c) { return PyLong_FromSsize_t(p->exports); }
static PyObject *Port_get_reclaimed(PortObject *p, void *c)
{
    return PyBool_FromLong(p->closed == 2 || (!p->closing && !port_foreign(p) && !port_alive(p)));
}

static PyObject *Port_stats(PortObject *p, PyObject *noargs)
{
    sf_node *m = p->me;
    uint64_t cached = 0;
    for (uint32_t i = 0; i < p->r.sb->n_networks && i < SF_MAX_NETWORKS; i++)
        cached += p->ncache[i];
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}",
                         "tx_frames", (unsigned long long)m->tx_frames, "tx_bytes", (unsigned long long)m->tx_bytes,
                         "rx_frames", (unsigned long long)m->rx_frames, "rx_bytes", (unsigned long long)m->rx_bytes,
                         "tx_ring_full", (unsigned long long)m->tx_ring_full, "tx_drops", (unsigned long long)m->tx_drops,
                         "tx_nobuf", (unsigned long long)m->tx_nobuf, "rx_lapped", (unsigned long long)m->rx_lapped,
                         "rx_bad", (unsigned long long)m->rx_bad,
                         "tape_rx", (unsigned long long)m->tape_rx, "tape_tx", (unsigned long long)m->tape_tx,
                         "wakeups", (unsigned long long)m->wakeups, "cached_slots", (unsigned long long)cached);
}

static PyObject *Port_get_mac(PortObject *p, void *c) { return PyBytes_FromStringAndSize((char *)p->mac, 6); }
static PyObject *Port_get_index(PortObject *p, void *c) { return PyLong_FromUnsignedLong(p->index); }
static PyObject *Port_get_tag(PortObject *p, void *c) { return PyLong_FromUnsignedLong(p->tag); }

static PyGetSetDef Port_getset[] = {
    {"mac", (getter)Port_get_mac, NULL, "this node's fabric MAC address", NULL},
    {"index", (getter)Port_get_index, NULL, "this node's index (its id)", NULL},
    {"tag", (getter)Port_get_tag, NULL, "owner tag of slots this node holds", NULL},
    {"exports", (getter)Port_get_exports, NULL, "memoryviews of this node's buffers and frames alive", NULL},
    {"reclaimed", (getter)Port_get_reclaimed, NULL, "True if this node's entry was reclaimed under it", NULL},
    {NULL}};

static PyMethodDef Port_methods[] = {
    {"send_batch", (PyCFunction)(void (*)(void))Port_send_batch, METH_VARARGS | METH_KEYWORDS, "Copy frames into slots and enqueue; returns how many were sent."},
    {"send", (PyCFunction)(void (*)(void))Port_send, METH_VARARGS | METH_KEYWORDS, "Send one frame; False if the ring was full."},
    {"recv_batch", (PyCFunction)(void (*)(void))Port_recv_batch, METH_VARARGS | METH_KEYWORDS, "Receive up to max_frames zero-copy frames."},
    {"recv_control", (PyCFunction)(void (*)(void))Port_recv_control, METH_VARARGS | METH_KEYWORDS, "Take the control messages ahead of any data frame in each inbound ring and tape, without blocking."},
    {"wait", (PyCFunction)Port_wait, METH_VARARGS, "Block until frames may be waiting."},
    {"alloc", (PyCFunction)Port_alloc, METH_NOARGS, "Allocate a slot for a zero-copy send."},
    {"send_buffer", (PyCFunction)(void (*)(void))Port_send_buffer, METH_VARARGS | METH_KEYWORDS, "Send an allocated buffer without copying."},
    {"forward", (PyCFunction)Port_forward, METH_VARARGS, "Forward one received frame without copying."},
    {"forward_batch", (PyCFunction)Port_forward_batch, METH_VARARGS, "Forward every frame of a batch without copying."},
    {"forward_where", (PyCFunction)Port_forward_where, METH_VARARGS, "Forward the frames whose code matches, without copying."},
    {"tape_send", (PyCFunction)Port_tape_send, METH_VARARGS, "Write a frame to the broadcast (0) or a multicast tape."},
    {"set_mcast", (PyCFunction)Port_set_mcast, METH_O, "Choose the multicast tapes to read."},
    {"fileno", (PyCFunction)Port_fileno, METH_NOARGS, "An fd that is readable while frames may be waiting."},
    {"set_wait_mode", (PyCFunction)Port_set_wait_mode, METH_VARARGS, "0 poll, 1 block, 2 adaptive."},
    {"heartbeat", (PyCFunction)Port_heartbeat, METH_NOARGS, "Record that this node is alive."},
    {"stats", (PyCFunction)Port_stats, METH_NOARGS, "This node's counters."},
    {"seal", (PyCFunction)Port_seal, METH_NOARGS, "Refuse new memoryviews (BufferError if some exist): before close()."},
    {"close", (PyCFunction)Port_close, METH_NOARGS, "Return cached slots and stop the wake-up thread."},
    {NULL}};

static PyTypeObject Port_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmfabric.core._fabric.Port",
    .tp_basicsize = sizeof(PortObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Port_init,
    .tp_dealloc = (destructor)Port_dealloc,
    .tp_methods = Port_methods,
    .tp_getset = Port_getset,
    .tp_doc = "One attached node's handle on the fabric (use shmfabric.Node).",
};

/* ------------------------------------------------------------------------------------------ */
/* FrameBatch and Frame                                                                        */

static void batch_release(BatchObject *b)
{
    if (b->released)
        return;
    PortObject *p = b->port;
    if (port_usable(p)) {
        for (uint32_t i = 0; i < b->n; i++)
            if (b->f[i].state == FS_OWNED)
                slot_put(p, b->f[i].pool, b->f[i].slot);
    }
    b->released = 1;
    PyMem_Free(b->scratch);
    b->scratch = NULL;
}

static void Batch_dealloc(BatchObject *b)
{
    batch_release(b);
    PyMem_Free(b->f);
    Py_XDECREF(b->control);
    Py_DECREF(b->port);
    PyObject_Free(b);
}

static PyObject *Batch_release(BatchObject *b, PyObject *noargs)
{
    if (b->exports) {
        PyErr_SetString(PyExc_BufferError, "memoryviews of this batch's frames still exist; release them before the batch");
        return NULL;
    }
    batch_release(b);
    Py_RETURN_NONE;
}

static Py_ssize_t Batch_len(BatchObject *b) { return b->n; }

static FrameObject *frame_free_list[256];
static int frame_free_count;

/* A Frame view of frame i of batch b; frames are recycled through a free list because one is made
 * per frame received. */
static PyObject *new_frame(BatchObject *b, uint32_t i)
{
    FrameObject *f;
    if (frame_free_count) {
        f = frame_free_list[--frame_free_count];
        _Py_NewReference((PyObject *)f);
    } else {
        f = PyObject_New(FrameObject, &Frame_Type);
        if (!f)
            return NULL;
    }
    Py_INCREF(b);
    f->batch = b;
    f->i = i;
    return (PyObject *)f;
}

static PyObject *Batch_item(BatchObject *b, Py_ssize_t i)
{
    if (i < 0 || (size_t)i >= b->n) {
        PyErr_SetString(PyExc_IndexError, "frame index out of range");
        return NULL;
    }
    if (batch_check(b) < 0)
        return NULL;
    return new_frame(b, (uint32_t)i);
}

/* A dedicated iterator: cheaper than the generic sequence iterator, which goes through
 * sq_item and raises IndexError at the end. */
typedef struct {
    PyObject_HEAD
    BatchObject *batch;
    uint32_t i;
} BatchIterObject;

static PyTypeObject BatchIter_Type;

static PyObject *Batch_iter(BatchObject *b)
{
    if (batch_check(b) < 0)
        return NULL;
    BatchIterObject *it = PyObject_New(BatchIterObject, &BatchIter_Type);
    if (!it)
        return NULL;
    Py_INCREF(b);
    it->batch = b;
    it->i = 0;
    return (PyObject *)it;
}

static PyObject *BatchIter_next(BatchIterObject *it)
{
    BatchObject *b = it->batch;
    if (it->i >= b->n)
        return NULL;
    if (batch_check(b) < 0)
        return NULL;
    return new_frame(b, it->i++);
}

static void BatchIter_dealloc(BatchIterObject *it)
{
    Py_DECREF(it->batch);
    PyObject_Free(it);
}

static PyTypeObject BatchIter_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmfabric.core._fabric.FrameBatchIterator",
    .tp_basicsize = sizeof(BatchIterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)BatchIter_dealloc,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)BatchIter_next,
};

static PyObject *Batch_enter(BatchObject *b, PyObject *noargs)
{
    Py_INCREF(b);
    return (PyObject *)b;
}

static PyObject *Batch_exit(BatchObject *b, PyObject *args)
{
    if (b->exports) {
        PyErr_SetString(PyExc_BufferError, "memoryviews of this batch's frames still exist; release them before the batch");
        return NULL;
    }
    batch_release(b);
    Py_RETURN_FALSE;
}

static PyObject *Batch_get_released(BatchObject *b, void *c) { return PyBool_FromLong(b->released); }

/* lengths() -> list of payload lengths, a cheap way to look at a whole batch */
static PyObject *Batch_total_bytes(BatchObject *b, void *c)
{
    uint64_t t = 0;
    for (uint32_t i = 0; i < b->n; i++)
        t += b->f[i].len >= SF_ETH_HLEN ? b->f[i].len - SF_ETH_HLEN : 0;
    return PyLong_FromUnsignedLongLong(t);
}

/* gather(width=None) -> bytes: one record per frame, `4 + width` bytes each: the payload length
 * (big-endian u32), then the first `width` payload bytes, zero-padded. width None = the longest
 * payload of the batch. One copy per batch, so header parsing can run struct.iter_unpack over
 * the whole batch instead of acquiring each frame's buffer. */
static PyObject *Batch_gather(BatchObject *b, PyObject *args)
{
    PyObject *wobj = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &wobj))
        return NULL;
    if (batch_check(b) < 0)
        return NULL;
    if (!port_usable(b->port)) {
        PyErr_SetString(ReleasedError, "frame batch belongs to a closed or reclaimed node, or to the parent process");
        return NULL;
    }
    uint32_t width = 0;
    for (uint32_t i = 0; i < b->n; i++) {
        if (b->f[i].state == FS_GONE) {
            PyErr_SetString(ReleasedError, "a frame of the batch was forwarded; it belongs to its new receiver now");
            return NULL;
        }
        uint32_t len = b->f[i].len >= SF_ETH_HLEN ? b->f[i].len - SF_ETH_HLEN : 0;
        if (len > width)
            width = len;
    }
    if (wobj != Py_None) {
        long w = PyLong_AsLong(wobj);
        if (w == -1 && PyErr_Occurred())
            return NULL;
        if (w < 0 || w > 65536) {
            PyErr_SetString(PyExc_ValueError, "width must be between 0 and 65536");
            return NULL;
        }
        width = (uint32_t)w;
    }
    size_t rec = 4 + (size_t)width;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(rec * b->n));
    if (!out)
        return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    for (uint32_t i = 0; i < b->n; i++, o += rec) {
        frame_ref *fr = &b->f[i];
        uint32_t len = fr->len >= SF_ETH_HLEN ? fr->len - SF_ETH_HLEN : 0;
        uint32_t take = len < width ? len : width;
        o[0] = (uint8_t)(len >> 24); o[1] = (uint8_t)(len >> 16); o[2] = (uint8_t)(len >> 8); o[3] = (uint8_t)len;
        memcpy(o + 4, fr->data + SF_ETH_HLEN, take);
        memset(o + 4 + take, 0, width - take);
    }
    return out;
}

static PySequenceMethods Batch_as_sequence = {.sq_length = (lenfunc)Batch_len, .sq_item = (ssizeargfunc)Batch_item};

static PyMethodDef Batch_methods[] = {
    {"release", (PyCFunction)Batch_release, METH_NOARGS, "Give every frame's slot back to the pool."},
    {"gather", (PyCFunction)Batch_gather, METH_VARARGS, "Every frame's length and first payload bytes, in one bytes object."},
    {"__enter__", (PyCFunction)Batch_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Batch_exit, METH_VARARGS, NULL},
    {NULL}};

static PyObject *Batch_get_control(BatchObject *b, void *c)
{
    if (!b->control)
        Py_RETURN_NONE;
    Py_INCREF(b->control);
    return b->control;
}

static PyGetSetDef Batch_getset[] = {
    {"control", (getter)Batch_get_control, NULL, "internal control frames seen (list of bytes) or None", NULL},
    {"released", (getter)Batch_get_released, NULL, "True once release() ran", NULL},
    {"payload_bytes", (getter)Batch_total_bytes, NULL, "sum of the payload lengths", NULL},
    {NULL}};

static PyTypeObject Batch_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmfabric.core._fabric.FrameBatch",
    .tp_basicsize = sizeof(BatchObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Batch_dealloc,
    .tp_as_sequence = &Batch_as_sequence,
    .tp_iter = (getiterfunc)Batch_iter,
    .tp_methods = Batch_methods,
    .tp_getset = Batch_getset,
    .tp_doc = "Frames received in one call; zero-copy views valid until release().",
};

static void Frame_dealloc(FrameObject *f)
{
    Py_DECREF(f->batch);
    if (frame_free_count < 256)
        frame_free_list[frame_free_count++] = f;
    else
        PyObject_Free(f);
}

static inline frame_ref *frame_ref_checked(FrameObject *f)
{
    if (f->batch->released || f->batch->port->closing) {
        PyErr_SetString(ReleasedError, "frame's batch was released; the frame is no longer valid");
        return NULL;
    }
    if (port_foreign(f->batch->port)) {
        PyErr_SetString(ReleasedError, "frame belongs to the parent process (received before fork)");
        return NULL;
    }
    frame_ref *fr = &f->batch->f[f->i];
    if (fr->state == FS_GONE) {
        PyErr_SetString(ReleasedError, "frame was forwarded; it belongs to its new receiver now");
        return NULL;
    }
    return fr;
}

static Py_ssize_t Frame_len(FrameObject *f)
{
    frame_ref *fr = frame_ref_checked(f);
    if (!fr)
        return -1;
    return fr->len >= SF_ETH_HLEN ? fr->len - SF_ETH_HLEN : 0;
}

static PyObject *Frame_item(FrameObject *f, Py_ssize_t i)
{
    frame_ref *fr = frame_ref_checked(f);
    if (!fr)
        return NULL;
    Py_ssize_t n = fr->len >= SF_ETH_HLEN ? fr->len - SF_ETH_HLEN : 0;
    if (i < 0)
        i += n;
    if (i < 0 || i >= n) {
        PyErr_SetString(PyExc_IndexError, "payload index out of range");
        return NULL;
    }
    return PyLong_FromLong(fr->data[SF_ETH_HLEN + i]);
}

static int Frame_getbuffer(FrameObject *f, Py_buffer *view, int flags)
{
    frame_ref *fr = frame_ref_checked(f);
    if (!fr)
        return -1;
    if (!port_usable(f->batch->port)) { /* reclaimed under us: the slot is not ours (writable view) */
        PyErr_SetString(ReleasedError, "frame's node was reclaimed; the frame is no longer valid");
        return -1;
    }
    if (f->batch->port->sealed) {
        PyErr_SetString(ReleasedError, "frame's node is detaching; the frame is no longer valid");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)f, fr->data + SF_ETH_HLEN, fr->len >= SF_ETH_HLEN ? fr->len - SF_ETH_HLEN : 0,
                          0, flags) < 0)
        return -1;
    f->batch->exports++;
    f->batch->port->exports++; /* detach refuses while views exist (they would write a freed slot) */
    return 0;
}

static void Frame_releasebuffer(FrameObject *f, Py_buffer *view)
{
    f->batch->exports--;
    f->batch->port->exports--;
}

/* The whole frame (header + payload) as a buffer, for adapters that hand frames to a TAP. */
typedef struct {
    PyObject_HEAD
    FrameObject *frame;
} RawObject;

static PyObject *Frame_get_payload(FrameObject *f, void *c)
{
    if (!frame_ref_checked(f))
        return NULL;
    return PyMemoryView_FromObject((PyObject *)f);
}

static PyObject *Frame_get_raw(FrameObject *f, void *c)
{
    frame_ref *fr = frame_ref_checked(f);
    if (!fr)
        return NULL;
    /* a copy: raw frames go to kernels (TAP writes) that copy anyway */
    return PyBytes_FromStringAndSize((char *)fr->data, fr->len);
}

static PyObject *Frame_get_src(FrameObject *f, void *c)
{
    frame_ref *fr = frame_ref_checked(f);
    if (!fr)
        return NULL;
    if (fr->len < SF_ETH_HLEN)
        Py_RETURN_NONE;
    return PyLong_FromLong(((long)fr->data[10] << 8) | fr->data[11]);
}

static PyObject *Frame_get_src_mac(FrameObject *f, void *c)
{
    frame_ref *fr = frame_ref_checked(f);
    if (!fr)
        return NULL;
    return PyBytes_FromStringAndSize((char *)fr->data + 6, fr->len >= 12 ? 6 : 0);
}

static PyObject *Frame_get_dst(FrameObject *f, void *c)
{
    frame_ref *fr = frame_ref_checked(f);
    if (!fr)
        return NULL;
    return PyBytes_FromStringAndSize((char *)fr->data, fr->len >= 6 ? 6 : 0);
}

static PyObject *Frame_get_ethertype(FrameObject *f, void *c)
{
    frame_ref *fr = frame_ref_checked(f);
    if (!fr)
        return NULL;
    if (fr->len < SF_ETH_HLEN)
        Py_RETURN_NONE;
    return PyLong_FromLong(((long)fr->data[12] << 8) | fr->data[13]);
}

static PyObject *Frame_get_meta(FrameObject *f, void *c)
{
    frame_ref *fr = frame_ref_checked(f);
    return fr ? PyLong_FromUnsignedLong(fr->meta) : NULL;
}

static PyObject *Frame_get_control(FrameObject *f, void *c)
{
    frame_ref *fr = frame_ref_checked(f);
    return fr ? PyBool_FromLong(fr->flags & SF_DESC_CONTROL) : NULL;
}

static PyObject *Frame_get_copied(FrameObject *f, void *c)
{
    frame_ref *fr = frame_ref_checked(f);
    return fr ? PyBool_FromLong(fr->state == FS_COPY) : NULL;
}

static PyObject *Frame_bytes(FrameObject *f, PyObject *noargs)
{
    frame_ref *fr = frame_ref_checked(f);
    if (!fr)
        return NULL;
    return PyBytes_FromStringAndSize((char *)fr->data + SF_ETH_HLEN, fr->len >= SF_ETH_HLEN ? fr->len - SF_ETH_HLEN : 0);
}

static PyObject *Frame_repr(FrameObject *f)
{
    if (f->batch->released)
        return PyUnicode_FromString("<Frame (released)>");
    frame_ref *fr = &f->batch->f[f->i];
    return PyUnicode_FromFormat("<Frame len=%u ethertype=0x%04x%s>", fr->len >= SF_ETH_HLEN ? fr->len - SF_ETH_HLEN : 0,
                                fr->len >= SF_ETH_HLEN ? (fr->data[12] << 8 | fr->data[13]) : 0,
                                fr->state == FS_GONE ? " forwarded" : "");
}

static PySequenceMethods Frame_as_sequence = {.sq_length = (lenfunc)Frame_len, .sq_item = (ssizeargfunc)Frame_item};
static PyBufferProcs Frame_as_buffer = {(getbufferproc)Frame_getbuffer, (releasebufferproc)Frame_releasebuffer};

static PyGetSetDef Frame_getset[] = {
    {"payload", (getter)Frame_get_payload, NULL, "zero-copy memoryview of the payload", NULL},
    {"raw", (getter)Frame_get_raw, NULL, "the whole frame, header included, as bytes (a copy)", NULL},
    {"src", (getter)Frame_get_src, NULL, "source node id (last two bytes of the source address)", NULL},
    {"src_mac", (getter)Frame_get_src_mac, NULL, "source address (6 bytes)", NULL},
    {"dst", (getter)Frame_get_dst, NULL, "destination address (6 bytes)", NULL},
    {"ethertype", (getter)Frame_get_ethertype, NULL, "EtherType", NULL},
    {"meta", (getter)Frame_get_meta, NULL, "the sender's metadata word (tape frames: the writer's id)", NULL},
    {"control", (getter)Frame_get_control, NULL, "True for internal control frames", NULL},
    {"copied", (getter)Frame_get_copied, NULL, "True for broadcast/multicast frames (copied out of the tape)", NULL},
    {NULL}};

static PyMethodDef Frame_methods[] = {{"tobytes", (PyCFunction)Frame_bytes, METH_NOARGS, "A copy of the payload."}, {NULL}};

static PyTypeObject Frame_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmfabric.core._fabric.Frame",
    .tp_basicsize = sizeof(FrameObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Frame_dealloc,
    .tp_as_sequence = &Frame_as_sequence,
    .tp_as_buffer = &Frame_as_buffer,
    .tp_getset = Frame_getset,
    .tp_methods = Frame_methods,
    .tp_repr = (reprfunc)Frame_repr,
    .tp_doc = "A received frame: a zero-copy view valid until its batch is released.",
};

/* ------------------------------------------------------------------------------------------ */
/* module                                                                                      */

static PyObject *layout_dict(void)
{
    PyObject *d = PyDict_New();
#define PUT(k, v) PyDict_SetItemString(d, k, PyLong_FromUnsignedLongLong((unsigned long long)(v)))
#define OFF(T, f) PUT(#T "." #f, offsetof(T, f))
    PUT("magic", SF_MAGIC);
    PUT("version", SF_VERSION);
    PUT("max_networks", SF_MAX_NETWORKS);
    PUT("name_len", SF_NAME_LEN);
    PUT("max_nodes", SF_MAX_NODES);
    PUT("eth_hlen", SF_ETH_HLEN);
    PUT("waiting_count", SF_WAITING_COUNT);
    PUT("sizeof.superblock", sizeof(sf_superblock));
    PUT("sizeof.node", sizeof(sf_node));
    PUT("sizeof.network", sizeof(sf_network));
    PUT("sizeof.ring", sizeof(sf_ring));
    PUT("sizeof.desc", sizeof(sf_desc));
    PUT("sizeof.tape", sizeof(sf_tape));
    PUT("sizeof.tape_entry", sizeof(sf_tape_entry));
    OFF(sf_superblock, magic); OFF(sf_superblock, version); OFF(sf_superblock, superblock_size);
    OFF(sf_superblock, total_size); OFF(sf_superblock, max_nodes); OFF(sf_superblock, ring_size);
    OFF(sf_superblock, n_networks); OFF(sf_superblock, n_mcast); OFF(sf_superblock, tape_entries);
    OFF(sf_superblock, tape_entry_size); OFF(sf_superblock, flags); OFF(sf_superblock, node_size);
    OFF(sf_superblock, off_nodes); OFF(sf_superblock, off_networks); OFF(sf_superblock, off_rings);
    OFF(sf_superblock, ring_stride); OFF(sf_superblock, off_tapes); OFF(sf_superblock, tape_stride);
    OFF(sf_superblock, created_ns); OFF(sf_superblock, creator_pid); OFF(sf_superblock, name);
    OFF(sf_superblock, node_hwm); OFF(sf_superblock, pool_lock); OFF(sf_superblock, sweeping);
    OFF(sf_superblock, sweep_pending);
    OFF(sf_superblock, swept_slots); OFF(sf_superblock, sweeps);
    OFF(sf_node, state); OFF(sf_node, gen); OFF(sf_node, pid); OFF(sf_node, network); OFF(sf_node, start_time);
    OFF(sf_node, pidns); OFF(sf_node, heartbeat_ns); OFF(sf_node, name); OFF(sf_node, doorbell); OFF(sf_node, waiting);
    OFF(sf_node, tx_frames); OFF(sf_node, tx_bytes); OFF(sf_node, rx_frames); OFF(sf_node, rx_bytes);
    OFF(sf_node, tx_ring_full); OFF(sf_node, tx_drops); OFF(sf_node, rx_lapped); OFF(sf_node, rx_bad); OFF(sf_node, tape_rx);
    OFF(sf_node, tape_tx); OFF(sf_node, wakeups); OFF(sf_node, tx_nobuf); OFF(sf_node, cached); OFF(sf_node, mcast_mask);
    OFF(sf_node, pool_ops);
    OFF(sf_network, mtu); OFF(sf_network, slot_size); OFF(sf_network, headroom); OFF(sf_network, n_slots);
    OFF(sf_network, off_next); OFF(sf_network, off_chain); OFF(sf_network, off_owner); OFF(sf_network, off_slots);
    OFF(sf_network, free_head); OFF(sf_network, free_count);
    OFF(sf_ring, head); OFF(sf_ring, down); OFF(sf_ring, tail); OFF(sf_ring, desc);
    OFF(sf_tape, group); OFF(sf_tape, head); OFF(sf_tape, entries);
    OFF(sf_tape_entry, seq); OFF(sf_tape_entry, len);
#undef OFF
#undef PUT
    return d;
}


/* ------------------------------------------------------------------------------------------ */
/* 16-bit ring indices shared with foreign rings (memif)                                       */
/* A memif ring's head and tail are 16-bit words the peer (DPDK, VPP) reads and writes with
 * acquire/release ordering: descriptors are written before the index that publishes them and
 * read after the index is seen. Python's struct/memoryview give no ordering, so these two
 * helpers give it, on any writable buffer (an mmap of the peer's region). */

static int u16_at(PyObject *args, Py_buffer *view, Py_ssize_t *off, unsigned *value, int store)
{
    if (store ? !PyArg_ParseTuple(args, "w*nI", view, off, value) : !PyArg_ParseTuple(args, "w*n", view, off))
        return -1;
    if (*off < 0 || *off + 2 > view->len || (*off & 1) || (((uintptr_t)view->buf + (uintptr_t)*off) & 1)) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not an aligned 16-bit word inside the %zd-byte buffer",
                     *off, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    if (store && *value > 0xFFFF) {
        PyErr_Format(PyExc_ValueError, "value %u does not fit 16 bits", *value);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *mod_load_u16_acquire(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t off;
    unsigned v;
    if (u16_at(args, &view, &off, &v, 0) < 0)
        return NULL;
    v = __atomic_load_n((uint16_t *)((char *)view.buf + off), __ATOMIC_ACQUIRE);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(v);
}

static PyObject *mod_store_u16_release(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t off;
    unsigned v;
    if (u16_at(args, &view, &off, &v, 1) < 0)
        return NULL;
    __atomic_store_n((uint16_t *)((char *)view.buf + off), (uint16_t)v, __ATOMIC_RELEASE);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------ */
/* memif rings (a DPDK or VPP peer's descriptors)                                              */
/* The per-frame work of `shmfabric memif` (adapters/memif.py): walking the peer's descriptors,
 * checking each against its region and copying the bytes. In Python it cost ~0.8 us a frame
 * (1.1-1.7 M frames/s against testpmd's 20-50 M); these two passes do it for a whole batch. The
 * Python layer keeps the protocol: the handshake, the indices (read and published with
 * acquire/release through the helpers above), chained frames it writes, checksums, faults.
 *
 * A descriptor is 16 bytes in the host's order (little-endian: x86, arm64): flags u16, region
 * u16, length u32, offset u32, metadata u32. The peer can rewrite its memory at any moment, so each descriptor is read once
 * into registers (the empty asm keeps the compiler from reading it again) and every check and
 * copy uses those values. */

#define MEMIF_DESC_NEXT 1
#define MEMIF_MAX_REGIONS 256
#define MEMIF_VIA (-1) /* memif_take's key for the frames that go through the via chain */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "memif descriptors are decoded as little-endian");

typedef struct {
    uint16_t flags, region;
    uint32_t length, offset;
} memif_desc;

/* The arguments' ranges, checked (PyArg's "I" and "K" would wrap -1 or 2^32 + 1 silently); the
 * index and count converters are with the others, at the top. */
static int conv_memif_offset(PyObject *o, void *out)
{
    return parse_uint_arg(o, PY_SSIZE_T_MAX, "a memif offset", (unsigned long long *)out);
}

static inline memif_desc memif_read(const uint8_t *p)
{
    uint64_t a, b;
    memcpy(&a, p, 8);
    memcpy(&b, p + 8, 8);
    __asm__ volatile("" : "+r"(a), "+r"(b));
    memif_desc d = {(uint16_t)a, (uint16_t)(a >> 16), (uint32_t)(a >> 32), (uint32_t)b};
    return d;
}

typedef struct {
    Py_buffer view[MEMIF_MAX_REGIONS];
    Py_ssize_t n;
} memif_regions;

static void memif_regions_free(memif_regions *m)
{
    if (!m)
        return;
    for (Py_ssize_t i = 0; i < m->n; i++)
        PyBuffer_Release(&m->view[i]);
    PyMem_Free(m);
}

/* The peer's regions as buffers (writable ones to write frames into), in region-index order;
 * NULL with an exception set if they cannot be had. */
static memif_regions *memif_regions_new(PyObject *seq, int writable)
{
    /* a tuple of our own: getting a buffer can run Python code (__buffer__) that changes a list */
    PyObject *fast = PySequence_Tuple(seq);
    if (!fast) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "regions must be a sequence of buffers");
        }
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(fast);
    memif_regions *m = NULL;
    if (n > MEMIF_MAX_REGIONS)
        PyErr_Format(PyExc_ValueError, "%zd regions; at most %d", n, MEMIF_MAX_REGIONS);
    else if (!(m = PyMem_Malloc(sizeof *m)))
        PyErr_NoMemory();
    else {
        m->n = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(fast, i), &m->view[i], writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
                memif_regions_free(m);
                m = NULL;
                break;
            }
            m->n = i + 1;
        }
    }
    Py_DECREF(fast);
    return m;
}

/* Whether descriptor `d` lies inside one of the regions (64-bit sums: no wrap-around). */
static inline const uint8_t *memif_where(const memif_regions *m, memif_desc d, uint32_t length)
{
    if (d.region >= m->n || (uint64_t)d.offset + length > (uint64_t)m->view[d.region].len)
        return NULL;
    return (const uint8_t *)m->view[d.region].buf + d.offset;
}

static int memif_ring_check(const Py_buffer *ring, unsigned long long desc, unsigned int mask)
{
    if (mask > 0xFFFF || (mask & (mask + 1)) || desc > (unsigned long long)ring->len ||
        (unsigned long long)ring->len - desc < ((unsigned long long)mask + 1) * 16) {
        PyErr_Format(PyExc_ValueError, "a ring of %u descriptors at offset %llu does not fit the %zd-byte buffer "
                     "(or its size is not a power of two up to 65536)", mask + 1, desc, ring->len);
        return -1;
    }
    return 0;
}

/* Where a frame taken from the peer goes: mirrors adapters/ethernet.py `classify` and `routed`
 * (tests compare them frame by frame). */
enum { MT_NODE, MT_VIA, MT_FLOOD, MT_SHORT, MT_SELF, MT_FOREIGN };

static int memif_classify(const uint8_t *f, uint32_t len, const uint8_t *own, const uint8_t *oui, int via,
                          uint32_t *node)
{
    if (len < SF_ETH_HLEN)
        return MT_SHORT;
    if (f[0] & 1)
        return MT_FLOOD;
    if (!memcmp(f, own, 6))
        return MT_SELF;
    if (memcmp(f, oui, 4))
        return MT_FOREIGN;
    *node = ((uint32_t)f[4] << 8) | f[5];
    if (!via)
        return MT_NODE;
    uint32_t et = ((uint32_t)f[12] << 8) | f[13];
    if (et == 0x0806)
        return MT_NODE; /* ARP never crosses a router */
    if (et != 0x86DD)
        return MT_VIA;
    const uint8_t *p = f + SF_ETH_HLEN; /* IPv6 neighbour discovery (ICMPv6 133-137) goes straight */
    if (len - SF_ETH_HLEN > 40 && p[6] == 58 && p[40] >= 133 && p[40] <= 137)
        return MT_NODE;
    return MT_VIA;
}

/* memif_take(ring, desc, mask, cursor, avail, limit, regions, max_len, own_mac, oui, via) ->
 * (taken, frames, groups, floods, bad, big, short, self, foreign): `groups` maps a node id (or
 * MEMIF_VIA: through the chain) to its frames, the destinations in the order each first appears
 * and each one's frames in the peer's order (as the Python loop this replaced sent them: two
 * destinations that share a ring, the via node's own and the chain, share it in that order). */
static PyObject *mod_memif_take(PyObject *self, PyObject *args)
{
    Py_buffer ring, own, oui;
    unsigned long long desc;
    unsigned int mask, cursor, avail, limit, max_len;
    PyObject *regions;
    int via;
    if (!PyArg_ParseTuple(args, "y*O&O&O&O&O&OO&y*y*p", &ring, conv_memif_offset, &desc, conv_memif_index, &mask,
                          conv_memif_index, &cursor, conv_memif_count, &avail, conv_memif_count, &limit, &regions,
                          conv_memif_count, &max_len, &own, &oui, &via))
        return NULL;
    PyObject *res = NULL, *groups = NULL, *floods = NULL;
    uint8_t *tmp = NULL;
    memif_regions *m = NULL;
    if (own.len != 6 || oui.len != 4) {
        PyErr_SetString(PyExc_ValueError, "own_mac must be 6 bytes and oui 4");
        goto out;
    }
    if (memif_ring_check(&ring, desc, mask) < 0 || !(m = memif_regions_new(regions, 0)))
        goto out;
    uint32_t size = mask + 1;
    if (avail > size)
        avail = size;
    if (limit > avail)
        limit = avail;
    groups = PyDict_New();
    floods = PyList_New(0);
    if (!groups || !floods)
        goto out;
    const uint8_t *descs = (const uint8_t *)ring.buf + desc;
    uint32_t taken = 0, frames = 0, bad = 0, big = 0, shrt = 0, self_ = 0, foreign = 0;
    long last_key = -2; /* (no key) */
    PyObject *last_list = NULL; /* borrowed from groups: consecutive frames mostly go to one place */
    while (taken < limit) {
        memif_desc d = memif_read(descs + (size_t)((cursor + taken) & mask) * 16);
        PyObject *frame = NULL;
        if (d.flags & MEMIF_DESC_NEXT) { /* a chain: gathered into one frame */
            uint32_t left = avail - taken, k, pos = 0, segs;
            uint64_t total = 0;
            int why = 0; /* 1: a part outside its region, 2: past max_len (then only counted) */
            if (!tmp && !(tmp = PyMem_Malloc(max_len ? max_len : 1))) {
                PyErr_NoMemory();
                goto out;
            }
            for (k = 0; k < left; k++) {
                memif_desc e = k ? memif_read(descs + (size_t)((cursor + taken + k) & mask) * 16) : d;
                if (!why) {
                    const uint8_t *src = memif_where(m, e, e.length);
                    total += e.length;
                    if (!src)
                        why = 1;
                    else if (total > max_len)
                        why = 2;
                    else {
                        memcpy(tmp + pos, src, e.length);
                        pos += e.length;
                    }
                }
                if (!(e.flags & MEMIF_DESC_NEXT))
                    break;
            }
            if (k == left) { /* no last descriptor yet */
                if (left < size)
                    break; /* the rest of the chain is not published yet */
                segs = left, why = 1; /* a ring-long chain never ends */
            } else
                segs = k + 1;
            taken += segs;
            frames++;
            if (why == 1)
                bad++;
            else if (why == 2)
                big++;
            else if (!(frame = PyBytes_FromStringAndSize((char *)tmp, pos)))
                goto out;
        } else {
            taken++;
            frames++;
            const uint8_t *src = memif_where(m, d, d.length);
            if (!src)
                bad++;
            else if (d.length > max_len)
                big++;
            else if (!(frame = PyBytes_FromStringAndSize((const char *)src, d.length)))
                goto out;
        }
        if (!frame)
            continue;
        /* classified from our own copy: the peer may change its bytes after we read them */
        uint32_t node = 0;
        const uint8_t *f = (const uint8_t *)PyBytes_AS_STRING(frame);
        int to = memif_classify(f, (uint32_t)PyBytes_GET_SIZE(frame), own.buf, oui.buf, via, &node);
        PyObject *list = NULL;
        if (to == MT_NODE || to == MT_VIA) {
            long k = to == MT_VIA ? MEMIF_VIA : (long)node;
            if (k == last_key)
                list = last_list;
            else {
                PyObject *key = PyLong_FromLong(k);
                if (!key) {
                    Py_DECREF(frame);
                    goto out;
                }
                list = PyDict_GetItemWithError(groups, key);
                if (!list && !PyErr_Occurred() && (list = PyList_New(0))) {
                    if (PyDict_SetItem(groups, key, list) < 0) {
                        Py_DECREF(list);
                        list = NULL;
                    } else
                        Py_DECREF(list); /* the dict holds it */
                }
                Py_DECREF(key);
                if (!list) {
                    Py_DECREF(frame);
                    goto out;
                }
                last_key = k, last_list = list;
            }
        } else if (to == MT_FLOOD)
            list = floods;
        else
            *(to == MT_SHORT ? &shrt : to == MT_SELF ? &self_ : &foreign) += 1;
        int err = list ? PyList_Append(list, frame) : 0;
        Py_DECREF(frame);
        if (err < 0)
            goto out;
    }
    res = Py_BuildValue("IIOOIIIII", taken, frames, groups, floods, bad, big, shrt, self_, foreign);
out:
    Py_XDECREF(groups);
    Py_XDECREF(floods);
    PyMem_Free(tmp);
    memif_regions_free(m);
    PyBuffer_Release(&ring);
    PyBuffer_Release(&own);
    PyBuffer_Release(&oui);
    return res;
}

/* memif_put(batch, start, ring, desc, mask, cursor, room, regions, server, buffer_size, buffers, special) ->
 * (next, written, cursor): frames batch[start:] written into the ring's next descriptors (not
 * published: the caller stores the index), each whole into one buffer. A server fills the buffers
 * the client gave (the descriptor's region, offset and length say where and how much); a client
 * its own fixed buffer of each descriptor (`buffers` + slot * `buffer_size`, in region 0). Stops
 * at `room` frames, or at the first frame this pass does not take, left to the caller: one whose
 * metadata has a bit of `special` (offloads to do), forwarded, larger than its buffer (chained by
 * the caller), or in a client's buffer outside its memory (the caller says why, drops the peer). */
static PyObject *mod_memif_put(PyObject *self, PyObject *args)
{
    PyObject *bobj, *regions;
    Py_buffer ring;
    unsigned long long desc, buffers;
    unsigned int start, mask, cursor, room, buffer_size, special;
    int server;
    if (!PyArg_ParseTuple(args, "O!O&w*O&O&O&O&OpO&O&O&", &Batch_Type, &bobj, conv_memif_count, &start, &ring,
                          conv_memif_offset, &desc, conv_memif_index, &mask, conv_memif_index, &cursor,
                          conv_memif_count, &room, &regions, &server, conv_memif_count, &buffer_size,
                          conv_memif_offset, &buffers, conv_memif_count, &special))
        return NULL;
    BatchObject *b = (BatchObject *)bobj;
    PyObject *res = NULL;
    memif_regions *m = NULL;
    if (b->released || b->port->closing || port_foreign(b->port)) {
        PyErr_SetString(ReleasedError, "the batch was released (or belongs to another process)");
        goto out;
    }
    if (memif_ring_check(&ring, desc, mask) < 0 || !(m = memif_regions_new(regions, 1)))
        goto out;
    if (!server && (!m->n || !buffer_size)) {
        PyErr_SetString(PyExc_ValueError, "a client writes into its region 0 with a buffer size");
        goto out;
    }
    uint8_t *descs = (uint8_t *)ring.buf + desc;
    uint32_t i = start, written = 0;
    for (; i < b->n && written < room; i++) {
        frame_ref *fr = &b->f[i];
        if (fr->state == FS_GONE || (fr->meta & special))
            break;
        uint8_t *dp = descs + (size_t)(cursor & mask) * 16;
        memif_desc d = {0};
        if (server) {
            d = memif_read(dp);
            if (!d.length || fr->len > d.length || !memif_where(m, d, d.length))
                break;
        } else {
            uint64_t off = buffers + (uint64_t)(cursor & mask) * buffer_size;
            if (fr->len > buffer_size || off > UINT32_MAX)
                break;
            d.region = 0, d.offset = (uint32_t)off;
            if (!memif_where(m, d, fr->len))
                break;
        }
        memcpy((uint8_t *)m->view[d.region].buf + d.offset, fr->data, fr->len);
        uint64_t a = (uint64_t)d.region << 16 | (uint64_t)fr->len << 32, z = d.offset; /* flags 0, metadata 0 */
        memcpy(dp, &a, 8);
        memcpy(dp + 8, &z, 8);
        cursor = (cursor + 1) & 0xFFFF;
        written++;
    }
    res = Py_BuildValue("III", i, written, cursor);
out:
    memif_regions_free(m);
    PyBuffer_Release(&ring);
    return res;
}

static PyMethodDef module_methods[] = {
    {"load_u16_acquire", mod_load_u16_acquire, METH_VARARGS,
     "load_u16_acquire(buffer, offset): the 16-bit word at offset, loaded with acquire ordering."},
    {"store_u16_release", mod_store_u16_release, METH_VARARGS,
     "store_u16_release(buffer, offset, value): store a 16-bit word at offset with release ordering."},
    {"memif_take", mod_memif_take, METH_VARARGS,
     "memif_take(ring, desc, mask, cursor, avail, limit, regions, max_len, own_mac, oui, via): frames a memif "
     "peer published, copied and sorted by destination (see adapters/memif.py)."},
    {"memif_put", mod_memif_put, METH_VARARGS,
     "memif_put(batch, start, ring, desc, mask, cursor, room, regions, server, buffer_size, buffers, special): frames "
     "of a batch written into a memif peer's ring, not yet published (see adapters/memif.py)."},
    {NULL},
};

static struct PyModuleDef fabric_module = {PyModuleDef_HEAD_INIT, "_fabric", "shmfabric compiled core", -1, module_methods};

PyMODINIT_FUNC PyInit__fabric(void)
{
    PyObject *m = PyModule_Create(&fabric_module);
    if (!m)
        return NULL;
    PyTypeObject *types[] = {&Region_Type, &Port_Type, &Batch_Type, &Frame_Type, &Buffer_Type, &BatchIter_Type};
    for (size_t i = 0; i < sizeof types / sizeof *types; i++)
        if (PyType_Ready(types[i]) < 0)
            return NULL;
    FabricError = PyErr_NewException("shmfabric.core._fabric.CoreError", NULL, NULL);
    RingDownError = PyErr_NewException("shmfabric.core._fabric.DestinationError", FabricError, NULL);
    ReleasedError = PyErr_NewException("shmfabric.core._fabric.ReleasedError", FabricError, NULL);
    PyModule_AddObject(m, "CoreError", FabricError);
    PyModule_AddObject(m, "DestinationError", RingDownError);
    PyModule_AddObject(m, "ReleasedError", ReleasedError);
    PyObject *bases = PyTuple_Pack(2, FabricError, PyExc_ValueError);
    FrameSizeError = PyErr_NewException("shmfabric.core._fabric.FrameSizeError", bases, NULL);
    Py_DECREF(bases);
    PyModule_AddObject(m, "FrameSizeError", FrameSizeError);
    NodeReclaimedError = PyErr_NewException("shmfabric.core._fabric.NodeReclaimedError", FabricError, NULL);
    PyModule_AddObject(m, "NodeReclaimedError", NodeReclaimedError);
    bases = PyTuple_Pack(2, FabricError, PyExc_TimeoutError);
    TapeBusyError = PyErr_NewException("shmfabric.core._fabric.TapeBusyError", bases, NULL);
    Py_DECREF(bases);
    PyModule_AddObject(m, "TapeBusyError", TapeBusyError);
    Py_INCREF(&Region_Type);
    PyModule_AddObject(m, "Region", (PyObject *)&Region_Type);
    Py_INCREF(&Port_Type);
    PyModule_AddObject(m, "Port", (PyObject *)&Port_Type);
    Py_INCREF(&Batch_Type);
    PyModule_AddObject(m, "FrameBatch", (PyObject *)&Batch_Type);
    Py_INCREF(&Frame_Type);
    PyModule_AddObject(m, "Frame", (PyObject *)&Frame_Type);
    Py_INCREF(&Buffer_Type);
    PyModule_AddObject(m, "Buffer", (PyObject *)&Buffer_Type);
    PyModule_AddObject(m, "LAYOUT", layout_dict());
    PyModule_AddIntConstant(m, "WAIT_POLL", WAIT_POLL);
    PyModule_AddIntConstant(m, "WAIT_BLOCK", WAIT_BLOCK);
    PyModule_AddIntConstant(m, "WAIT_ADAPTIVE", WAIT_ADAPTIVE);
    PyModule_AddIntConstant(m, "NODE_FREE", SF_NODE_FREE);
    PyModule_AddIntConstant(m, "NODE_ATTACHING", SF_NODE_ATTACHING);
    PyModule_AddIntConstant(m, "NODE_UP", SF_NODE_UP);
    PyModule_AddIntConstant(m, "NODE_RECLAIM", SF_NODE_RECLAIM);
    PyModule_AddIntConstant(m, "NODE_DOWN", SF_NODE_DOWN);
    PyModule_AddIntConstant(m, "FLAG_CONTROL", SF_DESC_CONTROL);
    PyModule_AddIntConstant(m, "MEMIF_VIA", MEMIF_VIA);
    pthread_atfork(NULL, NULL, on_fork_child);
    return m;
}
