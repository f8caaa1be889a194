// exp() that gcc vectorises: std::exp is a libm call that blocks -O3 vectorisation unless
// -ffast-math is on, and -ffast-math would also let gcc assume no infinities, which the
// kernels use as masks. Cephes' expf polynomial (about 1 ulp) with Cody-Waite reduction.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace contrastive_kernels::cpu {

inline float fast_exp(float x) {
  // Below -87.3 the result is under float's smallest normal: return exactly 0 (also for -inf).
  const bool underflow = x < -87.3f;
  x = x > 88.3f ? 88.3f : (underflow ? 0.0f : x);
  // Round x / ln2 to the nearest integer k with the 1.5 * 2^23 trick (no libm call).
  const float shifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + shifter;
  const float k = t - shifter;
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof t_bits);
  const int32_t scale_bits = (t_bits - 0x4B400000 + 127) << 23;  // 2^k as float bits
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return underflow ? 0.0f : p * scale;
}

// float64 is the exactness path (gradcheck, 1e-8 tests): use libm.
inline double fast_exp(double x) { return std::exp(x); }

}  // namespace contrastive_kernels::cpu
