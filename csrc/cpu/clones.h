// PUSHPULL_CPU_CLONES: the per-plane loops of the CPU backend are compiled three times, for AVX-512, for
// AVX2 and for the build's baseline, and the loader picks one by the CPU (an ifunc); ATen's own kernels
// dispatch on the CPU in the same spirit. The AVX-512 version is x86-64-v4 (AVX-512 F, BW, DQ, VL, CD),
// which GCC vectorizes in 64-byte registers (a plain "avx512f" clone kept to 32 bytes and had no byte
// operations for the masks): cifar-stem-2024's forward and forward + backward, two threads, 5 % faster on
// the 2-core AMD EPYC with AVX-512 (7.9-8.0 -> 7.4-7.7 ms, 19.8-20.4 -> 18.8-19.1 ms).
#pragma once

#if defined(__linux__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PUSHPULL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define PUSHPULL_CPU_CLONES
#endif

// A helper of a cloned (or target-specific) function: inlined into each version, so that its loops are
// compiled for that version's instruction set (a call would reach one copy built for the baseline).
// PUSHPULL_INLINE_LAMBDA: the same for a lambda, after its parameters ([&](int i) PUSHPULL_INLINE_LAMBDA {...}).
#if defined(__GNUC__) || defined(__clang__)
#define PUSHPULL_ALWAYS_INLINE __attribute__((always_inline)) inline
#define PUSHPULL_INLINE_LAMBDA __attribute__((always_inline))
#else
#define PUSHPULL_ALWAYS_INLINE inline
#define PUSHPULL_INLINE_LAMBDA
#endif
