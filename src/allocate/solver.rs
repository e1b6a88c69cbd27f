//! The bit-allocation problem and its exact solver.
//!
//! ```text
//! minimise   Σ_l c_l · S(b_l),        S(b) = 1 / (2^b − 1)^2,  S(32) = 0 (kept as fp32)
//! subject to Σ_l D_l · b_l ≤ B · Σ_l D_l,   b_l ∈ {32, 8, 4, 2, 1}
//! ```
//!
//! *Why not the greedy of ActNN/GACT:* per tensor the ladder is convex (the variance added per
//! bit saved grows down the ladder: 6.4e-7·c, 1.1e-3·c, 5.3e-2·c, 0.89·c per element-bit),
//! so greedy is optimal for the *continuous* relaxation. The real problem is a multiple-choice
//! knapsack: the moves are indivisible and of very different sizes (a 32→8 move of a large
//! tensor frees 24·D bits), so greedy overshoots the budget and leaves bits unused. The
//! smallest case: two 1-element tensors, c = 1 and 100, 2 bits: greedy ends at (1, 2) with a
//! bit unused, the optimum is (2, 2). On random instances of up to 6 tensors it is strictly
//! worse in ~30% of cases, by up to ~30× (tests/allocator.rs). [`allocate`] is therefore exact: a depth-first
//! branch and bound over the tensors (largest first), bounded by the LP relaxation (the
//! fractional greedy on the globally sorted moves), seeded with the greedy solution. A DP over
//! the budget is not practical here because `D_l` are activation sizes (10^4..10^8 elements).
//! The search is capped (see [`Allocation::optimal`]); on the networks we train it proves
//! optimality in well under a millisecond to a few milliseconds.

use crate::compress::policy::LADDER;

/// One tensor of the allocation problem.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorCost {
    /// Elements `D_l` (the weight of the tensor in the bit budget).
    pub elements: usize,
    /// Sensitivity `c_l`: gradient variance added per unit of `S(b)`.
    pub sensitivity: f64,
}

/// Variance factor of a `b`-bit stochastic-rounding quantizer, `1 / (2^b − 1)^2`; 0 for 32
/// (and anything ≥ 16: kept).
pub fn variance_factor(bits: u8) -> f64 {
    if bits >= 16 || bits == 0 {
        return 0.0;
    }
    let q = ((1u64 << bits) - 1) as f64;
    1.0 / (q * q)
}

/// `Σ_l c_l S(b_l)`: the modelled gradient variance of an assignment.
pub fn objective(tensors: &[TensorCost], bits: &[u8]) -> f64 {
    tensors
        .iter()
        .zip(bits)
        .map(|(t, &b)| clean(t.sensitivity) * variance_factor(b))
        .sum()
}

/// Average bits per element of an assignment (elements-weighted, 32 for kept tensors).
pub fn average_bits(tensors: &[TensorCost], bits: &[u8]) -> f64 {
    let total: u128 = tensors.iter().map(|t| t.elements as u128).sum();
    if total == 0 {
        return 0.0;
    }
    let used: u128 = tensors
        .iter()
        .zip(bits)
        .map(|(t, &b)| t.elements as u128 * b as u128)
        .sum();
    used as f64 / total as f64
}

/// The result of [`solve`].
#[derive(Clone, Debug, PartialEq)]
pub struct Allocation {
    /// Bits per tensor, one of [`LADDER`], in input order.
    pub bits: Vec<u8>,
    /// `Σ c_l S(b_l)` (with the sanitised sensitivities).
    pub variance: f64,
    /// True when the branch and bound finished: `bits` is a proven optimum. False only if the
    /// node cap was hit; `bits` is then the best assignment found (never worse than greedy).
    pub optimal: bool,
    /// Search nodes visited (for the cost report).
    pub nodes: usize,
}

/// Exact allocation (see the module docs): bits per tensor for an average budget of
/// `avg_bits` per element. Budget ≥ 32 keeps everything; a budget below 1 bit cannot be met
/// and gives every tensor 1 bit (the closest feasible point); a NaN budget is treated as
/// below 1. Zero sensitivities are fine: such tensors go to 1 bit unless spare budget
/// remains, which then goes to them (never wasted); NaN counts as 0, +inf as 1e30.
pub fn allocate(tensors: &[TensorCost], avg_bits: f64) -> Vec<u8> {
    solve(tensors, avg_bits).bits
}

/// [`allocate`] with the proof status and search statistics.
pub fn solve(tensors: &[TensorCost], avg_bits: f64) -> Allocation {
    let n = tensors.len();
    let finish = |bits: Vec<u8>, optimal: bool, nodes: usize| {
        let variance = objective(tensors, &bits);
        Allocation {
            bits,
            variance,
            optimal,
            nodes,
        }
    };
    if n == 0 {
        return finish(Vec::new(), true, 0);
    }
    if avg_bits >= 32.0 {
        return finish(vec![32; n], true, 0);
    }
    if avg_bits.is_nan() || avg_bits < 1.0 {
        return finish(vec![1; n], true, 0);
    }
    let Some(p) = Problem::new(tensors, avg_bits) else {
        // Everyone at 32 already fits (e.g. every tensor is empty).
        return finish(vec![32; n], true, 0);
    };
    let mut search = Search::new(&p);
    let optimal = search.run();
    let mut bits: Vec<u8> = search.best.iter().map(|&j| LADDER[j as usize]).collect();
    lift_free_tensors(&p, &mut bits);
    sort_within_size_classes(tensors, &p.c, &mut bits);
    finish(bits, optimal, search.nodes)
}

/// The greedy of ActNN/GACT (`calc_precision`): start at 32, repeatedly move the tensor whose
/// next rung adds the least variance per bit saved, until the budget holds. Kept for
/// comparison (the tests and `allocator_eval` report how far it is from the optimum).
pub fn allocate_greedy(tensors: &[TensorCost], avg_bits: f64) -> Vec<u8> {
    let n = tensors.len();
    if n == 0 {
        return Vec::new();
    }
    if avg_bits >= 32.0 {
        return vec![32; n];
    }
    if avg_bits.is_nan() || avg_bits < 1.0 {
        return vec![1; n];
    }
    let Some(p) = Problem::new(tensors, avg_bits) else {
        return vec![32; n];
    };
    let mut level = vec![0u8; n];
    let mut weight = p.max_weight;
    for m in &p.moves {
        if weight <= p.capacity {
            break;
        }
        level[m.item] = m.to;
        weight -= m.dw;
    }
    level.iter().map(|&j| LADDER[j as usize]).collect()
}

/// Sanitised sensitivity: NaN and negatives count as 0, +inf as a very large finite number
/// (GACT clamps at 1e10 for the same reason: one broken estimate must not poison the sums).
fn clean(c: f64) -> f64 {
    if c.is_nan() || c <= 0.0 {
        0.0
    } else if c.is_infinite() {
        1e30
    } else {
        c.min(1e30)
    }
}

/// One step down the ladder of one tensor (from rung `to - 1` to rung `to`).
#[derive(Clone, Copy, Debug)]
struct Move {
    item: usize,
    to: u8,
    /// Weight freed: `D · (b_from − b_to)`.
    dw: u128,
    /// Variance added: `c · (S(b_to) − S(b_from))`.
    dv: f64,
}

struct Problem {
    n: usize,
    /// Sanitised sensitivities (see `clean`).
    c: Vec<f64>,
    d: Vec<u128>,
    capacity: u128,
    /// Σ 32·D: the weight with everyone kept.
    max_weight: u128,
    /// All moves, sorted by variance added per unit of weight freed (the LP order).
    moves: Vec<Move>,
}

impl Problem {
    /// `None` when keeping everything already fits.
    fn new(tensors: &[TensorCost], avg_bits: f64) -> Option<Problem> {
        let n = tensors.len();
        let d: Vec<u128> = tensors.iter().map(|t| t.elements as u128).collect();
        let total: u128 = d.iter().sum();
        // f64 is exact far beyond any real element count; the relative slack absorbs the
        // rounding of `avg_bits * total` so an exactly-on-budget assignment is accepted.
        let capacity = (avg_bits * total as f64 * (1.0 + 1e-12)).floor() as u128;
        let max_weight = 32 * total;
        if max_weight <= capacity {
            return None;
        }
        let c: Vec<f64> = tensors.iter().map(|t| clean(t.sensitivity)).collect();
        let mut moves = Vec::with_capacity(4 * n);
        for l in 0..n {
            if d[l] == 0 {
                continue;
            }
            for to in 1..LADDER.len() {
                let (bf, bt) = (LADDER[to - 1], LADDER[to]);
                moves.push(Move {
                    item: l,
                    to: to as u8,
                    dw: d[l] * (bf - bt) as u128,
                    dv: c[l] * (variance_factor(bt) - variance_factor(bf)),
                });
            }
        }
        // Per tensor the rates strictly increase down the ladder (convexity), so sorting by
        // rate keeps each tensor's moves in order; ties (zero sensitivities: every rate 0)
        // break on (item, rung), which keeps that order too.
        moves.sort_by(|a, b| {
            let ra = a.dv / a.dw as f64;
            let rb = b.dv / b.dw as f64;
            ra.total_cmp(&rb)
                .then(a.item.cmp(&b.item))
                .then(a.to.cmp(&b.to))
        });
        Some(Problem {
            n,
            c,
            d,
            capacity,
            max_weight,
            moves,
        })
    }
}

/// Depth-first branch and bound over tensors (largest first).
struct Search<'a> {
    p: &'a Problem,
    /// Tensor indices in branching order.
    order: Vec<usize>,
    /// `fixed[l]`: tensor l's rung is decided on the current path.
    fixed: Vec<bool>,
    /// Current path's rungs (valid where fixed).
    level: Vec<u8>,
    /// `min_rest[k]`: Σ D over order[k..] (the weight they need at 1 bit).
    min_rest: Vec<u128>,
    /// `max_rest[k]`: Σ 32·D over order[k..].
    max_rest: Vec<u128>,
    best: Vec<u8>,
    best_v: f64,
    nodes: usize,
    cap: usize,
}

/// What the LP relaxation says about a node.
struct Bound {
    /// Lower bound on the variance of any completion.
    lower: f64,
    /// Variance of the integer completion obtained by taking the fractional move whole.
    upper: f64,
    /// Number of sorted moves the integer completion applies.
    taken: usize,
}

impl<'a> Search<'a> {
    fn new(p: &'a Problem) -> Self {
        let mut order: Vec<usize> = (0..p.n).collect();
        order.sort_by(|&a, &b| p.d[b].cmp(&p.d[a]).then(a.cmp(&b)));
        let mut min_rest = vec![0u128; p.n + 1];
        let mut max_rest = vec![0u128; p.n + 1];
        for k in (0..p.n).rev() {
            min_rest[k] = min_rest[k + 1] + p.d[order[k]];
            max_rest[k] = max_rest[k + 1] + 32 * p.d[order[k]];
        }
        // Bound evaluations cost O(moves); keep the worst case to a few 10^8 operations.
        let cap = (400_000_000 / p.moves.len().max(1)).clamp(20_000, 2_000_000);
        Search {
            p,
            order,
            fixed: vec![false; p.n],
            level: vec![0; p.n],
            min_rest,
            max_rest,
            best: vec![(LADDER.len() - 1) as u8; p.n],
            best_v: f64::INFINITY,
            nodes: 0,
            cap,
        }
    }

    /// Runs the search; true when it completed (the incumbent is optimal).
    fn run(&mut self) -> bool {
        // Everyone at 1 bit is feasible whenever the budget is ≥ 1 bit; it is the fallback.
        self.best_v = self.p.c.iter().sum::<f64>() * variance_factor(1);
        if self.min_rest[0] > self.p.capacity {
            return true;
        }
        self.dfs(0, self.p.capacity, 0.0)
    }

    /// LP bound over the free tensors with `room` weight left for them.
    fn bound(&self, depth: usize, room: u128, fixed_v: f64) -> Option<Bound> {
        if self.min_rest[depth] > room {
            return None;
        }
        let mut excess = self.max_rest[depth].saturating_sub(room);
        let mut v = fixed_v;
        if excess == 0 {
            return Some(Bound {
                lower: v,
                upper: v,
                taken: 0,
            });
        }
        for (i, m) in self.p.moves.iter().enumerate() {
            if self.fixed[m.item] {
                continue;
            }
            if m.dw >= excess {
                let frac = excess as f64 / m.dw as f64;
                return Some(Bound {
                    lower: v + frac * m.dv,
                    upper: v + m.dv,
                    taken: i + 1,
                });
            }
            excess -= m.dw;
            v += m.dv;
        }
        None
    }

    /// Records the integer completion of the current path described by `b` if it improves.
    fn consider(&mut self, b: &Bound) {
        if b.upper >= self.best_v {
            return;
        }
        let mut lv: Vec<u8> = self
            .level
            .iter()
            .zip(&self.fixed)
            .map(|(&j, &f)| if f { j } else { 0 })
            .collect();
        for m in &self.p.moves[..b.taken] {
            if !self.fixed[m.item] {
                lv[m.item] = m.to;
            }
        }
        self.best = lv;
        self.best_v = b.upper;
    }

    fn dfs(&mut self, depth: usize, room: u128, v: f64) -> bool {
        self.nodes += 1;
        if self.nodes > self.cap {
            return false;
        }
        let Some(b) = self.bound(depth, room, v) else {
            return true;
        };
        self.consider(&b);
        if depth == self.p.n || b.lower >= self.best_v * (1.0 - 1e-12) {
            return true;
        }
        let l = self.order[depth];
        // Try the rung the LP completion chose for this tensor first, then its neighbours.
        let lp = self.p.moves[..b.taken]
            .iter()
            .filter(|m| m.item == l)
            .map(|m| m.to)
            .max()
            .unwrap_or(0) as i32;
        let mut rungs: Vec<u8> = (0..LADDER.len() as u8).collect();
        rungs.sort_by_key(|&j| ((j as i32 - lp).abs(), j));
        let mut complete = true;
        for j in rungs {
            let w = self.p.d[l] * LADDER[j as usize] as u128;
            if w > room || room - w < self.min_rest[depth + 1] {
                continue;
            }
            let cv = v + self.p.c[l] * variance_factor(LADDER[j as usize]);
            if cv >= self.best_v {
                continue;
            }
            self.fixed[l] = true;
            self.level[l] = j;
            let done = self.dfs(depth + 1, room - w, cv);
            self.fixed[l] = false;
            if !done {
                complete = false;
                break;
            }
        }
        complete
    }
}

/// Spends budget the optimum left unused on zero-sensitivity tensors (their bits do not
/// change the objective, so the optimum is free to drop them to 1 bit first; keeping them
/// more precise costs nothing and protects against an underestimated sensitivity). Round
/// robin, one rung at a time, smallest first. A positive-sensitivity tensor never has room
/// to rise at an optimum, so only these can.
fn lift_free_tensors(p: &Problem, bits: &mut [u8]) {
    let mut used: u128 = bits.iter().zip(&p.d).map(|(&b, &d)| d * b as u128).sum();
    let mut free: Vec<usize> = (0..p.n).filter(|&l| p.c[l] == 0.0 && p.d[l] > 0).collect();
    free.sort_by_key(|&l| (p.d[l], l));
    loop {
        let mut moved = false;
        for &l in &free {
            let Some(pos) = LADDER.iter().position(|&b| b == bits[l]) else {
                continue;
            };
            if pos == 0 {
                continue;
            }
            let up = LADDER[pos - 1];
            let extra = p.d[l] * (up - bits[l]) as u128;
            if used + extra <= p.capacity {
                used += extra;
                bits[l] = up;
                moved = true;
            }
        }
        if !moved {
            return;
        }
    }
}

/// Among tensors of equal size, gives the most bits to the most sensitive: a permutation of
/// the same rungs within a size class keeps the budget and, by the rearrangement inequality,
/// never increases the variance. Makes the "more sensitive never gets fewer bits" property
/// hold exactly even where the search stopped at a 1e-12 tie.
fn sort_within_size_classes(tensors: &[TensorCost], c: &[f64], bits: &mut [u8]) {
    let mut idx: Vec<usize> = (0..tensors.len()).collect();
    idx.sort_by_key(|&i| tensors[i].elements);
    let mut start = 0;
    while start < idx.len() {
        let size = tensors[idx[start]].elements;
        let mut end = start;
        while end < idx.len() && tensors[idx[end]].elements == size {
            end += 1;
        }
        let class = &idx[start..end];
        if class.len() > 1 {
            let mut by_c: Vec<usize> = class.to_vec();
            by_c.sort_by(|&a, &b| c[b].total_cmp(&c[a]).then(a.cmp(&b)));
            let mut rungs: Vec<u8> = class.iter().map(|&i| bits[i]).collect();
            rungs.sort_unstable_by(|a, b| b.cmp(a));
            for (i, r) in by_c.into_iter().zip(rungs) {
                bits[i] = r;
            }
        }
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors() {
        assert_eq!(variance_factor(32), 0.0);
        assert_eq!(variance_factor(1), 1.0);
        assert!((variance_factor(2) - 1.0 / 9.0).abs() < 1e-15);
    }

    #[test]
    fn greedy_wastes_budget_where_exact_does_not() {
        // Budget 2 bits for two 1-element tensors, c = 1 and 100. Greedy takes the cheapest
        // moves first: A 4→2, then A 2→1 (0.89/bit) before B 4→2 (5.3/bit), and then still
        // needs B 4→2, ending at (1, 2) with a bit unused: variance 1 + 100/9. The optimum
        // is (2, 2): 101/9.
        let t = [
            TensorCost {
                elements: 1,
                sensitivity: 1.0,
            },
            TensorCost {
                elements: 1,
                sensitivity: 100.0,
            },
        ];
        assert_eq!(allocate_greedy(&t, 2.0), vec![1, 2]);
        let exact = solve(&t, 2.0);
        assert!(exact.optimal);
        assert_eq!(exact.bits, vec![2, 2]);
        assert!(exact.variance < objective(&t, &[1, 2]));
    }
}
