/*
 * The lab's data pattern: word i of a region seeded with s is splitmix64(s + i). Shared by `vmwork gen` (run on
 * the host to write the data disk's files) and every check in the guest, so content can be verified anywhere
 * without a reference copy. splitmix64 is a bijection, so at most one word in 2^64 is zero: no 4 KiB page of
 * pattern data is ever all zero (which would hide it behind QEMU's zero-page detection).
 */
#ifndef VMPRUNE_PATTERN_H
#define VMPRUNE_PATTERN_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Steele, Lea, Flood: "Fast splittable pseudorandom number generators" (2014), the splitmix64 finalizer. */
static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* FNV-1a, 64-bit: the seed of a file's pattern is the hash of its basename. */
static inline uint64_t fnv1a64(const char *s) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return h;
}

static inline const char *base_name(const char *path) {
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* Fills `words` 64-bit words starting at word index `first` of the region seeded with `seed`. */
static inline void pattern_fill(uint64_t *dst, size_t words, uint64_t seed, uint64_t first) {
    for (size_t i = 0; i < words; i++) dst[i] = splitmix64(seed + first + i);
}

/* Index (from dst) of the first word that differs from the pattern, or `words` if all match. */
static inline size_t pattern_check(const uint64_t *src, size_t words, uint64_t seed, uint64_t first) {
    for (size_t i = 0; i < words; i++)
        if (src[i] != splitmix64(seed + first + i)) return i;
    return words;
}

#endif
