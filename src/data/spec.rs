//! Parsing of the `--data` spec string. Kept apart from loading so that a typo is reported
//! (naming the spec and what was expected) before any file is opened or memory allocated.

use std::path::PathBuf;

use anyhow::{bail, Result};

/// Refuse synthetic requests above this many input elements (16 GiB of f32): an allocation
/// failure aborts the process instead of returning an error, so catch absurd sizes here.
pub const MAX_SYNTHETIC_ELEMENTS: usize = 1 << 32;

/// Default sample count of the synthetic generators when the spec gives none.
pub const DEFAULT_SYNTHETIC_N: usize = 2048;

/// A parsed `--data` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// `digits`: the embedded 8x8 digits.
    Digits,
    /// `mnist:DIR`
    Mnist(PathBuf),
    /// `fashion-mnist:DIR`
    FashionMnist(PathBuf),
    /// `cifar10:DIR`
    Cifar10(PathBuf),
    /// `text:FILE`
    Text(PathBuf),
    /// `graph:DIR`
    Graph(PathBuf),
    /// `graph:synthetic`
    GraphSynthetic,
    /// `synthetic:CxHxW:CLASSES[:N]` or `synthetic:D:CLASSES[:N]`
    Synthetic {
        shape: Vec<usize>,
        classes: usize,
        n: usize,
    },
    /// `synthetic-text:VOCAB:SEQ[:N]`
    SyntheticText {
        vocab: usize,
        seq_len: usize,
        n: usize,
    },
}

/// One line listing every accepted form, appended to spec errors.
pub const SPEC_HELP: &str = "expected one of: digits, mnist:DIR, fashion-mnist:DIR, cifar10:DIR, \
text:FILE, graph:DIR, graph:synthetic, synthetic:CxHxW:CLASSES[:N], synthetic:D:CLASSES[:N], \
synthetic-text:VOCAB:SEQ[:N]";

impl std::str::FromStr for Spec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        parse(s)
    }
}

/// Parses a spec string; errors name the spec and the expected form.
pub fn parse(spec: &str) -> Result<Spec> {
    let s = spec.trim();
    if s.is_empty() {
        bail!("empty data spec: {SPEC_HELP}");
    }
    let (prefix, rest) = match s.split_once(':') {
        Some((p, r)) => (p, Some(r)),
        None => (s, None),
    };
    let path = |what: &str| -> Result<PathBuf> {
        match rest {
            Some(r) if !r.is_empty() => Ok(PathBuf::from(r)),
            _ => bail!("data spec '{spec}': expected '{prefix}:{what}' (a local {what})"),
        }
    };
    match prefix {
        "digits" => match rest {
            None => Ok(Spec::Digits),
            Some(_) => bail!("data spec '{spec}': 'digits' takes no argument"),
        },
        "mnist" => Ok(Spec::Mnist(path("DIR")?)),
        "fashion-mnist" | "fashion_mnist" => Ok(Spec::FashionMnist(path("DIR")?)),
        "cifar10" | "cifar-10" => Ok(Spec::Cifar10(path("DIR")?)),
        "text" => Ok(Spec::Text(path("FILE")?)),
        "graph" => {
            let p = path("DIR")?;
            if p.as_os_str() == "synthetic" {
                Ok(Spec::GraphSynthetic)
            } else {
                Ok(Spec::Graph(p))
            }
        }
        "synthetic" => {
            let parts: Vec<&str> = rest.unwrap_or("").split(':').collect();
            let form = "synthetic:CxHxW:CLASSES[:N] (e.g. synthetic:3x32x32:10:4096) or synthetic:D:CLASSES[:N]";
            if !(2..=3).contains(&parts.len()) {
                bail!("data spec '{spec}': expected {form}");
            }
            let shape = parse_shape(spec, parts[0])?;
            let classes = parse_count(spec, "CLASSES", parts[1], 2)?;
            let n = match parts.get(2) {
                Some(t) => parse_count(spec, "N", t, 2)?,
                None => DEFAULT_SYNTHETIC_N,
            };
            let fits = shape
                .iter()
                .try_fold(n, |a, &d| a.checked_mul(d))
                .is_some_and(|t| t <= MAX_SYNTHETIC_ELEMENTS);
            if !fits {
                bail!(
                    "data spec '{spec}': {n} samples of shape {shape:?} exceed the synthetic \
                     limit of {MAX_SYNTHETIC_ELEMENTS} values; use a smaller N or shape"
                );
            }
            Ok(Spec::Synthetic { shape, classes, n })
        }
        "synthetic-text" => {
            let parts: Vec<&str> = rest.unwrap_or("").split(':').collect();
            if !(2..=3).contains(&parts.len()) {
                bail!(
                    "data spec '{spec}': expected synthetic-text:VOCAB:SEQ[:N] (e.g. synthetic-text:64:128)"
                );
            }
            let vocab = parse_count(spec, "VOCAB", parts[0], 2)?;
            if vocab > u32::MAX as usize {
                bail!("data spec '{spec}': VOCAB {vocab} does not fit u32 token ids");
            }
            let seq_len = parse_count(spec, "SEQ", parts[1], 1)?;
            let n = match parts.get(2) {
                Some(t) => parse_count(spec, "N", t, 2)?,
                None => DEFAULT_SYNTHETIC_N,
            };
            if n.checked_mul(seq_len)
                .is_none_or(|t| t > MAX_SYNTHETIC_ELEMENTS)
            {
                bail!("data spec '{spec}': {n} sequences of {seq_len} tokens are too many");
            }
            Ok(Spec::SyntheticText { vocab, seq_len, n })
        }
        other => bail!("data spec '{spec}': unknown kind '{other}'; {SPEC_HELP}"),
    }
}

/// Parses `3x32x32` / `784` into dimensions, each a positive integer.
pub fn parse_shape(spec: &str, text: &str) -> Result<Vec<usize>> {
    let dims: Option<Vec<usize>> = text
        .split(['x', 'X'])
        .map(|d| d.trim().parse::<usize>().ok().filter(|&v| v > 0))
        .collect();
    match dims {
        Some(d) if !d.is_empty() => Ok(d),
        _ => bail!(
            "data spec '{spec}': bad shape '{text}': expected positive dimensions joined by 'x', \
             like 3x32x32 or 784"
        ),
    }
}

fn parse_count(spec: &str, field: &str, text: &str, min: usize) -> Result<usize> {
    match text.trim().parse::<usize>() {
        Ok(v) if v >= min => Ok(v),
        _ => bail!("data spec '{spec}': bad {field} '{text}': expected an integer >= {min}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(parse("digits").unwrap(), Spec::Digits);
        assert_eq!(parse(" digits ").unwrap(), Spec::Digits);
        assert_eq!(parse("mnist:/d").unwrap(), Spec::Mnist("/d".into()));
        assert_eq!(
            parse("fashion-mnist:a:b").unwrap(),
            Spec::FashionMnist("a:b".into())
        );
        assert_eq!(parse("cifar10:x").unwrap(), Spec::Cifar10("x".into()));
        assert_eq!(parse("text:f.txt").unwrap(), Spec::Text("f.txt".into()));
        assert_eq!(parse("graph:g").unwrap(), Spec::Graph("g".into()));
        assert_eq!(parse("graph:synthetic").unwrap(), Spec::GraphSynthetic);
        assert_eq!(
            parse("synthetic:3x32x32:10:100").unwrap(),
            Spec::Synthetic {
                shape: vec![3, 32, 32],
                classes: 10,
                n: 100
            }
        );
        assert_eq!(
            parse("synthetic:784:10").unwrap(),
            Spec::Synthetic {
                shape: vec![784],
                classes: 10,
                n: DEFAULT_SYNTHETIC_N
            }
        );
        assert_eq!(
            parse("synthetic-text:65:32:10").unwrap(),
            Spec::SyntheticText {
                vocab: 65,
                seq_len: 32,
                n: 10
            }
        );
    }

    #[test]
    fn errors_name_the_spec() {
        for bad in [
            "",
            "mnist",
            "mnist:",
            "digits:x",
            "nope:1",
            "synthetic:3x0:10",
            "synthetic:3xx3:10",
            "synthetic:abc:10",
            "synthetic:3x3",
            "synthetic:3x3:1",
            "synthetic:3x3:10:1:5",
            "synthetic:100000x100000:10:1000",
            "synthetic-text:1:5",
            "synthetic-text:10:0",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad.trim()), "{bad:?} -> {e}");
        }
    }
}
