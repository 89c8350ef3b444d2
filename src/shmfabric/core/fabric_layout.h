/*
 * fabric_layout.h -- the shared-memory layout of a shmfabric region.
 *
 * Only structs, constants and tiny inline accessors live here (after DPDK rte_ring_core.h and
 * netmap's netmap.h). Everything in the region is found through offsets from the region base;
 * no pointer is ever stored in shared memory, because every process maps the file at its own
 * address.
 *
 * Who writes what is tagged on every field:
 *   (c)  the creator, once, before any node attaches; read-only afterwards
 *   (p)  the producer of a ring alone          (k) the consumer of a ring alone
 *   (o)  the node that owns a node-table entry  (w) whoever holds the writer lock of a tape ring
 *   (a)  any node, with atomic read-modify-write operations
 *
 * Region map (all offsets 64-byte aligned, sizes page-rounded):
 *   superblock | node table [max_nodes] | networks [n_networks] | rings [max_nodes^2]
 *   | tape rings [1 + n_mcast] (broadcast first) | per network: next[], chain[], owner[], slots[]
 */
#ifndef SHMFABRIC_LAYOUT_H
#define SHMFABRIC_LAYOUT_H

#include <stdint.h>
#include <pthread.h>

#define SF_MAGIC 0x3152424146464d53ULL /* "SMFFABR1" little-endian */
#define SF_VERSION 6u /* 3: descriptors carry a stamp in flags (take_unpublished); 4: pool sweep; 5: waiting carries the incarnation tag; 6: given-back entries marked (slot UINT32_MAX, len 0: len 0 alone is never written), rx_bad */
#define SF_CACHELINE 64
#define SF_MAX_NETWORKS 8
#define SF_NAME_LEN 32
#define SF_ETH_HLEN 14
#define SF_MAX_NODES 1024

/* Node states (sf_node.state). FREE -> ATTACHING -> UP -> RECLAIM -> FREE. */
enum { SF_NODE_FREE = 0, SF_NODE_ATTACHING = 1, SF_NODE_UP = 2, SF_NODE_RECLAIM = 3, SF_NODE_DOWN = 4 };

/* Descriptor flags. */
#define SF_DESC_CONTROL 0x0001u /* internal control frame (hello, ...) */
#define SF_DESC_USER 0x0001u    /* the flag bits above; the other 15 are the producer's stamp (desc_stamp) */

/* Region flags. */
#define SF_REGION_EPHEMERAL 0x1u

#define SF_ALIGNED __attribute__((aligned(SF_CACHELINE)))

typedef struct sf_superblock {
    uint64_t magic;          /* (c) SF_MAGIC */
    uint32_t version;        /* (c) SF_VERSION */
    uint32_t superblock_size;/* (c) sizeof(sf_superblock) */
    uint64_t total_size;     /* (c) file size in bytes */
    uint32_t max_nodes;      /* (c) node table entries; rings are max_nodes^2 */
    uint32_t ring_size;      /* (c) descriptors per ring, a power of two */
    uint32_t n_networks;     /* (c) */
    uint32_t n_mcast;        /* (c) multicast tape rings (after the broadcast one) */
    uint32_t tape_entries;   /* (c) entries per tape ring, a power of two */
    uint32_t tape_entry_size;/* (c) bytes of frame per tape entry */
    uint32_t flags;          /* (c) SF_REGION_* */
    uint32_t node_size;      /* (c) sizeof(sf_node) */
    uint64_t off_nodes;      /* (c) */
    uint64_t off_networks;   /* (c) */
    uint64_t off_rings;      /* (c) */
    uint64_t ring_stride;    /* (c) bytes per ring incl. descriptors */
    uint64_t off_tapes;      /* (c) */
    uint64_t tape_stride;    /* (c) bytes per tape ring incl. entries */
    uint64_t created_ns;     /* (c) CLOCK_REALTIME at creation */
    uint32_t creator_pid;    /* (c) */
    uint32_t uid_gid_mode[3];/* (c) informational */
    char name[SF_NAME_LEN];  /* (c) fabric name */
    SF_ALIGNED uint32_t node_hwm; /* (a) 1 + highest node index ever attached (scan bound) */
    /* The pool sweep (see sweep_locked in _fabric.c). A node killed inside a free-stack
     * operation (between taking slots off the stack and tagging them, or between untagging and
     * pushing them) leaves slots that no owner holds and no stack reaches; the sweep finds them
     * while every pool operation is held off. */
    SF_ALIGNED pthread_mutex_t pool_lock; /* (a) robust: held by reclaims, attaches and sweeps;
                              * never waited on by a node's pool operation */
    uint32_t sweeping;       /* (a) the id of a sweep holding pool operations off while it looks
                              * for lost slots, or 0; a node that waited too long cancels it (0) */
    uint32_t sweep_gen;      /* (a) the last sweep id handed out (under pool_lock) */
    uint32_t sweep_pending;  /* (a) slots may be lost: a node died inside a pool operation */
    uint64_t swept_slots;    /* (a) slots the sweeps gave back, in total (informational) */
    uint64_t sweeps;         /* (a) sweeps completed (informational) */
} sf_superblock;

/* Per-node entry. One cache line for the identity, one for the wake-up words (written by other
 * nodes), and one each for the counters the owner alone writes. */
#define SF_WAITING_COUNT 0xFFFFu /* sf_node.waiting: the count; the rest is the incarnation's tag */

typedef struct sf_node {
    /* identity. state and gen share one 8-byte word: a reclaim CASes both, so a sweeper that
     * judged an incarnation dead can never reclaim the next one that took the slot meanwhile. */
    union {
        struct {
            uint32_t state;  /* (a) SF_NODE_*, changed by CAS only */
            uint32_t gen;    /* (o) incremented at each attach; owner tag = gen<<16 | (index+1) */
        };
        uint64_t state_gen;
    };
    uint32_t pid;            /* (o) */
    uint32_t network;        /* (o) network index the node allocates from */
    uint64_t start_time;     /* (o) /proc/<pid>/stat field 22, to tell a reused pid apart */
    uint64_t pidns;          /* (o) inode of /proc/self/ns/pid: pid checks only work in the same one */
    uint64_t heartbeat_ns;   /* (o) CLOCK_MONOTONIC of the last liveness beat */
    char name[SF_NAME_LEN];  /* (o) */
    /* wake-up: the node sleeps on `doorbell` (futex) after setting `waiting`. */
    SF_ALIGNED uint32_t doorbell; /* (a) bumped by a sender that saw `waiting` */
    /* (o) low 16 bits (SF_WAITING_COUNT): how many of the owner's threads may be asleep on
     * `doorbell`; high 16 bits: the low 16 bits of `gen`, written by the claim. A thread changes
     * the count only by a CAS that requires its own incarnation's tag, so one that resumes after
     * its node was reclaimed and its id claimed again never moves the new node's count. */
    uint32_t waiting;
    /* counters, owner-written, read by anyone (relaxed) */
    SF_ALIGNED uint64_t tx_frames, tx_bytes, rx_frames, rx_bytes; /* bytes: payload after the 14-byte header */
    uint64_t tx_ring_full;   /* frames not sent because a ring was full */
    uint64_t tx_drops;       /* frames refused: destination down or unknown */
    uint64_t rx_lapped;      /* tape entries missed because the writer lapped this reader */
    uint64_t tape_rx;        /* broadcast/multicast frames received */
    uint64_t tape_tx;
    uint64_t wakeups;        /* times the owner slept and was woken */
    uint64_t tx_nobuf;       /* frames not sent because the pool had no free slot */
    uint64_t rx_bad;         /* ring entries skipped: they named no slot (given back, or corrupt) */
    uint32_t cached[SF_MAX_NETWORKS]; /* slots held in the owner's private free cache */
    uint32_t pool_ops;       /* (o) odd while the owner moves slots between the free stack and
                              * itself (pool_enter/pool_exit); the sweep waits for even */
    uint64_t mcast_mask;     /* (o) multicast groups joined (bit i = tape ring 1+i) */
} sf_node;

/* A network: one MTU and one packet pool of fixed-size slots. */
typedef struct sf_network {
    uint32_t mtu;            /* (c) max payload after the 14-byte header */
    uint32_t slot_size;      /* (c) headroom + 14 + mtu, rounded to 64 */
    uint32_t headroom;       /* (c) bytes before the frame in each slot */
    uint32_t n_slots;        /* (c) */
    uint64_t off_next;       /* (c) uint32_t[n_slots]: next slot+1 inside a free chain, 0 = end */
    uint64_t off_chain;      /* (c) uint32_t[n_slots]: for a chain's top, the next chain's top+1 */
    uint64_t off_owner;      /* (c) uint32_t[n_slots]: owner tag, 0 = in the shared free stack */
    uint64_t off_slots;      /* (c) */
    /* The free stack: a Treiber stack of chains ("magazines") of slots, so a node moves up to
     * a chain's worth of slots with one CAS. head = tag<<32 | (top slot + 1); the tag grows on
     * every change so a stale head never wins a CAS (ABA). */
    SF_ALIGNED uint64_t free_head; /* (a) */
    SF_ALIGNED int64_t free_count; /* (a) slots in the shared stack */
} sf_network;

/* SPSC descriptor ring between one ordered pair of nodes.
 *
 * Indices run free as uint32_t and are masked on access. head - tail, computed modulo 2^32, is
 * the number of filled entries as long as it never exceeds ring_size, which the producer
 * guarantees by checking space first; so a wrap of the counters past 2^32 is harmless.
 * Slots [tail, head) belong to the consumer; [head, tail + size) to the producer. */
typedef struct sf_desc {
    union {
        struct {
            uint32_t slot;   /* slot index in the pool; UINT32_MAX with len 0: given back */
            uint32_t len;    /* frame length, header included; 0: never written (or given back) */
        };
        uint64_t slot_len;   /* both in one store (desc_give_back) */
    };
    uint16_t pool;           /* network index */
    uint16_t flags;          /* SF_DESC_* */
    uint32_t meta;           /* free for the user (e.g. a chain position) */
} sf_desc;

typedef struct sf_ring {
    /* head and down share one 8-byte word so a producer publishes with one CAS that also checks
     * the consumer's incarnation (see finish_send). */
    SF_ALIGNED union {
        struct {
            uint32_t head;      /* (p) next entry to fill */
            uint32_t down;      /* (a) consumer epoch: odd once it died (senders stop), even again
                                 * when a new node takes the slot; so a sender stalled across a
                                 * reclaim and re-attach sees the change and never publishes */
        };
        uint64_t head_down;
    };
    uint64_t enq_frames;        /* (p) */
    uint64_t full_events;       /* (p) */
    SF_ALIGNED uint32_t tail;   /* (k) next entry to read */
    uint64_t deq_frames;        /* (k) */
    SF_ALIGNED sf_desc desc[];  /* ring_size entries */
} sf_ring;

/* "Ticker tape" ring for broadcast and multicast: many writers serialised by a robust mutex,
 * readers never take the lock and never hold writers back. Each entry carries its sequence
 * number, written twice (odd while being written, even when complete), so a reader detects
 * both an entry overwritten before it got there and one overwritten while it copied. */
typedef struct sf_tape_entry {
    uint64_t seq;            /* (w) 2*n+1 while writing entry n, 2*n+2 when complete */
    uint32_t len;            /* (w) */
    uint16_t src;            /* (w) writer's node index */
    uint16_t flags;          /* (w) SF_DESC_* */
    /* frame bytes follow (tape_entry_size) */
} sf_tape_entry;

typedef struct sf_tape {
    pthread_mutex_t lock;    /* (a) writer lock, PTHREAD_PROCESS_SHARED + ROBUST */
    uint8_t group[6];        /* (c) destination address of this tape (ff:.. for broadcast) */
    uint16_t pad0;
    SF_ALIGNED uint64_t head;/* (w) next sequence to write */
    uint64_t lapped_total;   /* (w) informational */
    SF_ALIGNED uint8_t entries[];
} sf_tape;

static inline uint32_t sf_ring_count(uint32_t head, uint32_t tail) { return head - tail; }
static inline uint32_t sf_ring_space(uint32_t head, uint32_t tail, uint32_t size)
{
    return size - (head - tail);
}
static inline uint32_t sf_owner_tag(uint32_t index, uint32_t gen)
{
    return ((gen & 0xffffu) << 16) | ((index + 1) & 0xffffu);
}

#endif
