/* blsfab wire format: what one rank writes into another rank's ring, and the
 * 32-bit remote CQ data that announces it.
 *
 * Every alltoallv iteration sends one message to every peer, even an empty one:
 * its arrival is how the receiver learns that the sender has posted the iteration.
 * Messages travel in fixed-size slots. A slot holds a slot header followed by
 * one or more records (several when iterations are chained), each a record
 * header and a payload padded to BLS_ALIGN bytes. One write carries a slot
 * and its notification (fi_inject_writedata for small slots, fi_writemsg
 * with FI_REMOTE_CQ_DATA otherwise).
 *
 * Peers exchange an address blob at set-up (bls_address_header_t below).
 * Everything here is written by a peer, so the receiver checks every field.
 */
#ifndef BLSFAB_WIRE_H
#define BLSFAB_WIRE_H

#include <stddef.h>
#include <stdint.h>

/* ---- remote CQ data ------------------------------------------------------ *
 * 32 bits, because verbs carries no more (cq_data_size = 4).
 *   bit  31      kind: BLS_KIND_DATA (a slot landed) or BLS_KIND_CREDIT
 *   bit  30      BLS_IMM_WANT, on a credit: the sender is blocked and asks the
 *                receiver to report once it has consumed `count` slots
 *   bits 29..16  sender rank
 *   bits 15..0   low 16 bits of a per-peer counter: the slot sequence number
 *                (data), the count of slots consumed (credit), or the count
 *                wanted (credit with BLS_IMM_WANT)
 * Counters are rebuilt from their low bits against a floor the receiver
 * knows; that is exact while the true value lies within 2^15 of the floor,
 * which BLS_MAX_RING_SLOTS guarantees.
 */
#define BLS_KIND_DATA 0u
#define BLS_KIND_CREDIT 1u
#define BLS_IMM_KIND_SHIFT 31
#define BLS_IMM_WANT (1u << 30)
#define BLS_IMM_RANK_SHIFT 16
#define BLS_IMM_RANK_MASK 0x3fffu
#define BLS_IMM_COUNT_MASK 0xffffu
#define BLS_MAX_RANKS 16384
#define BLS_MAX_RING_SLOTS 16384

static inline uint32_t bls_imm_encode(uint32_t kind, uint32_t rank, uint64_t count)
{
    return (kind << BLS_IMM_KIND_SHIFT) | ((rank & BLS_IMM_RANK_MASK) << BLS_IMM_RANK_SHIFT)
           | (uint32_t)(count & BLS_IMM_COUNT_MASK);
}

static inline uint32_t bls_imm_kind(uint64_t imm) { return (uint32_t)(imm >> BLS_IMM_KIND_SHIFT) & 1u; }
static inline int bls_imm_wants(uint64_t imm) { return (imm & BLS_IMM_WANT) != 0; }
static inline uint32_t bls_imm_rank(uint64_t imm) { return (uint32_t)(imm >> BLS_IMM_RANK_SHIFT) & BLS_IMM_RANK_MASK; }

/* Distance from floor to the counter whose low 16 bits are in imm, as a signed
 * number: negative means the value is older than floor (a stale credit). */
static inline int32_t bls_imm_count_delta(uint64_t imm, uint64_t floor)
{
    return (int32_t)(int16_t)(uint16_t)(((uint32_t)imm - (uint32_t)floor) & BLS_IMM_COUNT_MASK);
}

/* ---- slot layout --------------------------------------------------------- */
#define BLS_SLOT_MAGIC 0x426c5331u /* "BlS1" */
#define BLS_ALIGN 8u

typedef struct {
    uint64_t seq;             /* slot sequence number; must match the notification */
    uint64_t credit;          /* slots of the reverse ring the writer has consumed */
    uint64_t first_iteration; /* iteration of the first record */
    uint32_t nrecords;        /* consecutive iterations packed in this slot */
    uint32_t magic;           /* BLS_SLOT_MAGIC */
} bls_slot_header_t;

typedef struct {
    uint64_t word;            /* payload bytes that follow, before padding (low 48
                                 bits), and the element type (high 16 bits) */
} bls_record_header_t;

#define BLS_RECORD_NBYTES_BITS 48
#define BLS_RECORD_MAX_NBYTES ((UINT64_C(1) << BLS_RECORD_NBYTES_BITS) - 1)

static inline uint64_t bls_record_pack(uint64_t nbytes, uint16_t dtype)
{
    return (nbytes & BLS_RECORD_MAX_NBYTES) | ((uint64_t)dtype << BLS_RECORD_NBYTES_BITS);
}
static inline uint64_t bls_record_nbytes(uint64_t word) { return word & BLS_RECORD_MAX_NBYTES; }
static inline uint16_t bls_record_dtype(uint64_t word) { return (uint16_t)(word >> BLS_RECORD_NBYTES_BITS); }

/* Element type codes: (kind << 8) | itemsize, kind one of 'f' float, 'i' signed,
 * 'u' unsigned, 'c' complex, 'b' bool, 'B' bfloat16, 'V' anything else
 * (itemsize 0 when it exceeds 255). A numpy array and a torch tensor of the
 * same element type have the same code. */

static inline size_t bls_align(size_t n) { return (n + (BLS_ALIGN - 1)) & ~(size_t)(BLS_ALIGN - 1); }

/* Bytes a slot needs for one record of n payload bytes, headers included. */
static inline size_t bls_single_record_bytes(size_t n)
{
    return sizeof(bls_slot_header_t) + sizeof(bls_record_header_t) + bls_align(n);
}

/* ---- address blob ---------------------------------------------------------- *
 * RingEngine.local_address() returns this, in the host's byte order (a peer of
 * another byte order fails the magic check):
 *   bls_address_header_t
 *   name_bytes of endpoint name, zero-padded to a multiple of 8
 *   size entries of bls_ring_address_t: entry s says where rank s writes
 *     (its ring in this rank's memory, with that ring's own key); entry
 *     `rank` is zero.
 * Geometry travels too, so ranks that disagree fail at connect().
 */
#define BLS_ADDRESS_MAGIC 0x41534c42u /* "BLSA" */
#define BLS_ADDRESS_VERSION 1u
#define BLS_MAX_NAME_BYTES 256u

typedef struct {
    uint32_t magic;           /* BLS_ADDRESS_MAGIC */
    uint16_t version;         /* BLS_ADDRESS_VERSION */
    uint16_t header_bytes;    /* sizeof(bls_address_header_t) */
    uint32_t rank;
    uint32_t size;
    uint64_t slot_bytes;
    uint32_t ring_slots;
    uint32_t name_bytes;      /* 1..BLS_MAX_NAME_BYTES */
    uint64_t ring_bytes;      /* bytes each ring region holds: slots, then the
                                 tail word that bare notifications target */
} bls_address_header_t;

typedef struct {
    uint64_t addr;            /* the ring: a virtual address, or 0 (offsets) */
    uint64_t key;
} bls_ring_address_t;

#endif /* BLSFAB_WIRE_H */
