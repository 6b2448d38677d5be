//! The pure half: rates in, HTB tree and minimal change list out. No I/O.
//!
//! Layout shaped on every interface (one interface carries one chute direction):
//!
//! ```text
//! qdisc htb 1: root default 1      (unclassified traffic goes to 1:1)
//!   class htb 1:1 rate R ceil R burst B cburst B
//!     [qdisc tbf 10: parent 1:1 rate R]   (optional leaf)
//! ```

/// `1:` — the root HTB qdisc this crate owns on a shaped interface.
pub const ROOT_HANDLE: u32 = 0x0001_0000;
/// `1:1` — the single class all of the interface's traffic is sent to.
pub const CLASS_HANDLE: u32 = 0x0001_0001;
/// `10:` — the optional TBF leaf under `1:1`.
pub const LEAF_HANDLE: u32 = 0x0010_0000;

/// Lowest rate accepted: below 8 kbit/s one full-size frame takes longer than 1.5 s.
pub const MIN_RATE_BPS: u64 = 8_000;
/// A maximum-size Ethernet frame as HTB counts it (no FCS, no preamble).
const MAX_FRAME: u64 = 1514;
/// Burst time: tokens for 10 ms at the configured rate. HTB refills at timer granularity,
/// so the bucket must cover at least one jiffy (4 ms at HZ=250, 1 ms at HZ=1000) or the
/// class cannot reach its rate; 10 ms covers HZ=100 too, while keeping bursts short.
const BURST_MS: u64 = 10;
/// TBF leaf queue limit, as time at the configured rate ...
/// (the kernel's default leaf, pfifo with 1000 packets, would hold 6 s at 2 mbit) ...
const TBF_LATENCY_MS: u64 = 200;
/// ... but never below four GSO super-packets: TBF splits a GSO packet larger than its
/// burst into segments on enqueue, and a small limit drops most of a super-packet at once
/// (measured: bursts of losses that stall TCP into retransmission timeouts).
const TBF_MIN_LIMIT: u64 = 4 * 65_536;

/// Kernel packet-scheduler clock, as read from `/proc/net/psched`; converts times to the
/// "ticks" that `tc_htb_opt.buffer` and `tc_tbf_qopt.buffer` are expressed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Psched {
    pub t2us: u32,
    pub us2t: u32,
    pub clock_res: u32,
}

impl Psched {
    /// What every kernel since 2.6.31 reports (`000003e8 00000040 000f4240 3b9aca00`):
    /// a tick is 64 ns.
    pub const MODERN: Psched = Psched {
        t2us: 1000,
        us2t: 64,
        clock_res: 1_000_000,
    };

    /// Parses the contents of `/proc/net/psched` (four hex words).
    pub fn parse(text: &str) -> Option<Psched> {
        let mut words = text.split_whitespace().map(|w| u32::from_str_radix(w, 16));
        let t2us = words.next()?.ok()?;
        let us2t = words.next()?.ok()?;
        let clock_res = words.next()?.ok()?;
        if t2us == 0 || us2t == 0 || clock_res == 0 {
            return None;
        }
        Some(Psched {
            t2us,
            us2t,
            clock_res,
        })
    }

    /// Ticks needed to send `bytes` at `rate_bytes` per second (iproute2's
    /// `tc_calc_xmittime`, in integers), saturating at `u32::MAX`.
    pub fn xmit_ticks(&self, rate_bytes: u64, bytes: u64) -> u32 {
        // Same compatibility rule as iproute2: a 1 GHz clock_res means t2us is really us2t.
        let t2us = if self.clock_res == 1_000_000_000 {
            self.us2t
        } else {
            self.t2us
        };
        let num = u128::from(bytes) * 1_000_000 * u128::from(t2us) * u128::from(self.clock_res);
        let den = u128::from(rate_bytes.max(1)) * u128::from(self.us2t) * 1_000_000;
        u32::try_from(num / den).unwrap_or(u32::MAX)
    }
}

/// Parameters of an HTB class, as the kernel stores and reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HtbClass {
    /// Bytes per second.
    pub rate: u64,
    /// Bytes per second.
    pub ceil: u64,
    /// Psched ticks.
    pub buffer: u32,
    /// Psched ticks.
    pub cbuffer: u32,
    /// Bytes served per DRR round.
    pub quantum: u32,
}

/// Parameters of a TBF qdisc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tbf {
    /// Bytes per second.
    pub rate: u64,
    /// Psched ticks.
    pub buffer: u32,
    /// Queue limit in bytes.
    pub limit: u32,
}

/// The root qdisc of an interface, as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Root {
    /// Kernel default (`noqueue`, `pfifo_fast`, ...; handle 0) — nothing configured.
    Default,
    /// An HTB root: handle and `default` class minor.
    Htb { handle: u32, default_minor: u32 },
    /// Anything else somebody installed.
    Foreign { handle: u32, kind: String },
}

/// A qdisc attached below the root (to a class).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub handle: u32,
    pub parent: u32,
    /// `None` when the qdisc is not a TBF.
    pub tbf: Option<Tbf>,
    pub kind: String,
}

/// What exists on one interface, as read back from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    pub root: Root,
    /// `(classid, parent, params)`; params are `None` for a non-HTB or unreadable class.
    pub classes: Vec<(u32, u32, Option<HtbClass>)>,
    pub leaves: Vec<Leaf>,
}

impl Tree {
    /// A fresh interface.
    pub fn empty() -> Tree {
        Tree {
            root: Root::Default,
            classes: Vec::new(),
            leaves: Vec::new(),
        }
    }

    /// The tree that results from `wanted` (what a perfect apply leaves behind).
    pub fn from_wanted(wanted: Option<&Wanted>) -> Tree {
        match wanted {
            None => Tree::empty(),
            Some(w) => Tree {
                root: Root::Htb {
                    handle: ROOT_HANDLE,
                    default_minor: CLASS_HANDLE & 0xffff,
                },
                classes: vec![(CLASS_HANDLE, ROOT_HANDLE, Some(w.class))],
                leaves: w
                    .leaf
                    .map(|t| Leaf {
                        handle: LEAF_HANDLE,
                        parent: CLASS_HANDLE,
                        tbf: Some(t),
                        kind: "tbf".into(),
                    })
                    .into_iter()
                    .collect(),
            },
        }
    }

    /// The configured class, if this tree is ours.
    pub fn our_class(&self) -> Option<HtbClass> {
        if !self.root_is_ours() {
            return None;
        }
        self.classes
            .iter()
            .find(|(id, _, _)| *id == CLASS_HANDLE)
            .and_then(|c| c.2)
    }

    fn root_is_ours(&self) -> bool {
        self.root
            == Root::Htb {
                handle: ROOT_HANDLE,
                default_minor: CLASS_HANDLE & 0xffff,
            }
    }
}

/// The wanted shaping of one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub class: HtbClass,
    pub leaf: Option<Tbf>,
}

/// Why a rate cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("rate {bps} bit/s is below the minimum of {min} bit/s")]
    RateTooLow { bps: u64, min: u64 },
    #[error("rate {bps} bit/s exceeds the link capacity of {link_bps} bit/s")]
    RateAboveLink { bps: u64, link_bps: u64 },
}

/// Computes the wanted tree for one direction.
///
/// `rate_bps` is in bits per second of L2 traffic (HTB counts Ethernet header + IP packet);
/// `link_bps` is the interface capacity when known (veths have none worth trusting).
pub fn wanted(
    rate_bps: u64,
    link_bps: Option<u64>,
    tbf_leaf: bool,
    psched: &Psched,
) -> Result<Wanted, PlanError> {
    if rate_bps < MIN_RATE_BPS {
        return Err(PlanError::RateTooLow {
            bps: rate_bps,
            min: MIN_RATE_BPS,
        });
    }
    if let Some(link_bps) = link_bps {
        if rate_bps > link_bps {
            return Err(PlanError::RateAboveLink {
                bps: rate_bps,
                link_bps,
            });
        }
    }
    let rate = rate_bps / 8;
    let burst = rate * BURST_MS / 1000 + MAX_FRAME;
    let buffer = psched.xmit_ticks(rate, burst);
    // r2q=10 as tc would, but kept inside the range the kernel accepts without warning.
    let quantum =
        u32::try_from((rate / 10).clamp(MAX_FRAME + 86, 200_000)).expect("clamped to 200000");
    let leaf = tbf_leaf.then(|| Tbf {
        rate,
        buffer,
        limit: u32::try_from((rate * TBF_LATENCY_MS / 1000).max(TBF_MIN_LIMIT) + burst)
            .unwrap_or(u32::MAX),
    });
    Ok(Wanted {
        class: HtbClass {
            rate,
            ceil: rate,
            buffer,
            cbuffer: buffer,
            quantum,
        },
        leaf,
    })
}

/// One netlink change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `tc qdisc replace dev X root handle 1: htb default 1` — replaces whatever root exists.
    ReplaceRoot,
    /// `tc qdisc del dev X root` (takes classes and leaves with it).
    DeleteRoot,
    CreateClass(HtbClass),
    ChangeClass(HtbClass),
    /// `tc qdisc replace dev X parent 1:1 handle 10: tbf ...`
    ReplaceLeaf(Tbf),
    ChangeLeaf(Tbf),
    /// Deletes the leaf qdisc `handle` under 1:1 (the class falls back to its default FIFO).
    DeleteLeaf {
        handle: u32,
    },
}

/// The minimal list of operations turning `have` into `want` (`None`: unshaped).
///
/// A foreign root qdisc is left alone when nothing is wanted (not ours to remove) and
/// replaced when shaping is wanted; anything unexpected under our root forces a rebuild,
/// since a partial repair of a tree we do not understand is not worth the risk.
pub fn diff(have: &Tree, want: Option<&Wanted>) -> Vec<Op> {
    let Some(want) = want else {
        return match have.root {
            Root::Htb {
                handle: ROOT_HANDLE,
                ..
            } => vec![Op::DeleteRoot],
            _ => Vec::new(),
        };
    };
    let rebuild = || {
        let mut ops = vec![Op::ReplaceRoot, Op::CreateClass(want.class)];
        ops.extend(want.leaf.map(Op::ReplaceLeaf));
        ops
    };
    let foreign_class = have
        .classes
        .iter()
        .any(|(id, parent, _)| *id != CLASS_HANDLE || *parent != ROOT_HANDLE);
    let foreign_leaf = have.leaves.iter().any(|l| l.parent != CLASS_HANDLE);
    if !have.root_is_ours() || foreign_class || foreign_leaf {
        return rebuild();
    }
    let mut ops = Vec::new();
    match have.classes.first() {
        None => ops.push(Op::CreateClass(want.class)),
        Some((_, _, Some(c))) if *c == want.class => {}
        Some(_) => ops.push(Op::ChangeClass(want.class)),
    }
    let leaf = have.leaves.first();
    match (leaf, want.leaf) {
        (None, None) => {}
        (None, Some(t)) => ops.push(Op::ReplaceLeaf(t)),
        (Some(l), None) => {
            // The kernel's own default FIFO is not listed; anything listed was added.
            ops.push(Op::DeleteLeaf { handle: l.handle });
        }
        (Some(l), Some(t)) => match l.tbf {
            Some(cur) if l.handle == LEAF_HANDLE && cur == t => {}
            // TBF never sends a packet larger than its bucket, and a GSO packet admitted
            // whole under the old, larger bucket would then block the queue for good:
            // shrink the bucket by swapping in a fresh TBF (its queue is dropped) instead.
            Some(cur) if l.handle == LEAF_HANDLE && burst_bytes(&t) >= burst_bytes(&cur) => {
                ops.push(Op::ChangeLeaf(t))
            }
            // The kernel treats a "replace" naming an existing handle as a change of that
            // qdisc (and refuses one of another kind): delete ours first to get a new one.
            _ if l.handle == LEAF_HANDLE => {
                ops.push(Op::DeleteLeaf {
                    handle: LEAF_HANDLE,
                });
                ops.push(Op::ReplaceLeaf(t));
            }
            _ => ops.push(Op::ReplaceLeaf(t)),
        },
    }
    ops
}

/// Bucket size of a TBF in units proportional to bytes (rate × buffer time).
fn burst_bytes(t: &Tbf) -> u128 {
    u128::from(t.rate) * u128::from(t.buffer)
}

/// What `ops` do to `have`, as the kernel would do it: lets callers (and tests) check that
/// a plan converges without a kernel.
pub fn simulate(have: &Tree, ops: &[Op]) -> Tree {
    let mut t = have.clone();
    for op in ops {
        match op {
            Op::ReplaceRoot => {
                t = Tree {
                    root: Root::Htb {
                        handle: ROOT_HANDLE,
                        default_minor: CLASS_HANDLE & 0xffff,
                    },
                    classes: Vec::new(),
                    leaves: Vec::new(),
                }
            }
            Op::DeleteRoot => t = Tree::empty(),
            Op::CreateClass(c) | Op::ChangeClass(c) => {
                t.classes.retain(|(id, _, _)| *id != CLASS_HANDLE);
                t.classes.push((CLASS_HANDLE, ROOT_HANDLE, Some(*c)));
            }
            Op::ReplaceLeaf(tbf) | Op::ChangeLeaf(tbf) => {
                t.leaves.retain(|l| l.parent != CLASS_HANDLE);
                t.leaves.push(Leaf {
                    handle: LEAF_HANDLE,
                    parent: CLASS_HANDLE,
                    tbf: Some(*tbf),
                    kind: "tbf".into(),
                });
            }
            Op::DeleteLeaf { handle } => t.leaves.retain(|l| l.handle != *handle),
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(bps: u64, leaf: bool) -> Wanted {
        wanted(bps, None, leaf, &Psched::MODERN).unwrap()
    }

    #[test]
    fn psched_parses_proc_format_and_converts_like_tc() {
        let p = Psched::parse("000003e8 00000040 000f4240 3b9aca00\n").unwrap();
        assert_eq!(p, Psched::MODERN);
        // 1 ms at 1 MB/s: 1000 bytes; 1 µs = 15.625 ticks of 64 ns.
        assert_eq!(p.xmit_ticks(1_000_000, 1000), 15_625);
        assert_eq!(Psched::parse("garbage"), None);
    }

    #[test]
    fn class_covers_a_jiffy_at_hz_250_and_a_full_frame() {
        for bps in [
            MIN_RATE_BPS,
            2_000_000,
            8_000_000,
            32_000_000,
            10_000_000_000,
        ] {
            let c = w(bps, false).class;
            assert_eq!(c.rate, bps / 8);
            assert_eq!(c.rate, c.ceil);
            let burst_ns = u64::from(c.buffer) * 64;
            assert!(
                burst_ns >= 4_000_000,
                "{bps}: burst {burst_ns} ns < one HZ=250 jiffy"
            );
            let frame_ns = MAX_FRAME * 1_000_000_000 / c.rate;
            assert!(burst_ns >= frame_ns, "{bps}: burst shorter than one frame");
            assert!((1600..=200_000).contains(&c.quantum));
        }
    }

    #[test]
    fn rejects_rates_below_minimum_or_above_link() {
        assert_eq!(
            wanted(100, None, false, &Psched::MODERN),
            Err(PlanError::RateTooLow {
                bps: 100,
                min: MIN_RATE_BPS
            })
        );
        assert_eq!(
            wanted(2_000_000, Some(1_000_000), false, &Psched::MODERN),
            Err(PlanError::RateAboveLink {
                bps: 2_000_000,
                link_bps: 1_000_000
            })
        );
        assert!(wanted(1_000_000, Some(1_000_000), false, &Psched::MODERN).is_ok());
    }

    #[test]
    fn fresh_interface_gets_root_class_and_optional_leaf() {
        let want = w(8_000_000, false);
        assert_eq!(
            diff(&Tree::empty(), Some(&want)),
            vec![Op::ReplaceRoot, Op::CreateClass(want.class)]
        );
        let want = w(8_000_000, true);
        assert_eq!(
            diff(&Tree::empty(), Some(&want)),
            vec![
                Op::ReplaceRoot,
                Op::CreateClass(want.class),
                Op::ReplaceLeaf(want.leaf.unwrap())
            ]
        );
    }

    #[test]
    fn applying_a_plan_twice_changes_nothing() {
        let starts = [
            Tree::empty(),
            Tree::from_wanted(Some(&w(2_000_000, true))),
            Tree {
                root: Root::Foreign {
                    handle: 0x8001_0000,
                    kind: "tbf".into(),
                },
                ..Tree::empty()
            },
        ];
        for start in &starts {
            for want in [None, Some(w(8_000_000, false)), Some(w(32_000_000, true))] {
                let ops = diff(start, want.as_ref());
                let after = simulate(start, &ops);
                assert_eq!(
                    diff(&after, want.as_ref()),
                    vec![],
                    "from {start:?} to {want:?}"
                );
            }
        }
    }

    #[test]
    fn live_rate_change_only_changes_the_class() {
        let have = Tree::from_wanted(Some(&w(2_000_000, false)));
        let want = w(8_000_000, false);
        assert_eq!(diff(&have, Some(&want)), vec![Op::ChangeClass(want.class)]);
        let have = Tree::from_wanted(Some(&w(2_000_000, true)));
        let want = w(8_000_000, true);
        assert_eq!(
            diff(&have, Some(&want)),
            vec![
                Op::ChangeClass(want.class),
                Op::ChangeLeaf(want.leaf.unwrap())
            ]
        );
        // Lowering the rate shrinks TBF's bucket: the leaf is recreated, not changed.
        let have = Tree::from_wanted(Some(&w(8_000_000, true)));
        let want = w(2_000_000, true);
        assert_eq!(
            diff(&have, Some(&want)),
            vec![
                Op::ChangeClass(want.class),
                Op::DeleteLeaf {
                    handle: LEAF_HANDLE
                },
                Op::ReplaceLeaf(want.leaf.unwrap())
            ]
        );
    }

    #[test]
    fn matching_tree_is_adopted() {
        let want = w(8_000_000, true);
        assert_eq!(diff(&Tree::from_wanted(Some(&want)), Some(&want)), vec![]);
    }

    #[test]
    fn removing_shaping_deletes_only_our_root() {
        let have = Tree::from_wanted(Some(&w(2_000_000, false)));
        assert_eq!(diff(&have, None), vec![Op::DeleteRoot]);
        assert_eq!(diff(&Tree::empty(), None), vec![]);
        let foreign = Tree {
            root: Root::Foreign {
                handle: 0x8001_0000,
                kind: "tbf".into(),
            },
            ..Tree::empty()
        };
        assert_eq!(diff(&foreign, None), vec![]);
    }

    #[test]
    fn dropping_the_leaf_deletes_only_the_leaf() {
        let have = Tree::from_wanted(Some(&w(2_000_000, true)));
        assert_eq!(
            diff(&have, Some(&w(2_000_000, false))),
            vec![Op::DeleteLeaf {
                handle: LEAF_HANDLE
            }]
        );
    }

    #[test]
    fn unexpected_classes_or_foreign_roots_force_a_rebuild() {
        let want = w(8_000_000, false);
        let mut have = Tree::from_wanted(Some(&want));
        have.classes.push((0x0001_0002, ROOT_HANDLE, None));
        assert_eq!(diff(&have, Some(&want))[0], Op::ReplaceRoot);
        let have = Tree {
            root: Root::Htb {
                handle: ROOT_HANDLE,
                default_minor: 0x30,
            },
            ..Tree::empty()
        };
        assert_eq!(diff(&have, Some(&want))[0], Op::ReplaceRoot);
    }
}
