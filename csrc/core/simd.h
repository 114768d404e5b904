// Loops over a row vectorise only when the compiler may reorder their sums (OpenMP simd;
// CMakeLists.txt sets DGSCT_OPENMP). Used by the CPU tile code (csrc/cpu, core/norms.h).
#pragma once

#if DGSCT_OPENMP
#define DGSCT_PRAGMA(text) _Pragma(#text)
#define DGSCT_SIMD_SUM(v) DGSCT_PRAGMA(omp simd reduction(+ : v))
#define DGSCT_SIMD_SUM2(a, b) DGSCT_PRAGMA(omp simd reduction(+ : a, b))
#define DGSCT_SIMD DGSCT_PRAGMA(omp simd)
#else
#define DGSCT_SIMD
#define DGSCT_SIMD_SUM(v)
#define DGSCT_SIMD_SUM2(a, b)
#endif
