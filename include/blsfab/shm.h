/* blsfab node-local transport: rings in POSIX shared memory that same-host
 * senders store into directly, and the memory ordering that makes it safe.
 *
 * Every receiving rank owns one segment. It holds, per node-local sender, a
 * ring of the same slots the fabric path uses (wire.h), plus two kinds of
 * control words:
 *   landed[pos]  written by the sender: seq + 1 of the slot it published at
 *                ring position pos. The payload stores come first, then a
 *                release store of this word; the receiver loads it with
 *                acquire, so a receiver that sees seq + 1 also sees the slot.
 *   consumed     written by the receiver: slots of this ring it has freed
 *                (the credit). Release on the receiver, acquire on the sender,
 *                so the sender never overwrites a slot still being read.
 * No syscall, no handshake and no progress on the target: a landed word
 * replaces the remote CQ entry, a consumed word replaces a credit message.
 */
#ifndef BLSFAB_SHM_H
#define BLSFAB_SHM_H

#include <stdint.h>

#define BLS_SHM_MAGIC 0x426c534dull /* "BlSM" */
#define BLS_SHM_CACHELINE 64u

/* First cache line of a segment: what the owner promises its peers. */
typedef struct {
    uint64_t magic;         /* BLS_SHM_MAGIC */
    uint64_t nbytes;        /* the whole segment */
    uint64_t owner;         /* receiving rank */
    uint64_t ring_slots;
    uint64_t slot_bytes;
    uint64_t nrings;        /* node-local senders */
    uint64_t pad[2];
} bls_shm_segment_header_t;

/* Control block of one ring: the credit on its own cache line, then the
 * landed words, padded to a cache line. The ring's slots follow. */
typedef struct {
    uint64_t consumed;
    uint64_t pad[7];
} bls_shm_ring_control_t;

static inline uint64_t bls_shm_round_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

/* Bytes of one ring's control block (credit line plus landed words). */
static inline uint64_t bls_shm_control_bytes(uint64_t ring_slots)
{
    return sizeof(bls_shm_ring_control_t) + bls_shm_round_up(ring_slots * sizeof(uint64_t), BLS_SHM_CACHELINE);
}

/* Bytes of one ring: control block, then the slots. */
static inline uint64_t bls_shm_ring_bytes(uint64_t ring_slots, uint64_t slot_bytes)
{
    return bls_shm_control_bytes(ring_slots) + ring_slots * slot_bytes;
}

/* Bytes of a segment with nrings rings; 0 when the product overflows. */
static inline uint64_t bls_shm_segment_bytes(uint64_t nrings, uint64_t ring_slots, uint64_t slot_bytes)
{
    uint64_t ring;
    if (ring_slots == 0 || slot_bytes > UINT64_MAX / ring_slots)
        return 0;
    ring = bls_shm_ring_bytes(ring_slots, slot_bytes);
    if (ring < ring_slots * slot_bytes || (nrings && ring > (UINT64_MAX - BLS_SHM_CACHELINE) / nrings))
        return 0;
    return BLS_SHM_CACHELINE + nrings * ring;
}

/* Sender: publish slot seq at pos once its payload is stored. */
static inline void bls_shm_publish(uint64_t *landed, uint64_t seq)
{
    __atomic_store_n(landed, seq + 1, __ATOMIC_RELEASE);
}

/* Receiver: seq + 1 of the slot published at this position (0: none yet). */
static inline uint64_t bls_shm_landed(const uint64_t *landed)
{
    return __atomic_load_n(landed, __ATOMIC_ACQUIRE);
}

/* Receiver: slots freed so far; after this the sender may overwrite them. */
static inline void bls_shm_set_consumed(uint64_t *consumed, uint64_t count)
{
    __atomic_store_n(consumed, count, __ATOMIC_RELEASE);
}

/* Sender: the receiver's credit. */
static inline uint64_t bls_shm_consumed(const uint64_t *consumed)
{
    return __atomic_load_n(consumed, __ATOMIC_ACQUIRE);
}

#endif /* BLSFAB_SHM_H */
