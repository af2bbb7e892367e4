// PUSHPULL_CPU_CLONES: the per-plane loops of the CPU backend are compiled three times, for AVX-512, for
// AVX2 and for the build's baseline, and the loader picks one by the CPU (an ifunc); ATen's own kernels
// dispatch on the CPU in the same spirit.
#pragma once

#if defined(__linux__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PUSHPULL_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PUSHPULL_CPU_CLONES
#endif

// A helper of a cloned (or target-specific) function: inlined into each version, so that its loops are
// compiled for that version's instruction set (a call would reach one copy built for the baseline).
#if defined(__GNUC__) || defined(__clang__)
#define PUSHPULL_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define PUSHPULL_ALWAYS_INLINE inline
#endif
