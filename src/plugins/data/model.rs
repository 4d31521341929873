//! A naive evaluator that materializes every scope into a vector and
//! simulates nbdkit's sparse allocator page by page, and a property test
//! that the lazy evaluator agrees with it.

use super::ast::{Expr, Move};
use super::eval::PAGE;
use proptest::prelude::*;
use std::rc::Rc;

#[derive(Clone, Default)]
struct Env(Vec<(String, Rc<Expr>, Env)>);

/// Bytes of a scope; at the top level also the allocated pages.
struct Naive {
    bytes: Vec<u8>,
    offset: usize,
    hwm: usize,
    alloc: Option<Vec<bool>>,
}

const LIMIT: usize = 1 << 22;

impl Naive {
    fn reserve(&mut self, end: usize) -> Result<(), ()> {
        if end > LIMIT {
            return Err(());
        }
        if self.bytes.len() < end {
            self.bytes.resize(end, 0);
        }
        if let Some(a) = &mut self.alloc {
            if a.len() < end.div_ceil(PAGE as usize) {
                a.resize(end.div_ceil(PAGE as usize), false);
            }
        }
        Ok(())
    }
    fn put(&mut self, b: &[u8], allocating: bool) -> Result<(), ()> {
        let end = self.offset + b.len();
        self.reserve(end)?;
        self.bytes[self.offset..end].copy_from_slice(b);
        if let (Some(a), false) = (&mut self.alloc, b.is_empty()) {
            let (p0, p1) = (self.offset / PAGE as usize, (end - 1) / PAGE as usize);
            for (p, page) in a.iter_mut().enumerate().take(p1 + 1).skip(p0) {
                *page = allocating || {
                    let s = p * PAGE as usize;
                    self.bytes[s..(s + PAGE as usize).min(self.bytes.len())].iter().any(|&c| c != 0)
                };
            }
        }
        self.offset = end;
        self.hwm = self.hwm.max(end);
        Ok(())
    }
}

fn scope(e: &Expr, env: Env) -> Result<Vec<u8>, ()> {
    let mut n = Naive { bytes: Vec::new(), offset: 0, hwm: 0, alloc: None };
    let mut env = env;
    match e {
        Expr::List(v) => v.iter().try_for_each(|x| eval(x, &mut env, &mut n))?,
        e => eval(e, &mut env, &mut n)?,
    }
    n.bytes.resize(n.hwm, 0);
    Ok(n.bytes)
}

fn eval(e: &Expr, env: &mut Env, n: &mut Naive) -> Result<(), ()> {
    match e {
        Expr::List(_) => n.put(&scope(e, env.clone())?, false),
        Expr::Byte(b) => n.put(&[*b], true),
        Expr::Str(s) => n.put(s, true),
        Expr::Fill(b, c) => {
            let c = usize::try_from(*c).map_err(|_| ())?;
            if n.offset + c > LIMIT {
                return Err(());
            }
            n.put(&vec![*b; c], *b != 0)
        }
        Expr::Offset(how, x) => {
            let x = usize::try_from(*x).map_err(|_| ())?;
            n.offset = match how {
                Move::Abs => x,
                Move::Fwd => n.offset + x,
                Move::Back => n.offset.checked_sub(x).ok_or(())?,
                Move::Align => n.offset.div_ceil(x) * x,
            };
            if n.offset > LIMIT {
                return Err(());
            }
            n.hwm = n.hwm.max(n.offset);
            Ok(())
        }
        Expr::Name(name) => {
            let (x, captured) = env.0.iter().rev().find(|(k, _, _)| k == name).map(|(_, x, c)| (x.clone(), c.clone())).ok_or(())?;
            n.put(&scope(&x, captured)?, false)
        }
        Expr::Assign(name, x) => {
            let captured = env.clone();
            env.0.push((name.clone(), Rc::new((**x).clone()), captured));
            Ok(())
        }
        Expr::Repeat(x, c) => {
            if *c == 0 {
                return Ok(());
            }
            let unit = scope(x, env.clone())?;
            if unit.len() * (*c as usize) > LIMIT {
                return Err(());
            }
            n.put(&unit.repeat(*c as usize), false)
        }
        Expr::Slice(x, a, b) => {
            let v = scope(x, env.clone())?;
            let b = b.map_or(v.len(), |b| b as usize);
            let a = *a as usize;
            if a > b || b > v.len() {
                return Err(());
            }
            // Slices of strings are optimized into writes: keep that.
            let write = matches!(**x, Expr::Str(_) | Expr::Byte(_));
            n.put(&v[a..b], write)
        }
        Expr::File(_) | Expr::Script(_) => Err(()),
    }
}

/// The top level: bytes and per-page allocation.
fn top(e: &Expr) -> Result<(Vec<u8>, Vec<bool>), ()> {
    let mut n = Naive { bytes: Vec::new(), offset: 0, hwm: 0, alloc: Some(Vec::new()) };
    let mut env = Env::default();
    match e {
        Expr::List(v) => v.iter().try_for_each(|x| eval(x, &mut env, &mut n))?,
        e => eval(e, &mut env, &mut n)?,
    }
    n.bytes.resize(n.hwm, 0);
    let mut alloc = n.alloc.unwrap_or_default();
    alloc.resize(n.hwm.div_ceil(PAGE as usize), false);
    Ok((n.bytes, alloc))
}

fn expr() -> impl Strategy<Value = Expr> {
    let name = prop_oneof![Just("a".to_string()), Just("b".to_string())];
    let leaf = prop_oneof![
        prop_oneof![Just(0u8), Just(1u8), any::<u8>()].prop_map(Expr::Byte),
        prop::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..6).prop_map(Expr::Str),
        (prop_oneof![Just(0u8), Just(7u8)], 0u64..70_000).prop_map(|(b, n)| Expr::Fill(b, n)),
        (0u64..70_000).prop_map(|n| Expr::Offset(Move::Abs, n)),
        (0u64..40_000).prop_map(|n| Expr::Offset(Move::Fwd, n)),
        (0u64..8).prop_map(|n| Expr::Offset(Move::Back, n)),
        (0u32..17).prop_map(|s| Expr::Offset(Move::Align, 1 << s)),
        name.clone().prop_map(Expr::Name),
    ];
    leaf.prop_recursive(4, 24, 5, move |inner| {
        // The parser puts `*`, `[…]` and `->` after an offset in a group.
        let operand = inner.clone().prop_map(|e| match e {
            Expr::Offset(..) => Expr::List(vec![e]),
            e => e,
        });
        let list = prop::collection::vec(inner, 0..5).prop_map(Expr::List);
        let inner = operand;
        prop_oneof![
            list,
            (inner.clone(), 0u64..4).prop_map(|(e, n)| Expr::Repeat(Box::new(e), n)),
            (inner.clone(), 0u64..6, prop::option::of(0u64..40_000))
                .prop_map(|(e, a, b)| Expr::Slice(Box::new(e), a, b)),
            (name.clone(), inner).prop_map(|(n, e)| Expr::Assign(n, Box::new(e))),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The lazy image reads as the naive one, before and after the
    /// optimizer, and the allocated pages are the simulated ones.
    #[test]
    fn lazy_evaluation_matches_the_naive_one(v in prop::collection::vec(expr(), 1..6)) {
        let tree = Expr::List(v);
        let naive = top(&tree);
        let optimized = super::optimize::optimize(tree.clone());
        let lazy = super::eval::evaluate(&tree);
        match (&naive, &lazy) {
            (Ok((bytes, _)), Ok(ev)) => {
                prop_assert_eq!(ev.image.len(), bytes.len() as u64);
                let mut got = vec![0xee; bytes.len()];
                ev.image.read(&mut got, 0);
                prop_assert!(&got == bytes, "bytes differ");
                // Random windows read alike too.
                for w in [(0usize, 7usize), (bytes.len() / 3, 5000), (bytes.len().saturating_sub(40_000), 40_000)] {
                    let (o, l) = (w.0.min(bytes.len()), w.1.min(bytes.len() - w.0.min(bytes.len())));
                    let mut part = vec![0xee; l];
                    ev.image.read(&mut part, o as u64);
                    prop_assert!(part == bytes[o..o + l], "window {:?}", w);
                    prop_assert_eq!(ev.image.any_nonzero(o as u64, l as u64), bytes[o..o + l].iter().any(|&c| c != 0));
                }
            }
            (Err(()), _) => {} // too big for the model, or an error
            (Ok(_), Err(e)) => prop_assert!(false, "lazy failed: {}", e),
        }
        if let (Ok(opt), Ok((bytes, _))) = (optimized, &naive) {
            let (Ok((_, alloc)), Ok(ev)) = (top(&opt), super::eval::evaluate(&opt)) else {
                return Err(TestCaseError::fail("the optimized tree failed"));
            };
            let mut got = vec![0xee; bytes.len()];
            ev.image.read(&mut got, 0);
            prop_assert!(&got == bytes, "optimized bytes differ");
            for (p, &a) in alloc.iter().enumerate() {
                let s = p * PAGE as usize;
                let zero = bytes[s..(s + PAGE as usize).min(bytes.len())].iter().all(|&c| c == 0);
                if zero {
                    prop_assert_eq!(ev.allocated.contains(p as u64), a, "page {}", p);
                }
            }
        }
    }
}
