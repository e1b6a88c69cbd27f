//! Dense packing of small per-element context: 1-bit masks and small unsigned integers.
//!
//! Ops whose backward needs only a little per element keep that instead of a quantized tensor:
//! ReLU / LeakyReLU keep the sign of the input (1 bit), max-pool keeps the argmax position
//! inside its window (4 bits for a 3x3 window).
//!
//! Layouts (both little-endian bitstreams):
//! * [`BitMask`]: element `i` is bit `i % 64` (LSB = 0) of `words[i / 64]`; unused high bits of
//!   the last word are zero.
//! * [`PackedUints`]: value `i` occupies stream bits `[i*bits, (i+1)*bits)`, stream bit `k` being
//!   bit `k % 8` of byte `k / 8` (so a value may straddle two bytes when `bits` does not
//!   divide 8); `data.len() = ceil(len * bits / 8)`, padding bits zero.

use rayon::prelude::*;

use super::cpu;
use super::error::QuantError;

/// Words per parallel chunk of a mask (64K elements).
const MASK_CHUNK_WORDS: usize = cpu::UNIT_ELEMS / 64;
/// Values per parallel chunk of packed uints (a multiple of 8, so chunks start on whole bytes).
const UINT_CHUNK: usize = cpu::UNIT_ELEMS;

fn check_len(expected: usize, got: usize) -> Result<(), QuantError> {
    if expected == got {
        Ok(())
    } else {
        Err(QuantError::LenMismatch { expected, got })
    }
}

/// One bit per element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitMask {
    len: usize,
    words: Vec<u64>,
}

impl BitMask {
    /// Bit `i` = `pred(x[i])`.
    pub fn from_fn<P: Fn(f32) -> bool + Sync>(x: &[f32], pred: P) -> Self {
        let mut words = vec![0u64; x.len().div_ceil(64)];
        let build = |ws: &mut [u64], xs: &[f32]| {
            for (w, xc) in ws.iter_mut().zip(xs.chunks(64)) {
                let mut b = 0u64;
                for (j, &v) in xc.iter().enumerate() {
                    b |= (pred(v) as u64) << j;
                }
                *w = b;
            }
        };
        if x.len() <= cpu::PAR_MIN_ELEMS {
            build(&mut words, x);
        } else {
            words
                .par_chunks_mut(MASK_CHUNK_WORDS)
                .zip(x.par_chunks(MASK_CHUNK_WORDS * 64))
                .for_each(|(ws, xs)| build(ws, xs));
        }
        Self {
            len: x.len(),
            words,
        }
    }

    /// The ReLU mask: bit set where `x > 0` (NaN gives 0).
    pub fn positive(x: &[f32]) -> Self {
        Self::from_fn(x, |v| v > 0.0)
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bit `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<bool> {
        (i < self.len).then(|| (self.words[i / 64] >> (i % 64)) & 1 == 1)
    }
    /// Number of set bits.
    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }
    /// Packed words (layout: module doc).
    pub fn words(&self) -> &[u64] {
        &self.words
    }
    /// Bytes held by the packed words.
    pub fn stored_bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// Expands to 1.0 where set, 0.0 elsewhere (`out.len()` must equal `len()`).
    pub fn to_f32_into(&self, out: &mut [f32]) -> Result<(), QuantError> {
        self.select_into(out, 1.0, 0.0)
    }

    /// Expands to `if_set` / `if_clear` per element: e.g. `(1.0, slope)` is LeakyReLU's
    /// derivative, so backward is one multiply.
    pub fn select_into(
        &self,
        out: &mut [f32],
        if_set: f32,
        if_clear: f32,
    ) -> Result<(), QuantError> {
        check_len(self.len, out.len())?;
        let expand = |os: &mut [f32], ws: &[u64]| {
            for (oc, &w) in os.chunks_mut(64).zip(ws) {
                for (j, o) in oc.iter_mut().enumerate() {
                    *o = if (w >> j) & 1 == 1 { if_set } else { if_clear };
                }
            }
        };
        if self.len <= cpu::PAR_MIN_ELEMS {
            expand(out, &self.words);
        } else {
            out.par_chunks_mut(MASK_CHUNK_WORDS * 64)
                .zip(self.words.par_chunks(MASK_CHUNK_WORDS))
                .for_each(|(os, ws)| expand(os, ws));
        }
        Ok(())
    }

    /// Expands bits `start..start + out.len()` to `if_set` / `if_clear` per element: a row
    /// range of a mask saved per sample (`start` need not be a multiple of 64), so a chunked
    /// backward reads only its rows. Errors if the range runs past `len()`.
    pub fn select_range_into<T: Copy + Send + Sync>(
        &self,
        start: usize,
        out: &mut [T],
        if_set: T,
        if_clear: T,
    ) -> Result<(), QuantError> {
        let end = start.saturating_add(out.len());
        if end > self.len {
            return Err(QuantError::LenMismatch {
                expected: self.len.saturating_sub(start),
                got: out.len(),
            });
        }
        let words = &self.words;
        // Elements `[0, os.len())` of `os` are bits `first..` of the mask.
        let expand = |os: &mut [T], first: usize| {
            let mut bit = first;
            let mut w = if os.is_empty() {
                0
            } else {
                words[bit / 64] >> (bit % 64)
            };
            for o in os.iter_mut() {
                *o = if w & 1 == 1 { if_set } else { if_clear };
                bit += 1;
                if bit.is_multiple_of(64) {
                    w = words.get(bit / 64).copied().unwrap_or(0);
                } else {
                    w >>= 1;
                }
            }
        };
        if out.len() <= cpu::PAR_MIN_ELEMS {
            expand(out, start);
        } else {
            out.par_chunks_mut(MASK_CHUNK_WORDS * 64)
                .enumerate()
                .for_each(|(i, os)| expand(os, start + i * MASK_CHUNK_WORDS * 64));
        }
        Ok(())
    }

    /// [`Self::to_f32_into`] into a new vector.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len];
        // Cannot fail: `out` has exactly `len` elements.
        let _ = self.to_f32_into(&mut out);
        out
    }
}

/// Unsigned integers below `2^bits` (`bits` in 1..=8), densely packed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedUints {
    bits: u8,
    len: usize,
    data: Vec<u8>,
}

impl PackedUints {
    /// Packs `values`; errors on a bad width or on the first value that does not fit.
    pub fn pack(values: &[u8], bits: u8) -> Result<Self, QuantError> {
        if !(1..=8).contains(&bits) {
            return Err(QuantError::BadBits(bits));
        }
        let b = bits as usize;
        let mut data = vec![0u8; (values.len() * b).div_ceil(8)];
        // A chunk of `UINT_CHUNK` values fills exactly `UINT_CHUNK * b / 8` bytes.
        let pack = |ds: &mut [u8], vs: &[u8], base: usize| -> Result<(), QuantError> {
            if let Some(j) = vs.iter().position(|&v| (v as u16) >> b != 0) {
                return Err(QuantError::ValueTooLarge {
                    index: base + j,
                    value: vs[j],
                    bits,
                });
            }
            // 8 values -> exactly `b` bytes, assembled in a u64.
            for (dc, vc) in ds.chunks_mut(b).zip(vs.chunks(8)) {
                let mut acc = 0u64;
                for (k, &v) in vc.iter().enumerate() {
                    acc |= (v as u64) << (k * b);
                }
                let n = dc.len();
                dc.copy_from_slice(&acc.to_le_bytes()[..n]);
            }
            Ok(())
        };
        if values.len() <= cpu::PAR_MIN_ELEMS {
            pack(&mut data, values, 0)?;
        } else {
            let results: Vec<Result<(), QuantError>> = data
                .par_chunks_mut(UINT_CHUNK * b / 8)
                .zip(values.par_chunks(UINT_CHUNK))
                .enumerate()
                .map(|(i, (ds, vs))| pack(ds, vs, i * UINT_CHUNK))
                .collect();
            results.into_iter().collect::<Result<Vec<()>, _>>()?;
        }
        Ok(Self {
            bits,
            len: values.len(),
            data,
        })
    }

    pub fn bits(&self) -> u8 {
        self.bits
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Packed bytes (layout: module doc).
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    /// Bytes held by the packed data.
    pub fn stored_bytes(&self) -> usize {
        self.data.len()
    }

    /// Value `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<u8> {
        if i >= self.len {
            return None;
        }
        let bit = i * self.bits as usize;
        let lo = self.data[bit / 8] as u16;
        let hi = self.data.get(bit / 8 + 1).copied().unwrap_or(0) as u16;
        let mask = (1u16 << self.bits) - 1;
        Some((((hi << 8) | lo) >> (bit % 8) & mask) as u8)
    }

    /// Unpacks into `out` (`out.len()` must equal `len()`).
    pub fn unpack_into(&self, out: &mut [u8]) -> Result<(), QuantError> {
        check_len(self.len, out.len())?;
        let b = self.bits as usize;
        let mask = (1u64 << b) - 1;
        let unpack = |os: &mut [u8], ds: &[u8]| {
            for (oc, dc) in os.chunks_mut(8).zip(ds.chunks(b)) {
                let mut buf = [0u8; 8];
                buf[..dc.len()].copy_from_slice(dc);
                let acc = u64::from_le_bytes(buf);
                for (k, o) in oc.iter_mut().enumerate() {
                    *o = ((acc >> (k * b)) & mask) as u8;
                }
            }
        };
        if self.len <= cpu::PAR_MIN_ELEMS {
            unpack(out, &self.data);
        } else {
            out.par_chunks_mut(UINT_CHUNK)
                .zip(self.data.par_chunks(UINT_CHUNK * b / 8))
                .for_each(|(os, ds)| unpack(os, ds));
        }
        Ok(())
    }

    /// Unpacks into a new vector.
    pub fn unpack(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        // Cannot fail: `out` has exactly `len` elements.
        let _ = self.unpack_into(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_small_round_trip() {
        let x: Vec<f32> = (0..131)
            .map(|i| if i % 3 == 0 { 1.0 } else { -0.5 })
            .collect();
        let m = BitMask::positive(&x);
        assert_eq!(m.len(), 131);
        assert_eq!(m.stored_bytes(), 24);
        assert_eq!(m.count_ones(), 44);
        let f = m.to_f32_vec();
        for (i, (&v, &e)) in x.iter().zip(&f).enumerate() {
            assert_eq!(e, if v > 0.0 { 1.0 } else { 0.0 });
            assert_eq!(m.get(i), Some(v > 0.0));
        }
        assert_eq!(m.get(131), None);
        // high bits of the last word are zero
        assert_eq!(m.words()[2] >> 3, 0);
    }

    #[test]
    fn mask_range_matches_get() {
        let x: Vec<f32> = (0..300).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let m = BitMask::positive(&x);
        for (start, n) in [
            (0, 300),
            (1, 63),
            (63, 2),
            (64, 64),
            (5, 200),
            (299, 1),
            (300, 0),
        ] {
            let mut out = vec![9u8; n];
            m.select_range_into(start, &mut out, 1, 0).unwrap();
            for (j, &o) in out.iter().enumerate() {
                assert_eq!(o == 1, m.get(start + j).unwrap(), "start {start} j {j}");
            }
        }
        let mut out = vec![0u8; 2];
        assert!(m.select_range_into(299, &mut out, 1, 0).is_err());
    }

    #[test]
    fn uints_small_round_trip_and_get() {
        for bits in 1..=8u8 {
            let v: Vec<u8> = (0..77u32)
                .map(|i| ((i * 37 + 5) % (1 << bits)) as u8)
                .collect();
            let p = PackedUints::pack(&v, bits).unwrap();
            assert_eq!(p.stored_bytes(), (77 * bits as usize).div_ceil(8));
            assert_eq!(p.unpack(), v);
            for (i, &e) in v.iter().enumerate() {
                assert_eq!(p.get(i), Some(e));
            }
            assert_eq!(p.get(77), None);
        }
    }
}
