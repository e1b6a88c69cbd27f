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
// with NVRTC alike. All entry points are extern "C" (unmangled names) and loop grid-stride, so
// any grid size is correct (src/compress/cuda.rs launches at most about one wave of blocks).
// Launch `quantize_*` and `mask_pack` with blockDim.x a multiple of 32 (they work per warp).
// Needs sm_80 or newer (min.NaN / max.NaN).
//
// The kernels are memory-bound by design (H100: ~3 TB/s): consecutive lanes touch consecutive
// 16-byte pieces (float4 loads and stores where aligned), the per-element integer work is the
// RNG itself, and no kernel divides by a runtime value per element.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define NO_ERROR 0xFFFFFFFFFFFFFFFFULL
#define FULL_MASK 0xFFFFFFFFu
#define MAGIC23 8388608.0f  // 2^23: in [2^23, 2^24) an f32's low mantissa bits are an integer

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
    while (s_bits > 0 && __fmul_rn(r, bf16_to_f32(s_bits)) > levels) {
        s_bits = (u16)(s_bits - 1);
    }
    // top = levels / s + mn_f is finite whenever s >= 2^-118 (bf16 exponent field >= 9: levels
    // < 2^8, so the quotient is < 2^126) and |mn_f| < 2^126 (exponent field <= 252), so the
    // division (a long dependent chain on the group's critical path) runs only outside that.
    if (s_bits == 0) {
        return false;
    }
    if (((s_bits >> 7) & 0xFFu) < 9u || ((mn_b >> 7) & 0xFFu) > 252u) {
        const float top = __fadd_rn(__fdiv_rn(levels, bf16_to_f32(s_bits)), mn_f);
        if (!is_finite_f(top)) {
            return false;
        }
    }
    *mn_out = mn_b;
    *s_out = s_bits;
    return true;
}

// ---------------------------------------------------------------------------------------------
// Shared helpers of the quantizer kernels

// NaN-propagating min / max (PTX ISA 7.0, sm_80): a group holding a NaN or an infinity ends
// with a non-finite min or max, so non-finite inputs cost no extra work per element. Which
// zero a (+0, -0) tie returns is unspecified; it only changes the sign of a stored zero min,
// which dequantizes identically (and differs between the CPU's own SIMD variants too).
__device__ __forceinline__ float min_nan(float a, float b) {
    float r;
    asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float max_nan(float a, float b) {
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// n / d for n < 2^32 by a multiply (Granlund & Montgomery 1994, fig. 4.1): the host passes
// m = floor(2^32 * (2^l - d) / d) + 1 with l = ceil(log2 d) (src/compress/cuda.rs, `FastDiv`).
__device__ __forceinline__ u32 fast_div(u32 n, u32 m, u32 l) {
    const u32 t = __umulhi(n, m);
    const u32 s1 = l > 0 ? 1u : 0u;
    const u32 s2 = l > 0 ? l - 1u : 0u;
    return (t + ((n - t) >> s1)) >> s2;
}

// A pair hash's two 24-bit uniform fields (src/compress/rng.rs: even element h >> 40, odd
// element (h >> 8) & 0xFFFFFF), each shifted left by 8, straight from mix64's last product z2
// (h = z2 ^ (z2 >> 31)): the xor changes bits 8..31 of h's high word not at all and those of its
// low word by z2_hi << 1, so the final shift, the xor and the field extraction fold into one
// masked xor. r << 8 has at most 24 significant bits: as a float it is exact, and times 2^-32
// it is exactly the CPU's r * 2^-24.
struct Fields8 {
    u32 even, odd;
};
__device__ __forceinline__ Fields8 mix64_fields8(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    const u32 lo = (u32)z;
    const u32 hi = (u32)(z >> 32);
    Fields8 f;
    f.even = hi & 0xFFFFFF00u;
    f.odd = (lo ^ (hi << 1)) & 0xFFFFFF00u;
    return f;
}

// Four consecutive f32 at p, `avail` (>= 1) of them inside the group. The others are padded
// with v[0] (PAD_FIRST: neutral for min / max) or with `pad` (the group's min: t = 0, code 0,
// as the CPU pads its tail block). `vec` = 4 / 2 / 1: p's alignment in floats, uniform across
// a group (16-byte aligned float4 loads when possible).
template <bool PAD_FIRST>
__device__ __forceinline__ void load_quad(const float* __restrict__ p, u32 avail, u32 vec,
                                          float pad, float v[4]) {
    if (avail >= 4 && vec == 4) {
        const float4 a = __ldg(reinterpret_cast<const float4*>(p));
        v[0] = a.x;
        v[1] = a.y;
        v[2] = a.z;
        v[3] = a.w;
    } else if (avail >= 4 && vec == 2) {
        const float2 a = __ldg(reinterpret_cast<const float2*>(p));
        const float2 b = __ldg(reinterpret_cast<const float2*>(p) + 1);
        v[0] = a.x;
        v[1] = a.y;
        v[2] = b.x;
        v[3] = b.y;
    } else {
        v[0] = __ldg(p);
        const float f = PAD_FIRST ? v[0] : pad;
        v[1] = avail > 1 ? __ldg(p + 1) : f;
        v[2] = avail > 2 ? __ldg(p + 2) : f;
        v[3] = avail > 3 ? __ldg(p + 3) : f;
    }
}

__device__ __forceinline__ float min4(float4 a) {
    return min_nan(min_nan(a.x, a.y), min_nan(a.z, a.w));
}
__device__ __forceinline__ float max4(float4 a) {
    return max_nan(max_nan(a.x, a.y), max_nan(a.z, a.w));
}

// Stochastic rounding of one element with 24-bit noise r, given as r8 = r << 8
// (u = r8 * 2^-32 = r * 2^-24), the CPU's
// `floor(t) + (u < t - floor(t))`. t is in [0, levels] (group_params guarantees it; the CPU's
// clamp never fires, so none here). floor: t + 2^23 rounded toward zero is 2^23 + floor(t)
// exactly (0 <= t <= 255), whose low mantissa bits are the integer; fl and t - fl are exact,
// so the comparison is the CPU's bit for bit (t = -0 gives code 0 on both).
__device__ __forceinline__ u32 sr_code(float v, u32 r8, float mn, float s) {
    const float t = __fmul_rn(__fsub_rn(v, mn), s);
    const float big = __fadd_rz(t, MAGIC23);
    const float fl = __fsub_rn(big, MAGIC23);
    const float u = __fmul_rn(__uint2float_rn(r8), 2.3283064365386962890625e-10f);
    return (__float_as_uint(big) - 0x4B000000u) + (u < __fsub_rn(t, fl) ? 1u : 0u);
}

// Codes of the quad whose first element has flat index i0 (z = key + (i0 >> 1) * GAMMA), code e
// at bits [e*BITS, (e+1)*BITS). One hash per element pair: 2 hashes for an even i0, 3 for an
// odd one.
template <int BITS>
__device__ __forceinline__ u32 encode_quad(float4 v, u64 z, bool odd, float mn, float s) {
    const Fields8 h0 = mix64_fields8(z);
    const Fields8 h1 = mix64_fields8(z + GAMMA);
    u32 r0, r1, r2, r3;
    if (!odd) {
        r0 = h0.even;
        r1 = h0.odd;
        r2 = h1.even;
        r3 = h1.odd;
    } else {
        const Fields8 h2 = mix64_fields8(z + 2ULL * GAMMA);
        r0 = h0.odd;
        r1 = h1.even;
        r2 = h1.odd;
        r3 = h2.even;
    }
    return sr_code(v.x, r0, mn, s) | (sr_code(v.y, r1, mn, s) << BITS) |
           (sr_code(v.z, r2, mn, s) << (2 * BITS)) | (sr_code(v.w, r3, mn, s) << (3 * BITS));
}

// Stores the 4*BITS code bits of quad q of a group at dg (da = its address): one store when
// aligned, else the group's bytes one by one; `avail` = elements of the quad in the group (0:
// nothing to store). bits 1: lanes 2i, 2i+1 hold quads q, q+1 (T is even) and make one byte
// together, so both lanes of a pair must call this.
template <int BITS>
__device__ __forceinline__ void store_quad(u8* __restrict__ dg, size_t da, u32 q, u32 avail,
                                           u32 codes, u32 lane) {
    if (BITS == 1) {
        const u32 other = __shfl_xor_sync(3u << (lane & 30u), codes, 1);
        if ((lane & 1u) == 0 && avail > 0) {
            dg[q >> 1] = (u8)(codes | (other << 4));
        }
    } else if (BITS == 2) {
        if (avail > 0) {
            dg[q] = (u8)codes;
        }
    } else if (BITS == 4) {
        u8* p = dg + 2 * q;
        if (avail >= 3 && (da & 1) == 0) {
            *reinterpret_cast<u16*>(p) = (u16)codes;
        } else if (avail > 0) {
            p[0] = (u8)codes;
            if (avail >= 3) {
                p[1] = (u8)(codes >> 8);
            }
        }
    } else {
        u8* p = dg + 4 * q;
        if (avail == 4 && (da & 3) == 0) {
            *reinterpret_cast<u32*>(p) = codes;
        } else {
            for (u32 e = 0; e < avail; ++e) {
                p[e] = (u8)(codes >> (8 * e));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quantize (grid-stride over groups; blockDim.x a multiple of 32).
//
// key: stream_key(seed, stream), derived by the host (src/compress/cuda.rs): derived here,
// nvcc rematerialised its two mix64 inside the loop, ~70 instructions per group.
//
// x: n_samples * sample_len contiguous f32. Outputs (layout: src/compress/quantize.rs):
//   data   n_samples * ceil(sample_len * bits / 8) bytes
//   mins, scales   n_samples * ceil(sample_len / group) bf16 bit patterns
//   err    one u64, initialised by the host to NO_ERROR; receives atomicMin of
//          2 * flat_index + kind, kind 0 = NonFinite (index of the first non-finite element of
//          the group), kind 1 = RangeOverflow (index of the group's first element). Groups are
//          disjoint ranges, so the minimum is the CPU's "first error in memory order".
// bits in {1, 2, 4, 8}; group a positive multiple of 8, at most 2^30 (validated by the host).
//
// Work split: a "team" of T lanes per group, T = the power of two >= group / (4 QPL) (the
// group's quads / QPL), at least 2, at most 32, so a warp runs 32 / T groups side by side
// (QPL 8: group 256 -> T = 8, four groups per warp; T = 32 from group 1024 up; groups 8..64 ->
// T = 2. QPL 4: group 256 -> T = 16).
// The per-group work (index math, butterfly, group_params: a few hundred warp instructions, a
// long dependent chain) is SIMT across the warp's groups, so it costs per element in inverse
// proportion to QPL: on an H100 it weighed about one quad's coding per round, and 8 quads per
// lane instead of 4 made the kernel 10-18% faster.
// Lane tl of a team handles the quads (4 consecutive elements) tl, tl + T, ... of its group:
// each round of a team is one contiguous 16*T-byte span (float4 loads when the group starts
// 16-byte aligned; sample_len may be odd, so groups can start anywhere).
//   1. min / max (NaN-propagating) over the lane's quads, butterfly over the team.
//   2. Every lane of the team runs group_params on the same inputs (no broadcast needed); lane
//      0 stores the metadata or reports the error.
//   3. The lane codes its quads and stores 4*bits bits per quad with one store (a byte for
//      bits 2, u16 for 4, u32 for 8; bits 1: two lanes' nibbles make a byte) when aligned, else
//      byte by byte.
// Fast path (team-uniform): group start 16-byte aligned, whole quads, at most QPL (8 or 4: the
// variant) quads per lane (every group <= 128 * QPL): the quads stay in registers between
// steps 1 and 3, all loads issued before any math (QPL * 512 bytes in flight per warp).
// Otherwise (larger groups, unaligned starts, sample tails) step 3 re-reads the quads (L1/L2
// hits).
// A lane's RNG counter advances by 2T pairs per round, so the only 64-bit multiplies per
// element pair are inside mix64.

// Variants (one templated body, extern "C" entries per variant and width; src/compress/cuda.rs
// picks one by name, `QUANTIZE_VARIANT`, and times any with `quantize_variant_kernel_ms`):
//   QPL  quads per lane of the register fast path (and the team size: T >= quads / QPL);
//   OCT  bits 1 only (`qslot`): a lane holds whole octets, one byte store, no pair shuffle.
// Register / occupancy trade-offs are set per entry by __launch_bounds__.

// Geometry of the team's group (n, k) (sample n, group k of it).
struct QGeo {
    u64 start;   // first element inside the sample
    u64 index0;  // flat index of the group's first element
    const float* xg;
    u32 glen;  // elements (0: dead team)
    u32 nq;    // quads
    u32 vec;   // alignment of xg in floats: 4 / 2 / 1
    bool fast;
};

__device__ __forceinline__ QGeo qgeo(const float* __restrict__ x, bool live, u64 n, u64 k,
                                     u64 sample_len, u64 group, u32 cap) {
    QGeo r;
    r.start = k * group;
    const u64 rest = sample_len - r.start;
    r.glen = live ? (u32)(rest < group ? rest : group) : 0u;
    r.nq = (r.glen + 3u) >> 2;
    r.index0 = n * sample_len + r.start;
    r.xg = x + r.index0;
    const size_t xa = (size_t)r.xg;
    r.vec = (xa & 15) == 0 ? 4u : ((xa & 7) == 0 ? 2u : 1u);
    r.fast = r.vec == 4u && (r.glen & 3u) == 0 && r.nq <= cap;
    return r;
}

// The quad of a group held in slot j of team lane tl on the fast path. Default: quads tl,
// tl + T, ... (each slot of the team one contiguous span). OCT (bits 1 only): slots 2m, 2m + 1
// hold the two quads of octet tl + m*T (8 elements = one code byte), so a lane makes whole
// bytes alone (no pair shuffle) and a team's byte stores are contiguous.
template <bool OCT>
__device__ __forceinline__ u32 qslot(u32 tl, u32 j, u32 T) {
    return OCT ? 2u * (tl + (j >> 1) * T) + (j & 1u) : tl + j * T;
}

template <u32 QPL, bool OCT>
__device__ __forceinline__ void qload(const QGeo& ge, u32 tl, u32 T, float4 a[QPL]) {
#pragma unroll
    for (u32 j = 0; j < QPL; ++j) {
        a[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        const u32 q = qslot<OCT>(tl, j, T);
        if (ge.fast && q < ge.nq) {
            a[j] = __ldg(reinterpret_cast<const float4*>(ge.xg + 4 * q));
        }
    }
}

template <int BITS, u32 QPL, bool OCT_ANY>
__device__ __forceinline__ void quantize_impl(const float* __restrict__ x, u64 n_samples,
                                              u64 sample_len, u64 group, u64 key,
                                              u8* __restrict__ data, u16* __restrict__ mins,
                                              u16* __restrict__ scales, u64* __restrict__ err) {
    constexpr bool OCT = OCT_ANY && BITS == 1;
    const float levels = (float)((1u << BITS) - 1u);
    const float pinf = __uint_as_float(0x7F800000u);
    const u64 gps = (sample_len + group - 1) / group;
    const u64 total = n_samples * gps;
    const u64 sb = (sample_len * BITS + 7) / 8;
    // T = the power of two >= ceil(quads / QPL), at least 2, at most 32.
    const u32 gq = group >= 128 * QPL ? 32u * QPL : (u32)(group >> 2);  // quads, capped
    const u32 tq = (gq + QPL - 1u) / QPL;
    const u32 tlog = tq <= 2u ? 1u : 32u - (u32)__clz((int)(tq - 1u));
    const u32 T = 1u << tlog;
    const u32 lane = threadIdx.x & 31u;
    const u32 team = lane >> tlog;
    const u32 tl = lane & (T - 1u);
    const u32 tmask = T == 32u ? FULL_MASK : ((1u << T) - 1u) << (team * T);
    const u32 tpw = 32u >> tlog;  // teams (groups) per warp
    const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u64 nwarps = ((u64)gridDim.x * blockDim.x) >> 5;
    const u64 zstep = (u64)(2u * T) * GAMMA;  // RNG counter step between a lane's rounds

    // The team's group g = n * gps + k, walked without a division per group.
    const u64 stride = nwarps * tpw;
    u64 g = warp * tpw + team;
    u64 n = g / gps;
    u64 k = g - n * gps;
    const u64 sn = stride / gps;
    const u64 sk = stride - sn * gps;

    float4 a[QPL];
    for (u64 g0 = warp * tpw; g0 < total; g0 += stride) {  // warp-uniform trip count
        const bool live = g < total;                        // team-uniform
        const QGeo ge = qgeo(x, live, n, k, sample_len, group, QPL * T);
        const u64 start = ge.start;
        const u32 glen = ge.glen;
        const u32 nq = ge.nq;
        const u64 index0 = ge.index0;
        const float* xg = ge.xg;
        const u32 vec = ge.vec;
        const bool fast = ge.fast;  // team-uniform
        qload<QPL, OCT>(ge, tl, T, a);  // all loads first

        // 1. min, max (non-finite values propagate). Fast path (groups <= 128 * QPL, 16-byte
        //    aligned, whole quads): a lane holds at most QPL quads, kept in registers for step
        //    3. Otherwise any number of quads, re-read in step 3.
        float mn = pinf, mx = -pinf;
        if (fast) {
#pragma unroll
            for (u32 j = 0; j < QPL; ++j) {
                if (qslot<OCT>(tl, j, T) < nq) {
                    mn = min_nan(mn, min4(a[j]));
                    mx = max_nan(mx, max4(a[j]));
                }
            }
        } else {
            for (u32 q = tl; q < nq; q += T) {
                float v[4];
                load_quad<true>(xg + 4 * q, glen - 4 * q, vec, 0.0f, v);
                mn = min_nan(mn, min_nan(min_nan(v[0], v[1]), min_nan(v[2], v[3])));
                mx = max_nan(mx, max_nan(max_nan(v[0], v[1]), max_nan(v[2], v[3])));
            }
        }
#pragma unroll
        for (u32 off = 1; off < 32u; off <<= 1) {  // dead teams' lanes hold (+inf, -inf)
            // log2(T) rounds: T is the same in every lane of the warp, so the branch is uniform
            // (no rounds past the team: each is two shuffles on the group's critical path).
            if (off < T) {
                mn = min_nan(mn, __shfl_xor_sync(FULL_MASK, mn, off));
                mx = max_nan(mx, __shfl_xor_sync(FULL_MASK, mx, off));
            }
        }

        // 2. Metadata or error.
        bool ok = false;
        float gmn = 0.0f, gs = 0.0f;
        if (live) {
            if (!is_finite_f(mn) || !is_finite_f(mx)) {
                // Rare: the group's first non-finite element. A lane's quads are in memory
                // order, so its first hit is its minimum; then the team's minimum.
                u32 first = 0xFFFFFFFFu;
                for (u32 q = tl; q < nq && first == 0xFFFFFFFFu; q += T) {
                    const u32 m = min(4u, glen - 4 * q);
                    for (u32 e = 0; e < m; ++e) {
                        if (!is_finite_f(xg[4 * q + e])) {
                            first = 4 * q + e;
                            break;
                        }
                    }
                }
                for (u32 off = 1; off < T; off <<= 1) {
                    first = min(first, __shfl_xor_sync(tmask, first, off));
                }
                if (tl == 0) {
                    atomicMin(err, 2ULL * (index0 + first));
                }
            } else {
                u16 mb = 0, sbits = 0;
                ok = group_params(mn, mx, levels, &mb, &sbits);
                if (tl == 0) {
                    if (ok) {
                        mins[g] = mb;
                        scales[g] = sbits;
                    } else {
                        atomicMin(err, 2ULL * index0 + 1ULL);
                    }
                }
                gmn = bf16_to_f32(mb);
                gs = bf16_to_f32(sbits);
            }
        }

        // 3. Codes. Elements past the group's end (sample tail) give code 0.
        if (ok) {
            u8* dg = data + n * sb + ((start * BITS) >> 3);  // group * bits is a multiple of 8
            const size_t da = (size_t)dg;
            const bool odd = (index0 & 1) != 0;
            u64 z = key + ((index0 + 4 * tl) >> 1) * GAMMA;
            if (fast && OCT) {
                // Quad q's counter is key + ((index0 + 4q) >> 1) * GAMMA = z0 + 2q * GAMMA
                // (z0: the group's first pair), and z = z0 + 2 tl * GAMMA: slot pair j / 2
                // holds quad q0 = 2 (tl + (j / 2) T), so its counter starts at z + 2 tl * GAMMA
                // and steps by 4T * GAMMA = 2 zstep (no multiply per octet).
                u64 zq = z + (u64)(2u * tl) * GAMMA;
#pragma unroll
                for (u32 j = 0; j < QPL; j += 2, zq += 2u * zstep) {
                    const u32 q0 = qslot<OCT>(tl, j, T);
                    if (q0 < nq) {  // the octet's second quad may be past a tail group's end
                        const u32 c0 = encode_quad<BITS>(a[j], zq, odd, gmn, gs);
                        const u32 c1 = q0 + 1u < nq
                                           ? encode_quad<BITS>(a[j + 1], zq + 2ULL * GAMMA, odd,
                                                               gmn, gs)
                                           : 0u;
                        dg[q0 >> 1] = (u8)(c0 | (c1 << 4));
                    }
                }
            } else if (fast) {
#pragma unroll
                for (u32 j = 0; j < QPL; ++j, z += zstep) {
                    const bool has = tl + j * T < nq;
                    const u32 c = has ? encode_quad<BITS>(a[j], z, odd, gmn, gs) : 0u;
                    store_quad<BITS>(dg, da, tl + j * T, has ? 4u : 0u, c, lane);
                }
            } else {
                const u32 qend = BITS == 1 ? (nq + 1u) & ~1u : nq;  // bits 1: whole lane pairs
                for (u32 q = tl; q < qend; q += T, z += zstep) {
                    u32 codes = 0;
                    const u32 avail = q < nq ? min(4u, glen - 4 * q) : 0u;
                    if (avail > 0) {
                        float v[4];
                        load_quad<false>(xg + 4 * q, avail, vec, gmn, v);
                        codes = encode_quad<BITS>(make_float4(v[0], v[1], v[2], v[3]), z, odd,
                                                  gmn, gs);
                    }
                    store_quad<BITS>(dg, da, q, avail, codes, lane);
                }
            }
        }

        // The team's next group, g + stride.
        g += stride;
        n += sn;
        k += sk;
        if (k >= gps) {
            k -= gps;
            ++n;
        }
    }
}

// The entries: one per variant and width (`quantize_<variant>_b<bits>`, same arguments), so
// each width is allocated its own registers (one kernel switching over the widths gets the
// worst width's: 123 registers at QPL 8, two resident blocks per SM, against 77-80 and three).
// The host's team size follows the variant's QPL (src/compress/cuda.rs, QUANTIZE_VARIANTS).
//   q8x  QPL 8, OCT slots at bits 1 (production since 2026-11-23);
//   q4x  QPL 4, OCT slots at bits 1 (production before; kept as the benchmark's reference).
// H100, 2026-11-23, 64M elements, group 256, % of a device-to-device copy at 1/2/4/8 bits:
// q8x 82/85/86/92, q4x 69/74/73/81. Dropped after measuring: q4 (q4x without OCT, 62% at 1
// bit), p2 / p2x / p2o / p4 (the next group's loads issued before this group's math: 47-73%),
// an L2 bulk prefetch of the next rounds' spans and `.L2::256B` load hints (no gain or a loss:
// the kernel is bound by the instructions per element and the per-group chain, not by load
// latency), q8x4 (QPL 8 in 64 registers: spills, 80/82/82/85), q16x (QPL 16: 190 registers,
// one block per SM, 61-68%).
#define QUANTIZE_WIDTH(NAME, BITS, QPL, OCT, BOUNDS)                                        \
    extern "C" __global__ void BOUNDS NAME##_b##BITS(                                        \
        const float* __restrict__ x, u64 n_samples, u64 sample_len, u64 group, u64 key,      \
        u8* __restrict__ data, u16* __restrict__ mins, u16* __restrict__ scales,             \
        u64* __restrict__ err) {                                                             \
        quantize_impl<BITS, QPL, OCT>(x, n_samples, sample_len, group, key, data, mins,      \
                                      scales, err);                                          \
    }
#define QUANTIZE_ENTRY(NAME, QPL, OCT, BOUNDS)    \
    QUANTIZE_WIDTH(NAME, 1, QPL, OCT, BOUNDS)     \
    QUANTIZE_WIDTH(NAME, 2, QPL, OCT, BOUNDS)     \
    QUANTIZE_WIDTH(NAME, 4, QPL, OCT, BOUNDS)     \
    QUANTIZE_WIDTH(NAME, 8, QPL, OCT, BOUNDS)

QUANTIZE_ENTRY(quantize_q8x, 8u, true, __launch_bounds__(256))
QUANTIZE_ENTRY(quantize_q4x, 4u, true, __launch_bounds__(256))

// ---------------------------------------------------------------------------------------------
// Dequantize: x' = q / s + mn (the CPU's `q as f32 / s + mn`: IEEE division, then addition).
// One thread per quad (4 consecutive elements of a sample; quads never cross groups, as a group
// is a multiple of 8), grid-stride, TWO quads per thread and round (i and i + stride: all loads
// of both are issued before any math, for memory-level parallelism): one float4 store per quad
// when the output is 16-byte aligned (every quad when sample_len % 4 == 0), else 4-byte stores.
// `data`, `mins`, `scales` may point at sample `first` of a larger tensor (the host offsets the
// pointers). (qps_m, qps_l) and (qpg_m, qpg_l): fast_div constants for quads per sample
// ceil(sample_len/4) and quads per group group/4, used when the quad count fits in 32 bits
// (else u64 division).
//
// Division cost: __fdiv_rn's fast path (reciprocal + FMA refinement) is guarded by FCHK, which
// sends a ZERO dividend (exponent field 0, like a subnormal) to the ~60-instruction slow path,
// divergently. Code 0 is half of all codes at 1 bit (a quarter at 2 bits), so the kernel never
// divides 0: for a positive finite scale (every scale quantize stores; subnormal bf16 included)
// 0 / s is +0 exactly, which is used directly; any other scale (only from_host can carry one)
// takes the real division. Every other quotient is the same __fdiv_rn, so results stay the
// CPU's bit for bit. 1 bit: the two possible outputs are computed once per quad (one division),
// then selected per element.

// c / s as __fdiv_rn(c, s) for an integer code c (as float cf), never dividing a zero when
// `spos` (s positive finite).
__device__ __forceinline__ float div_code(u32 c, float cf, float s, bool spos) {
    const bool zero = c == 0 && spos;
    const float q = __fdiv_rn(zero ? 1.0f : cf, s);
    return zero ? 0.0f : q;
}

// Inputs of one quad: its codes (code e at bits [e*BITS, (e+1)*BITS)), group min / scale bits,
// elements in the sample (1..4), output offset.
struct DqQuad {
    u32 codes;
    u32 avail;
    u16 mn;
    u16 s;
    u64 o;  // flat index of the quad's first output element
};

template <int BITS>
__device__ __forceinline__ DqQuad dq_load(u64 i, const u8* __restrict__ data,
                                          const u16* __restrict__ mins,
                                          const u16* __restrict__ scales, u64 sample_len,
                                          u64 qps, u64 qpg, u64 gps, u64 sb, bool narrow,
                                          u32 qps_m, u32 qps_l, u32 qpg_m, u32 qpg_l) {
    u64 n, q, k;
    if (narrow) {
        const u32 n32 = fast_div((u32)i, qps_m, qps_l);
        const u32 q32 = (u32)i - n32 * (u32)qps;
        n = n32;
        q = q32;
        k = fast_div(q32, qpg_m, qpg_l);
    } else {
        n = i / qps;
        q = i - n * qps;
        k = q / qpg;
    }
    DqQuad r;
    const u64 gi = n * gps + k;
    r.mn = __ldg(mins + gi);
    r.s = __ldg(scales + gi);
    const u64 j0 = 4 * q;
    const u64 left = sample_len - j0;
    r.avail = left < 4 ? (u32)left : 4u;
    r.o = n * sample_len + j0;
    const u8* ds = data + n * sb;
    if (BITS == 1) {
        r.codes = (u32)__ldg(ds + (q >> 1)) >> (4 * (u32)(q & 1));
    } else if (BITS == 2) {
        r.codes = __ldg(ds + q);
    } else if (BITS == 4) {
        const u8* p = ds + 2 * q;
        if (r.avail < 3) {
            r.codes = __ldg(p);
        } else if (((size_t)p & 1) == 0) {
            r.codes = __ldg(reinterpret_cast<const u16*>(p));
        } else {
            r.codes = (u32)__ldg(p) | ((u32)__ldg(p + 1) << 8);
        }
    } else {
        const u8* p = ds + 4 * q;
        if (r.avail == 4 && ((size_t)p & 3) == 0) {
            r.codes = __ldg(reinterpret_cast<const u32*>(p));
        } else {
            r.codes = __ldg(p);
            for (u32 e = 1; e < r.avail; ++e) {
                r.codes |= (u32)__ldg(p + e) << (8 * e);
            }
        }
    }
    return r;
}

template <int BITS>
__device__ __forceinline__ void dq_store(const DqQuad& r, float* __restrict__ out) {
    const u32 mask = (1u << BITS) - 1u;
    const float mn = bf16_to_f32(r.mn);
    const float s = bf16_to_f32(r.s);
    const bool spos = (u32)r.s - 1u < (u32)BF16_MAX_BITS;  // bits 0x0001..=0x7F7F
    float y[4];
    if (BITS == 1) {
        float z = 0.0f;  // 0 / s
        if (!spos) {
            z = __fdiv_rn(0.0f, s);
        }
        const float y0 = __fadd_rn(z, mn);
        const float y1 = __fadd_rn(__fdiv_rn(1.0f, s), mn);
#pragma unroll
        for (u32 e = 0; e < 4; ++e) {
            y[e] = (r.codes >> e) & 1u ? y1 : y0;
        }
    } else {
#pragma unroll
        for (u32 e = 0; e < 4; ++e) {
            // (float)code exactly, without a conversion instruction: 2^23 + c, minus 2^23.
            const u32 c = (r.codes >> (e * BITS)) & mask;
            const float cf = __fsub_rn(__uint_as_float(0x4B000000u | c), MAGIC23);
            y[e] = __fadd_rn(div_code(c, cf, s, spos), mn);
        }
    }
    float* o = out + r.o;
    if (r.avail == 4 && ((size_t)o & 15) == 0) {
        *reinterpret_cast<float4*>(o) = make_float4(y[0], y[1], y[2], y[3]);
    } else {
        for (u32 e = 0; e < r.avail; ++e) {
            o[e] = y[e];
        }
    }
}

template <int BITS>
__device__ __forceinline__ void dequantize_impl(const u8* __restrict__ data,
                                                const u16* __restrict__ mins,
                                                const u16* __restrict__ scales, u64 n_samples,
                                                u64 sample_len, u64 group, float* __restrict__ out,
                                                u32 qps_m, u32 qps_l, u32 qpg_m, u32 qpg_l) {
    const u64 qps = (sample_len + 3) >> 2;
    const u64 qpg = group >> 2;
    const u64 total = n_samples * qps;
    const u64 gps = (sample_len + group - 1) / group;
    const u64 sb = (sample_len * BITS + 7) / 8;
    const bool narrow = (total >> 32) == 0;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    // Straight-line rounds (the narrow test is hoisted, the second quad of a last round
    // re-reads the first and is not stored), so all loads of a round issue back to back.
    if (narrow) {
        for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += 2 * stride) {
            const bool two = i + stride < total;
            const DqQuad a = dq_load<BITS>(i, data, mins, scales, sample_len, qps, qpg, gps, sb,
                                           true, qps_m, qps_l, qpg_m, qpg_l);
            const DqQuad b = dq_load<BITS>(two ? i + stride : i, data, mins, scales, sample_len,
                                           qps, qpg, gps, sb, true, qps_m, qps_l, qpg_m, qpg_l);
            dq_store<BITS>(a, out);
            if (two) {
                dq_store<BITS>(b, out);
            }
        }
    } else {
        for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
            dq_store<BITS>(dq_load<BITS>(i, data, mins, scales, sample_len, qps, qpg, gps, sb,
                                         false, qps_m, qps_l, qpg_m, qpg_l),
                           out);
        }
    }
}

extern "C" __global__ void dequantize(const u8* __restrict__ data, const u16* __restrict__ mins,
                                      const u16* __restrict__ scales, u64 n_samples,
                                      u64 sample_len, u64 group, u32 bits,
                                      float* __restrict__ out, u32 qps_m, u32 qps_l, u32 qpg_m,
                                      u32 qpg_l) {
    switch (bits) {
        case 1:
            dequantize_impl<1>(data, mins, scales, n_samples, sample_len, group, out, qps_m,
                               qps_l, qpg_m, qpg_l);
            break;
        case 2:
            dequantize_impl<2>(data, mins, scales, n_samples, sample_len, group, out, qps_m,
                               qps_l, qpg_m, qpg_l);
            break;
        case 4:
            dequantize_impl<4>(data, mins, scales, n_samples, sample_len, group, out, qps_m,
                               qps_l, qpg_m, qpg_l);
            break;
        default:
            dequantize_impl<8>(data, mins, scales, n_samples, sample_len, group, out, qps_m,
                               qps_l, qpg_m, qpg_l);
            break;
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
// BitMask::positive. A warp makes 4 words per round: 8 coalesced 128-byte loads in flight, then
// one ballot per 32 elements; blockDim.x must be a multiple of 32.

extern "C" __global__ void mask_pack(const float* __restrict__ x, u64 len,
                                     u64* __restrict__ words) {
    const u64 nw = (len + 63) / 64;
    const u32 lane = threadIdx.x & 31u;
    const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u64 nwarps = ((u64)gridDim.x * blockDim.x) >> 5;
    for (u64 w0 = warp * 4; w0 < nw; w0 += nwarps * 4) {  // w0 is warp-uniform: ballots are safe
        const u64 i0 = w0 * 64 + lane;
        float v[8];
#pragma unroll
        for (u32 m = 0; m < 8; ++m) {
            const u64 i = i0 + 32 * m;
            v[m] = i < len ? __ldg(x + i) : 0.0f;
        }
        u32 b[8];
#pragma unroll
        for (u32 m = 0; m < 8; ++m) {
            b[m] = __ballot_sync(FULL_MASK, v[m] > 0.0f);
        }
        // Lane j < 4 writes word w0 + j = ballots 2j (low half) and 2j + 1 (high half).
        const u32 lo = lane == 0 ? b[0] : lane == 1 ? b[2] : lane == 2 ? b[4] : b[6];
        const u32 hi = lane == 0 ? b[1] : lane == 1 ? b[3] : lane == 2 ? b[5] : b[7];
        if (lane < 4 && w0 + lane < nw) {
            words[w0 + lane] = (u64)lo | ((u64)hi << 32);
        }
    }
}

// out[i] = bit i set ? if_set : if_clear (BitMask::select_into). One thread per 4 elements (a
// nibble of a word): one float4 store when `out` is 16-byte aligned (a fresh allocation is).
extern "C" __global__ void mask_unpack(const u64* __restrict__ words, u64 len, float if_set,
                                       float if_clear, float* __restrict__ out) {
    const u64 nq = (len + 3) >> 2;
    const bool vec = ((size_t)out & 15) == 0;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 q = (u64)blockIdx.x * blockDim.x + threadIdx.x; q < nq; q += stride) {
        const u32 nib = (u32)(__ldg(words + (q >> 4)) >> (4 * (u32)(q & 15))) & 0xFu;
        const float y0 = (nib & 1u) ? if_set : if_clear;
        const float y1 = (nib & 2u) ? if_set : if_clear;
        const float y2 = (nib & 4u) ? if_set : if_clear;
        const float y3 = (nib & 8u) ? if_set : if_clear;
        float* o = out + 4 * q;
        if (vec && 4 * q + 4 <= len) {
            *reinterpret_cast<float4*>(o) = make_float4(y0, y1, y2, y3);
        } else {
            const u64 m = len - 4 * q < 4 ? len - 4 * q : 4;
            o[0] = y0;
            if (m > 1) o[1] = y1;
            if (m > 2) o[2] = y2;
            if (m > 3) o[3] = y3;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PackedUints (src/compress/bitpack.rs): value i occupies stream bits [i*bits, (i+1)*bits),
// stream bit k = bit k % 8 of byte k / 8 (values may straddle two bytes), padding bits zero.
// bits in 1..=8. A value >= 2^bits sets err = atomicMin(err, index) (host initialises err to
// NO_ERROR) — the CPU's ValueTooLarge.
//
// Widths 1/2/4/8 (every width actrain stores: pool argmax indices) take a chunked fast path: a
// thread packs 16 values (one 16-byte load when the values are 16-byte aligned) into 2*bits
// bytes with one store, or unpacks them back (one 16-byte store). Bytes / values past the last
// whole chunk, and the other widths, go one output byte / value per thread.

// The BITS-bit fields of the four bytes of w (each < 2^BITS), packed: byte k -> bits k*BITS.
template <u32 BITS>
__device__ __forceinline__ u32 fold_bytes(u32 w) {
    if (BITS == 8) {
        return w;
    }
    const u32 m = (1u << BITS) - 1u;
    return (w & m) | ((w >> (8 - BITS)) & (m << BITS)) | ((w >> (16 - 2 * BITS)) & (m << (2 * BITS))) |
           ((w >> (24 - 3 * BITS)) & (m << (3 * BITS)));
}

// Inverse of fold_bytes: four BITS-bit fields (bits k*BITS) spread into four bytes.
template <u32 BITS>
__device__ __forceinline__ u32 spread_bytes(u32 f) {
    if (BITS == 8) {
        return f;
    }
    const u32 m = (1u << BITS) - 1u;
    return (f & m) | ((f << (8 - BITS)) & (m << 8)) | ((f << (16 - 2 * BITS)) & (m << 16)) |
           ((f << (24 - 3 * BITS)) & (m << 24));
}

// Byte b of the packed stream from the values (any width; checks the values it starts).
__device__ __forceinline__ u8 uints_pack_byte(const u8* __restrict__ values, u64 len, u32 bits,
                                              u64 b, u64* __restrict__ err) {
    const u32 mask = (1u << bits) - 1u;
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
    return (u8)acc;
}

template <u32 BITS>
__device__ __forceinline__ void uints_pack_chunks(const u8* __restrict__ values, u64 len,
                                                  u8* __restrict__ data, u64* __restrict__ err) {
    const u64 chunks = len / 16;
    const bool vec = ((size_t)values & 15) == 0;  // data is a fresh allocation (aligned)
    const u32 rep = 0x01010101u * ((1u << BITS) - 1u);  // the largest valid value in each byte
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += stride) {
        const u8* v = values + 16 * c;
        u32 w[4];
        if (vec) {
            const uint4 q = __ldg(reinterpret_cast<const uint4*>(v));
            w[0] = q.x;
            w[1] = q.y;
            w[2] = q.z;
            w[3] = q.w;
        } else {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                w[k] = (u32)v[4 * k] | ((u32)v[4 * k + 1] << 8) | ((u32)v[4 * k + 2] << 16) |
                       ((u32)v[4 * k + 3] << 24);
            }
        }
        if (((w[0] | w[1] | w[2] | w[3]) & ~rep) != 0) {  // rare: the chunk's first bad value
            for (u32 k = 0; k < 16; ++k) {
                if (((w[k >> 2] >> (8 * (k & 3))) & 0xFFu) >> BITS) {
                    atomicMin(err, 16 * c + k);
                    break;
                }
            }
        }
        u32 f[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            f[k] = fold_bytes<BITS>(w[k]);
        }
        u8* out = data + 2 * BITS * c;
        if (BITS == 1) {
            *reinterpret_cast<u16*>(out) = (u16)(f[0] | (f[1] << 4) | (f[2] << 8) | (f[3] << 12));
        } else if (BITS == 2) {
            *reinterpret_cast<u32*>(out) = f[0] | (f[1] << 8) | (f[2] << 16) | (f[3] << 24);
        } else if (BITS == 4) {
            *reinterpret_cast<uint2*>(out) = make_uint2(f[0] | (f[1] << 16), f[2] | (f[3] << 16));
        } else {
            *reinterpret_cast<uint4*>(out) = make_uint4(f[0], f[1], f[2], f[3]);
        }
    }
    // The bytes after the last whole chunk (fewer than 2 * BITS).
    const u64 nbytes = (len * BITS + 7) / 8;
    for (u64 b = 2 * BITS * chunks + (u64)blockIdx.x * blockDim.x + threadIdx.x; b < nbytes;
         b += stride) {
        data[b] = uints_pack_byte(values, len, BITS, b, err);
    }
}

extern "C" __global__ void uints_pack(const u8* __restrict__ values, u64 len, u32 bits,
                                      u8* __restrict__ data, u64* __restrict__ err) {
    switch (bits) {
        case 1:
            uints_pack_chunks<1>(values, len, data, err);
            return;
        case 2:
            uints_pack_chunks<2>(values, len, data, err);
            return;
        case 4:
            uints_pack_chunks<4>(values, len, data, err);
            return;
        case 8:
            uints_pack_chunks<8>(values, len, data, err);
            return;
        default:
            break;
    }
    const u64 nbytes = (len * bits + 7) / 8;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 b = (u64)blockIdx.x * blockDim.x + threadIdx.x; b < nbytes; b += stride) {
        data[b] = uints_pack_byte(values, len, bits, b, err);
    }
}

// Value i of the stream (any width).
__device__ __forceinline__ u8 uints_unpack_value(const u8* __restrict__ data, u64 nbytes,
                                                 u32 bits, u64 i) {
    const u32 mask = (1u << bits) - 1u;
    const u64 bit = i * bits;
    const u64 at = bit >> 3;
    const u32 lo = data[at];
    const u32 hi = at + 1 < nbytes ? (u32)data[at + 1] : 0u;
    return (u8)((((hi << 8) | lo) >> (u32)(bit & 7)) & mask);
}

// `data` 16-byte aligned (the caller checks; CudaPackedUints owns its allocation).
template <u32 BITS>
__device__ __forceinline__ void uints_unpack_chunks(const u8* __restrict__ data, u64 len,
                                                    u8* __restrict__ out) {
    const u64 chunks = len / 16;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += stride) {
        const u8* in = data + 2 * BITS * c;
        u32 f[4];  // the chunk's four 4-value fields
        if (BITS == 1) {
            const u32 h = *reinterpret_cast<const u16*>(in);
            f[0] = h & 0xFu;
            f[1] = (h >> 4) & 0xFu;
            f[2] = (h >> 8) & 0xFu;
            f[3] = h >> 12;
        } else if (BITS == 2) {
            const u32 h = __ldg(reinterpret_cast<const u32*>(in));
            f[0] = h & 0xFFu;
            f[1] = (h >> 8) & 0xFFu;
            f[2] = (h >> 16) & 0xFFu;
            f[3] = h >> 24;
        } else if (BITS == 4) {
            const uint2 h = __ldg(reinterpret_cast<const uint2*>(in));
            f[0] = h.x & 0xFFFFu;
            f[1] = h.x >> 16;
            f[2] = h.y & 0xFFFFu;
            f[3] = h.y >> 16;
        } else {
            const uint4 h = __ldg(reinterpret_cast<const uint4*>(in));
            f[0] = h.x;
            f[1] = h.y;
            f[2] = h.z;
            f[3] = h.w;
        }
        *reinterpret_cast<uint4*>(out + 16 * c) =
            make_uint4(spread_bytes<BITS>(f[0]), spread_bytes<BITS>(f[1]),
                       spread_bytes<BITS>(f[2]), spread_bytes<BITS>(f[3]));
    }
    const u64 nbytes = (len * BITS + 7) / 8;
    for (u64 i = 16 * chunks + (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        out[i] = uints_unpack_value(data, nbytes, BITS, i);
    }
}

// out[i] = value i (PackedUints::unpack_into).
extern "C" __global__ void uints_unpack(const u8* __restrict__ data, u64 len, u32 bits,
                                        u8* __restrict__ out) {
    switch (((size_t)data & 15) == 0 ? bits : 0u) {
        case 1:
            uints_unpack_chunks<1>(data, len, out);
            return;
        case 2:
            uints_unpack_chunks<2>(data, len, out);
            return;
        case 4:
            uints_unpack_chunks<4>(data, len, out);
            return;
        case 8:
            uints_unpack_chunks<8>(data, len, out);
            return;
        default:
            break;
    }
    const u64 nbytes = (len * bits + 7) / 8;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        out[i] = uints_unpack_value(data, nbytes, bits, i);
    }
}
