//! Admission control: every chute reserves its caps up front from fixed device pools.
//!
//! A chute is admitted only if all of its caps fit in what is free, so caps are real
//! guarantees, not hopes. Operations are all-or-nothing: a refused admit or resize leaves
//! the ledger exactly as it was. A resize validates growth against what is free plus the
//! chute's own current reservation and never releases first (a restart or update is
//! atomic with respect to the allocation).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::manifest::{format_bytes, format_cpu, format_rate, ChuteName};

/// One kind of reservable resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// CPU, millicores.
    Cpu,
    /// Memory, bytes.
    Memory,
    /// Process ids.
    Pids,
    /// Bandwidth toward chutes, bits per second.
    BandwidthDown,
    /// Bandwidth from chutes, bits per second.
    BandwidthUp,
}

impl Resource {
    /// Every resource, in display order.
    pub const ALL: [Resource; 5] = [
        Resource::Cpu,
        Resource::Memory,
        Resource::Pids,
        Resource::BandwidthDown,
        Resource::BandwidthUp,
    ];

    /// Formats an amount of this resource with its unit (`"64 MiB"`, `"0.5 cores"`).
    pub fn format_amount(self, n: u64) -> String {
        match self {
            Resource::Cpu => format_cpu(n),
            Resource::Memory => format_bytes(n),
            Resource::Pids => format!("{n} pids"),
            Resource::BandwidthDown | Resource::BandwidthUp => format_rate(n),
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::Pids => "pids",
            Resource::BandwidthDown => "bandwidth_down",
            Resource::BandwidthUp => "bandwidth_up",
        })
    }
}

/// An amount of every resource: a reservation, a pool's capacity, what is used or free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Amounts {
    /// Thousandths of a core.
    pub cpu_millicores: u64,
    /// Bytes.
    pub memory_bytes: u64,
    /// Process ids.
    pub pids: u64,
    /// Bits per second toward the chute(s).
    pub bandwidth_down_bps: u64,
    /// Bits per second from the chute(s).
    pub bandwidth_up_bps: u64,
}

/// What one chute reserves.
pub type Reservation = Amounts;
/// What a device has to give.
pub type Pools = Amounts;

impl Amounts {
    /// Nothing of anything.
    pub const ZERO: Amounts = Amounts {
        cpu_millicores: 0,
        memory_bytes: 0,
        pids: 0,
        bandwidth_down_bps: 0,
        bandwidth_up_bps: 0,
    };

    /// The amount of one resource.
    pub fn get(&self, r: Resource) -> u64 {
        match r {
            Resource::Cpu => self.cpu_millicores,
            Resource::Memory => self.memory_bytes,
            Resource::Pids => self.pids,
            Resource::BandwidthDown => self.bandwidth_down_bps,
            Resource::BandwidthUp => self.bandwidth_up_bps,
        }
    }

    /// Sets the amount of one resource.
    pub fn set(&mut self, r: Resource, v: u64) {
        *match r {
            Resource::Cpu => &mut self.cpu_millicores,
            Resource::Memory => &mut self.memory_bytes,
            Resource::Pids => &mut self.pids,
            Resource::BandwidthDown => &mut self.bandwidth_down_bps,
            Resource::BandwidthUp => &mut self.bandwidth_up_bps,
        } = v;
    }

    fn zip(&self, other: &Amounts, f: impl Fn(u64, u64) -> u64) -> Amounts {
        let mut out = Amounts::ZERO;
        for r in Resource::ALL {
            out.set(r, f(self.get(r), other.get(r)));
        }
        out
    }

    /// Per-resource sum, saturating at `u64::MAX`.
    pub fn saturating_add(&self, other: &Amounts) -> Amounts {
        self.zip(other, u64::saturating_add)
    }

    /// Per-resource difference, saturating at 0.
    pub fn saturating_sub(&self, other: &Amounts) -> Amounts {
        self.zip(other, u64::saturating_sub)
    }

    /// True if every resource of `self` is at most the same resource of `other`.
    pub fn fits_within(&self, other: &Amounts) -> bool {
        Resource::ALL.iter().all(|&r| self.get(r) <= other.get(r))
    }
}

impl fmt::Display for Amounts {
    /// `cpu 0.5 cores, memory 64 MiB, pids 64 pids, bandwidth_down 8 mbit, bandwidth_up 0 bit`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in Resource::ALL.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r} {}", r.format_amount(self.get(*r)))?;
        }
        Ok(())
    }
}

/// One resource that does not fit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortfall {
    /// Which resource.
    pub resource: Resource,
    /// How much the chute asked for in total.
    pub asked: u64,
    /// How much it could have had (for a resize: what is free plus its own current share).
    pub free: u64,
}

impl fmt::Display for Shortfall {
    /// `memory: asked 128 MiB, free 64 MiB`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: asked {}, free {}",
            self.resource,
            self.resource.format_amount(self.asked),
            self.resource.format_amount(self.free)
        )
    }
}

fn join_shortfalls(s: &[Shortfall]) -> String {
    s.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why the ledger refused an operation. A refused operation changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum AdmissionError {
    /// At least one resource does not fit; every one that does not is listed.
    #[error("chute `{chute}` does not fit: {}", join_shortfalls(shortfalls))]
    Insufficient {
        /// The chute refused.
        chute: ChuteName,
        /// Every resource that does not fit, in [`Resource::ALL`] order.
        shortfalls: Vec<Shortfall>,
    },
    /// `admit` for a chute that already holds a reservation (use `resize`).
    #[error("chute `{chute}` already holds a reservation; resize it instead")]
    AlreadyReserved {
        /// The chute.
        chute: ChuteName,
    },
    /// `resize` for a chute that holds no reservation (use `admit`).
    #[error("chute `{chute}` holds no reservation; admit it first")]
    NotReserved {
        /// The chute.
        chute: ChuteName,
    },
}

/// The device's pools and every chute's reservation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    capacity: Pools,
    reservations: BTreeMap<ChuteName, Reservation>,
}

impl Ledger {
    /// An empty ledger over `capacity`.
    pub fn new(capacity: Pools) -> Self {
        Ledger {
            capacity,
            reservations: BTreeMap::new(),
        }
    }

    /// The pools.
    pub fn capacity(&self) -> Pools {
        self.capacity
    }

    /// Sum of all reservations (saturating; it can exceed capacity only via `force_insert`).
    pub fn used(&self) -> Amounts {
        self.reservations
            .values()
            .fold(Amounts::ZERO, |acc, r| acc.saturating_add(r))
    }

    /// Capacity minus used, per resource, never below 0.
    pub fn free(&self) -> Amounts {
        self.capacity.saturating_sub(&self.used())
    }

    /// A chute's reservation.
    pub fn get(&self, chute: &ChuteName) -> Option<&Reservation> {
        self.reservations.get(chute)
    }

    /// Every reservation, by chute name.
    pub fn reservations(&self) -> impl Iterator<Item = (&ChuteName, &Reservation)> + '_ {
        self.reservations.iter()
    }

    /// Number of chutes holding a reservation.
    pub fn len(&self) -> usize {
        self.reservations.len()
    }

    /// True if no chute holds a reservation.
    pub fn is_empty(&self) -> bool {
        self.reservations.is_empty()
    }

    /// Would `admit` succeed? Changes nothing.
    pub fn check_admit(&self, chute: &ChuteName, want: &Reservation) -> Result<(), AdmissionError> {
        if self.reservations.contains_key(chute) {
            return Err(AdmissionError::AlreadyReserved {
                chute: chute.clone(),
            });
        }
        let free = self.free();
        let shortfalls: Vec<Shortfall> = Resource::ALL
            .iter()
            .filter(|&&r| want.get(r) > free.get(r))
            .map(|&r| Shortfall {
                resource: r,
                asked: want.get(r),
                free: free.get(r),
            })
            .collect();
        if shortfalls.is_empty() {
            Ok(())
        } else {
            Err(AdmissionError::Insufficient {
                chute: chute.clone(),
                shortfalls,
            })
        }
    }

    /// Reserves `want` for `chute` if all of it fits; otherwise changes nothing.
    pub fn admit(&mut self, chute: ChuteName, want: Reservation) -> Result<(), AdmissionError> {
        self.check_admit(&chute, &want)?;
        self.reservations.insert(chute, want);
        Ok(())
    }

    /// Would `resize` succeed? Shrinking any resource always fits; growing one must fit in
    /// what is free plus the chute's own current amount. Changes nothing.
    pub fn check_resize(
        &self,
        chute: &ChuteName,
        want: &Reservation,
    ) -> Result<(), AdmissionError> {
        let current = self
            .reservations
            .get(chute)
            .ok_or_else(|| AdmissionError::NotReserved {
                chute: chute.clone(),
            })?;
        let free = self.free();
        let shortfalls: Vec<Shortfall> = Resource::ALL
            .iter()
            .filter_map(|&r| {
                let available = free.get(r).saturating_add(current.get(r));
                let grows = want.get(r) > current.get(r);
                (grows && want.get(r) > available).then(|| Shortfall {
                    resource: r,
                    asked: want.get(r),
                    free: available,
                })
            })
            .collect();
        if shortfalls.is_empty() {
            Ok(())
        } else {
            Err(AdmissionError::Insufficient {
                chute: chute.clone(),
                shortfalls,
            })
        }
    }

    /// Replaces `chute`'s reservation with `want` if it fits (see `check_resize`); returns
    /// the old one. Never releases first, so no other chute can slip in between.
    pub fn resize(
        &mut self,
        chute: &ChuteName,
        want: Reservation,
    ) -> Result<Reservation, AdmissionError> {
        self.check_resize(chute, &want)?;
        let slot = self
            .reservations
            .get_mut(chute)
            .expect("check_resize returned Ok, so the reservation exists");
        Ok(std::mem::replace(slot, want))
    }

    /// Frees `chute`'s reservation; returns it, or `None` if it held none.
    pub fn release(&mut self, chute: &ChuteName) -> Option<Reservation> {
        self.reservations.remove(chute)
    }

    /// Records a reservation without checking capacity (replacing any existing one).
    ///
    /// For reconciliation only: chutes already running when the agent starts must be
    /// recorded even if the configured capacity shrank meanwhile. `overcommitted()` then
    /// reports the resources that are over, and every growth is refused until it is not.
    pub fn force_insert(&mut self, chute: ChuteName, r: Reservation) {
        self.reservations.insert(chute, r);
    }

    /// Resources whose reservations add up to more than capacity.
    pub fn overcommitted(&self) -> Vec<Resource> {
        let used = self.used();
        Resource::ALL
            .iter()
            .copied()
            .filter(|&r| used.get(r) > self.capacity.get(r))
            .collect()
    }

    /// Changes the pools (e.g. a new agent config). Reservations stay; see `overcommitted`.
    pub fn set_capacity(&mut self, capacity: Pools) {
        self.capacity = capacity;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> ChuteName {
        ChuteName::parse(s).unwrap()
    }

    const MIB: u64 = 1 << 20;

    fn amt(cpu: u64, mem_mib: u64, pids: u64, down: u64, up: u64) -> Amounts {
        Amounts {
            cpu_millicores: cpu,
            memory_bytes: mem_mib * MIB,
            pids,
            bandwidth_down_bps: down,
            bandwidth_up_bps: up,
        }
    }

    fn cap() -> Pools {
        amt(2000, 256, 1000, 100_000_000, 50_000_000)
    }

    #[test]
    fn admit_until_full_then_refuse_with_every_shortfall() {
        let mut l = Ledger::new(cap());
        l.admit(n("a"), amt(1500, 128, 100, 0, 0)).unwrap();
        assert_eq!(l.used(), amt(1500, 128, 100, 0, 0));
        assert_eq!(l.free(), amt(500, 128, 900, 100_000_000, 50_000_000));
        let before = l.clone();
        let err = l.admit(n("b"), amt(1000, 192, 10, 0, 0)).unwrap_err();
        assert_eq!(l, before, "a refused admit changes nothing");
        match &err {
            AdmissionError::Insufficient { chute, shortfalls } => {
                assert_eq!(chute.as_str(), "b");
                assert_eq!(
                    shortfalls,
                    &vec![
                        Shortfall {
                            resource: Resource::Cpu,
                            asked: 1000,
                            free: 500
                        },
                        Shortfall {
                            resource: Resource::Memory,
                            asked: 192 * MIB,
                            free: 128 * MIB
                        },
                    ]
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "chute `b` does not fit: cpu: asked 1 core, free 0.5 cores; memory: asked 192 MiB, free 128 MiB"
        );
        // Exactly what is free fits.
        l.admit(n("c"), amt(500, 128, 900, 100_000_000, 50_000_000))
            .unwrap();
        assert_eq!(l.free(), Amounts::ZERO);
        assert!(l.overcommitted().is_empty());
    }

    #[test]
    fn admit_twice_is_refused() {
        let mut l = Ledger::new(cap());
        l.admit(n("a"), amt(1, 4, 1, 0, 0)).unwrap();
        let err = l.admit(n("a"), amt(1, 4, 1, 0, 0)).unwrap_err();
        assert_eq!(err, AdmissionError::AlreadyReserved { chute: n("a") });
        assert!(err.to_string().contains("resize"));
    }

    #[test]
    fn resize_counts_own_share_and_shrinks_always() {
        let mut l = Ledger::new(cap());
        l.admit(n("a"), amt(1000, 128, 100, 0, 0)).unwrap();
        l.admit(n("b"), amt(500, 64, 100, 0, 0)).unwrap();
        // a may grow to free (500 / 64 MiB) + its own (1000 / 128 MiB).
        let old = l.resize(&n("a"), amt(1500, 192, 100, 0, 0)).unwrap();
        assert_eq!(old, amt(1000, 128, 100, 0, 0));
        let before = l.clone();
        let err = l.resize(&n("a"), amt(1501, 100, 100, 0, 0)).unwrap_err();
        assert_eq!(l, before);
        assert_eq!(
            err,
            AdmissionError::Insufficient {
                chute: n("a"),
                shortfalls: vec![Shortfall {
                    resource: Resource::Cpu,
                    asked: 1501,
                    free: 1500
                }]
            }
        );
        l.resize(&n("a"), amt(1, 4, 1, 0, 0)).unwrap();
        assert_eq!(l.used(), amt(501, 68, 101, 0, 0));
        assert_eq!(
            l.resize(&n("zzz"), amt(1, 1, 1, 0, 0)),
            Err(AdmissionError::NotReserved { chute: n("zzz") })
        );
    }

    #[test]
    fn release_frees_and_returns() {
        let mut l = Ledger::new(cap());
        l.admit(n("a"), amt(1000, 128, 100, 8000, 8000)).unwrap();
        assert_eq!(l.release(&n("a")), Some(amt(1000, 128, 100, 8000, 8000)));
        assert_eq!(l.release(&n("a")), None);
        assert_eq!(l.free(), cap());
    }

    #[test]
    fn force_insert_overcommits_and_blocks_growth_but_not_shrink() {
        let mut l = Ledger::new(amt(1000, 64, 100, 0, 0));
        l.force_insert(n("a"), amt(800, 64, 10, 0, 0));
        l.force_insert(n("b"), amt(800, 4, 10, 0, 0));
        assert_eq!(l.overcommitted(), vec![Resource::Cpu, Resource::Memory]);
        assert_eq!(l.free().cpu_millicores, 0);
        assert!(l.resize(&n("a"), amt(801, 64, 10, 0, 0)).is_err());
        assert!(l.check_admit(&n("c"), &amt(1, 0, 0, 0, 0)).is_err());
        l.resize(&n("a"), amt(100, 64, 10, 0, 0)).unwrap();
        assert_eq!(l.overcommitted(), vec![Resource::Memory]);
        l.resize(&n("a"), amt(100, 60, 10, 0, 0)).unwrap();
        assert!(l.overcommitted().is_empty());
        // Zero-size asks still fit even when over.
        l.check_admit(&n("c"), &amt(0, 0, 1, 0, 0)).unwrap();
    }

    #[test]
    fn sums_saturate_instead_of_overflowing() {
        let mut l = Ledger::new(Amounts {
            cpu_millicores: u64::MAX,
            ..Amounts::ZERO
        });
        let huge = Amounts {
            cpu_millicores: u64::MAX,
            ..Amounts::ZERO
        };
        l.admit(n("a"), huge).unwrap();
        l.force_insert(n("b"), huge);
        assert_eq!(l.used().cpu_millicores, u64::MAX);
        assert!(l.resize(&n("a"), huge).is_ok());
    }

    #[test]
    fn shortfall_display_uses_units() {
        let s = Shortfall {
            resource: Resource::Memory,
            asked: 128 * MIB,
            free: 64 * MIB,
        };
        assert_eq!(s.to_string(), "memory: asked 128 MiB, free 64 MiB");
        let s = Shortfall {
            resource: Resource::BandwidthUp,
            asked: 8_000_000,
            free: 2_500_000,
        };
        assert_eq!(s.to_string(), "bandwidth_up: asked 8 mbit, free 2.50 mbit");
        let s = Shortfall {
            resource: Resource::Pids,
            asked: 10,
            free: 3,
        };
        assert_eq!(s.to_string(), "pids: asked 10 pids, free 3 pids");
    }

    #[test]
    fn ledger_roundtrips_through_json() {
        let mut l = Ledger::new(cap());
        l.admit(n("web"), amt(500, 64, 64, 8_000_000, 2_000_000))
            .unwrap();
        let json = serde_json::to_string(&l).unwrap();
        assert!(json.contains("\"web\""), "{json}");
        let back: Ledger = serde_json::from_str(&json).unwrap();
        assert_eq!(back, l);
    }
}
