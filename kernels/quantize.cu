// actrain's compression kernels: the CUDA twin of src/compress/{rng,quantize,bitpack}.rs.
//
// Every kernel reproduces the CPU result BIT FOR BIT (tests/cuda.rs checks it on a GPU):
// * the RNG is the counter-based splitmix64 scheme specified in src/compress/rng.rs;
// * float steps use the explicit round-to-nearest intrinsics (__fsub_rn, __fmul_rn, __fdiv_rn,
//   __fadd_rn), which nvcc never contracts into FMAs, and the file must not be built with
//   --use_fast_math / -ftz=true (subnormal ranges must not flush);
// * bf16 metadata is rounded with integer operations on the f32 bits, exactly as
//   `bf16_round_down` / `half::bf16::to_f32` do on the CPU.
//
// Self-contained on purpose (no #include, no math.h constants): it compiles with nvcc --ptx and
// with NVRTC alike. All entry points are extern "C" (unmangled names) and use grid-stride loops,
// so any grid size is correct. Launch with blockDim.x = QBLOCK (256) for `quantize`, and a
// multiple of 32 for `mask_pack`.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define QBLOCK 256
#define NO_ERROR 0xFFFFFFFFFFFFFFFFULL

// ---------------------------------------------------------------------------------------------
// RNG (src/compress/rng.rs)

#define GAMMA 0x9E3779B97F4A7C15ULL
#define SALT 0x6A09E667F3BCC909ULL

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

__device__ __forceinline__ u64 stream_key(u64 seed, u64 stream) {
    return mix64(mix64(seed ^ SALT) ^ stream);
}

// Uniform in [0, 1 - 2^-24] for element `i`: one hash per pair, even element = bits 40..63,
// odd element = bits 8..31. The 24-bit integer converts to float exactly; 2^-24 is exact.
__device__ __forceinline__ float uniform_keyed(u64 key, u64 i) {
    u64 h = mix64(key + (i >> 1) * GAMMA);
    u32 r = (i & 1ULL) == 0 ? (u32)(h >> 40) : (u32)((h >> 8) & 0xFFFFFFULL);
    return __fmul_rn(__uint2float_rn(r), 5.9604644775390625e-8f);
}

// ---------------------------------------------------------------------------------------------
// f32 / bf16 bit helpers (src/compress/quantize.rs)

__device__ __forceinline__ bool is_finite_f(float v) {
    return (__float_as_uint(v) & 0x7F800000u) != 0x7F800000u;
}

// half::bf16::to_f32 is exact: the bf16 bits are the high half of the f32.
__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// Round toward -inf to bf16: truncate positives; negatives with dropped bits grow by one ulp
// (-MAX rolls over to -inf, which the caller rejects). Same as the CPU's `bf16_round_down`.
__device__ __forceinline__ u16 bf16_round_down(float v) {
    u32 b = __float_as_uint(v);
    u16 hi = (u16)(b >> 16);
    if ((b & 0xFFFFu) != 0 && (b >> 31) == 1) {
        hi = (u16)(hi + 1);
    }
    return hi;
}

#define BF16_MAX_BITS 0x7F7F

// The CPU's `group_params`: stored (min, scale) bits for a group with extrema mn <= mx.
// Returns false when bf16/f32 cannot represent them (RangeOverflow).
__device__ bool group_params(float mn, float mx, float levels, u16* mn_out, u16* s_out) {
    u16 mn_b = bf16_round_down(mn);
    float mn_f = bf16_to_f32(mn_b);
    float r = __fsub_rn(mx, mn_f);
    if (!is_finite_f(mn_f) || !is_finite_f(r)) {
        return false;
    }
    if (r == 0.0f) {
        *mn_out = mn_b;
        *s_out = BF16_MAX_BITS;
        return true;
    }
    float ideal = __fdiv_rn(levels, r);  // may be +inf for a subnormal range
    u16 s_bits = bf16_round_down(ideal);
    if (s_bits > BF16_MAX_BITS) {
        s_bits = BF16_MAX_BITS;
    }
    while (s_bits > 0 && __fmul_rn(__fsub_rn(mx, mn_f), bf16_to_f32(s_bits)) > levels) {
        s_bits = (u16)(s_bits - 1);
    }
    float top = __fadd_rn(__fdiv_rn(levels, bf16_to_f32(s_bits)), mn_f);
    if (s_bits == 0 || !is_finite_f(top)) {
        return false;
    }
    *mn_out = mn_b;
    *s_out = s_bits;
    return true;
}

// ---------------------------------------------------------------------------------------------
// Quantize: one block per group (grid-stride over groups), blockDim.x == QBLOCK.
//
// x: n_samples * sample_len contiguous f32. Outputs (layout: src/compress/quantize.rs):
//   data   n_samples * ceil(sample_len * bits / 8) bytes
//   mins, scales   n_samples * ceil(sample_len / group) bf16 bit patterns
//   err    one u64, initialised by the host to NO_ERROR; receives atomicMin of
//          2 * flat_index + kind, kind 0 = NonFinite (index of the first non-finite element of
//          the group), kind 1 = RangeOverflow (index of the group's first element). Groups are
//          disjoint ranges, so the minimum is the CPU's "first error in memory order".
// bits in {1, 2, 4, 8}; group a positive multiple of 8 (both validated by the host).

extern "C" __global__ void quantize(const float* __restrict__ x, u64 n_samples, u64 sample_len,
                                    u64 group, u32 bits, u64 seed, u64 stream,
                                    u8* __restrict__ data, u16* __restrict__ mins,
                                    u16* __restrict__ scales, u64* __restrict__ err) {
    __shared__ float s_mn[QBLOCK];
    __shared__ float s_mx[QBLOCK];
    __shared__ u64 s_bad[QBLOCK];
    __shared__ float g_mn;
    __shared__ float g_s;
    __shared__ int g_ok;

    const u64 gps = (sample_len + group - 1) / group;
    const u64 total = n_samples * gps;
    const u64 sb = (sample_len * bits + 7) / 8;
    const float levels = (float)((1u << bits) - 1u);
    const u32 per_byte = 8u / bits;
    const u64 key = stream_key(seed, stream);
    const float pinf = __uint_as_float(0x7F800000u);
    const u32 tid = threadIdx.x;

    for (u64 g = blockIdx.x; g < total; g += gridDim.x) {
        const u64 n = g / gps;
        const u64 k = g - n * gps;
        const u64 start = k * group;  // inside the sample
        const u64 rest = sample_len - start;
        const u64 glen = rest < group ? rest : group;
        const u64 index0 = n * sample_len + start;  // flat index of the group's first element
        const float* xg = x + index0;

        // 1. min, max and first non-finite position. Ties between +0 and -0 keep the earlier
        //    operand, like the CPU's `if v < mn { v } else { mn }` (either sign dequantizes
        //    identically; only the stored min's sign bit can differ between CPU ISAs).
        float mn = pinf, mx = -pinf;
        u64 bad = NO_ERROR;
        for (u64 j = tid; j < glen; j += blockDim.x) {
            float v = xg[j];
            if (!is_finite_f(v) && bad == NO_ERROR) {
                bad = j;
            }
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
        s_mn[tid] = mn;
        s_mx[tid] = mx;
        s_bad[tid] = bad;
        __syncthreads();
        for (u32 off = QBLOCK / 2; off > 0; off >>= 1) {
            if (tid < off) {
                float a = s_mn[tid + off];
                float b = s_mx[tid + off];
                u64 c = s_bad[tid + off];
                s_mn[tid] = a < s_mn[tid] ? a : s_mn[tid];
                s_mx[tid] = b > s_mx[tid] ? b : s_mx[tid];
                s_bad[tid] = c < s_bad[tid] ? c : s_bad[tid];
            }
            __syncthreads();
        }
        if (tid == 0) {
            g_ok = 0;
            if (s_bad[0] != NO_ERROR) {
                atomicMin(err, 2ULL * (index0 + s_bad[0]));
            } else {
                u16 mb, sbits;
                if (group_params(s_mn[0], s_mx[0], levels, &mb, &sbits)) {
                    mins[g] = mb;
                    scales[g] = sbits;
                    g_mn = bf16_to_f32(mb);
                    g_s = bf16_to_f32(sbits);
                    g_ok = 1;
                } else {
                    atomicMin(err, 2ULL * index0 + 1ULL);
                }
            }
        }
        __syncthreads();

        // 2. Stochastic rounding and packing: one thread per output byte; code e of a byte sits
        //    at bits [e*bits, (e+1)*bits). Elements past the group's end (sample tail) give 0.
        if (g_ok) {
            const float gmn = g_mn;
            const float gs = g_s;
            const u64 gbytes = (glen * bits + 7) / 8;
            u8* dg = data + n * sb + (start * bits) / 8;  // group * bits is a multiple of 8
            for (u64 b = tid; b < gbytes; b += blockDim.x) {
                u32 byte = 0;
                for (u32 e = 0; e < per_byte; ++e) {
                    const u64 j = b * per_byte + e;
                    if (j < glen) {
                        const float t = __fmul_rn(__fsub_rn(xg[j], gmn), gs);
                        const float fl = floorf(t);
                        const float u = uniform_keyed(key, index0 + j);
                        float qf = __fadd_rn(fl, u < __fsub_rn(t, fl) ? 1.0f : 0.0f);
                        qf = qf > levels ? levels : qf;  // safety net, never fires
                        byte |= ((u32)qf) << (e * bits);
                    }
                }
                dg[b] = (u8)byte;
            }
        }
        __syncthreads();  // shared state is rewritten by the next group
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantize: x' = q / s + mn, one thread per element (grid-stride). `data`, `mins`, `scales`
// may point at sample `first` of a larger tensor (the host offsets the pointers).

extern "C" __global__ void dequantize(const u8* __restrict__ data, const u16* __restrict__ mins,
                                      const u16* __restrict__ scales, u64 n_samples,
                                      u64 sample_len, u64 group, u32 bits,
                                      float* __restrict__ out) {
    const u64 len = n_samples * sample_len;
    const u64 gps = (sample_len + group - 1) / group;
    const u64 sb = (sample_len * bits + 7) / 8;
    const u32 mask = (1u << bits) - 1u;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        const u64 n = i / sample_len;
        const u64 j = i - n * sample_len;
        const u64 gi = n * gps + j / group;
        const u64 bit = j * bits;
        const u32 code = ((u32)data[n * sb + (bit >> 3)] >> (u32)(bit & 7)) & mask;
        const float mn = bf16_to_f32(mins[gi]);
        const float s = bf16_to_f32(scales[gi]);
        out[i] = __fadd_rn(__fdiv_rn((float)code, s), mn);
    }
}

// ---------------------------------------------------------------------------------------------
// RNG check: out[j] = uniform(seed, stream, start + j) (exposes the RNG to the parity tests).

extern "C" __global__ void rng_uniform(u64 seed, u64 stream, u64 start, u64 len,
                                       float* __restrict__ out) {
    const u64 key = stream_key(seed, stream);
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < len; j += stride) {
        out[j] = uniform_keyed(key, start + j);
    }
}

// ---------------------------------------------------------------------------------------------
// BitMask (src/compress/bitpack.rs): element i is bit i % 64 of words[i / 64], unused high bits
// of the last word zero. mask_pack sets the bit where x > 0 (NaN gives 0), like
// BitMask::positive. One warp per word (two ballots); blockDim.x must be a multiple of 32.

extern "C" __global__ void mask_pack(const float* __restrict__ x, u64 len,
                                     u64* __restrict__ words) {
    const u64 nw = (len + 63) / 64;
    const u32 lane = threadIdx.x & 31u;
    const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u64 nwarps = ((u64)gridDim.x * blockDim.x) >> 5;
    for (u64 w = warp; w < nw; w += nwarps) {  // w is warp-uniform: ballots are safe
        const u64 i0 = w * 64 + lane;
        const u64 i1 = i0 + 32;
        const bool p0 = i0 < len && x[i0] > 0.0f;
        const bool p1 = i1 < len && x[i1] > 0.0f;
        const u32 b0 = __ballot_sync(0xFFFFFFFFu, p0);
        const u32 b1 = __ballot_sync(0xFFFFFFFFu, p1);
        if (lane == 0) {
            words[w] = (u64)b0 | ((u64)b1 << 32);
        }
    }
}

// out[i] = bit i set ? if_set : if_clear (BitMask::select_into).
extern "C" __global__ void mask_unpack(const u64* __restrict__ words, u64 len, float if_set,
                                       float if_clear, float* __restrict__ out) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        out[i] = ((words[i >> 6] >> (i & 63)) & 1ULL) ? if_set : if_clear;
    }
}

// ---------------------------------------------------------------------------------------------
// PackedUints (src/compress/bitpack.rs): value i occupies stream bits [i*bits, (i+1)*bits),
// stream bit k = bit k % 8 of byte k / 8 (values may straddle two bytes), padding bits zero.
// bits in 1..=8. One thread per output byte. A value >= 2^bits sets
// err = atomicMin(err, index) (host initialises err to NO_ERROR) — the CPU's ValueTooLarge.

extern "C" __global__ void uints_pack(const u8* __restrict__ values, u64 len, u32 bits,
                                      u8* __restrict__ data, u64* __restrict__ err) {
    const u64 nbytes = (len * bits + 7) / 8;
    const u32 mask = (1u << bits) - 1u;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 b = (u64)blockIdx.x * blockDim.x + threadIdx.x; b < nbytes; b += stride) {
        const u64 bit0 = b * 8;
        const u64 i0 = bit0 / bits;
        u64 i1 = (bit0 + 7) / bits;
        if (i1 > len - 1) {
            i1 = len - 1;
        }
        u32 acc = 0;
        for (u64 i = i0; i <= i1; ++i) {
            const u32 v = values[i];
            const u64 first = i * bits;
            if (first >= bit0 && (v >> bits) != 0) {  // checked once, by the value's first byte
                atomicMin(err, i);
            }
            const u32 vm = v & mask;
            acc |= first >= bit0 ? (vm << (u32)(first - bit0)) : (vm >> (u32)(bit0 - first));
        }
        data[b] = (u8)acc;
    }
}

// out[i] = value i (PackedUints::unpack_into).
extern "C" __global__ void uints_unpack(const u8* __restrict__ data, u64 len, u32 bits,
                                        u8* __restrict__ out) {
    const u64 nbytes = (len * bits + 7) / 8;
    const u32 mask = (1u << bits) - 1u;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        const u64 bit = i * bits;
        const u64 at = bit >> 3;
        const u32 lo = data[at];
        const u32 hi = at + 1 < nbytes ? (u32)data[at + 1] : 0u;
        out[i] = (u8)((((hi << 8) | lo) >> (u32)(bit & 7)) & mask);
    }
}
