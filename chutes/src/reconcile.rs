//! Planning on agent start: compare the snapshot (what we knew) with what Podman shows
//! (what is), and decide per chute. Pure; the agent carries the plan out.
//!
//! The agent may crash or be upgraded at any time; its chutes must not notice. So a
//! running container is adopted as it is (same id, no restart), one that died while the
//! agent was away is handled as its restart policy says, and a container that carries our
//! label but is not in the snapshot is reported, never deleted: deleting is only ever done
//! on a user's signed request. The one exception is a deploy that was never acknowledged:
//! the agent records a chute as installing before it creates anything, so a chute still
//! installing in the snapshot is undone (its container removed, its record dropped), as a
//! deploy that fails is; the caller, who never heard "deployed", deploys again.

use serde::{Deserialize, Serialize};

use crate::lifecycle::ChuteState;
use crate::manifest::{ChuteName, RestartPolicy};

/// A chute as the last snapshot recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownChute {
    /// Its name.
    pub name: ChuteName,
    /// Its container's id, if one had been created.
    pub container_id: Option<String>,
    /// Its state in the snapshot (record [`crate::Lifecycle::snapshot_state`]).
    pub state: ChuteState,
    /// Its restart policy.
    pub policy: RestartPolicy,
}

/// A container Podman reports (the agent lists those carrying its label).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedContainer {
    /// Container id.
    pub id: String,
    /// The chute named by our label, if the label is present and valid.
    pub chute: Option<ChuteName>,
    /// Whether it runs now.
    pub running: bool,
    /// Exit code if it exited.
    pub exit_code: Option<i32>,
}

/// What to do about one chute or container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReconcileAction {
    /// Running and known: keep it, same container, no restart. Its state becomes Running.
    Adopt {
        /// The chute.
        chute: ChuteName,
        /// The running container (may differ from the snapshot's if it was re-created).
        container_id: String,
    },
    /// Died while we were away and its policy says restart (or it was already restarting,
    /// or its deploy was interrupted): start it again, keeping the reservation.
    Restart {
        /// The chute.
        chute: ChuteName,
        /// Its container.
        container_id: String,
        /// How it exited, if Podman knows.
        exit_code: Option<i32>,
    },
    /// Died while we were away and its policy says no restart: free the reservation; state
    /// Stopped (exit code 0) or Failed (otherwise or unknown).
    Release {
        /// The chute.
        chute: ChuteName,
        /// Its container (kept, for logs and a later start).
        container_id: String,
        /// How it exited, if Podman knows.
        exit_code: Option<i32>,
    },
    /// Stopped or failed before, still not running: nothing to do (re-arm its zombie timer).
    KeepStopped {
        /// The chute.
        chute: ChuteName,
        /// Its container.
        container_id: String,
    },
    /// Should run (or was installing) but its container is gone: create it again from the
    /// stored manifest and start it.
    Recreate {
        /// The chute.
        chute: ChuteName,
    },
    /// Carries our label but is not in the snapshot (or is a second container for one
    /// chute): report it, never delete it.
    ReportUnknown {
        /// The container.
        container_id: String,
        /// The chute its label names, if any.
        chute: Option<ChuteName>,
    },
    /// Dead (removed) or still installing (never acknowledged) and its container is gone:
    /// drop the record.
    Forget {
        /// The chute.
        chute: ChuteName,
    },
    /// Dead (a removal was under way when the agent stopped), or still installing (a deploy
    /// never acknowledged), but its container is still there: remove the container and
    /// forget the chute (no reservation is held for it).
    FinishRemoval {
        /// The chute.
        chute: ChuteName,
        /// The container left over.
        container_id: String,
    },
    /// Stopped or failed, and its container is gone (removed by hand): keep the chute's
    /// record and reservation as Stopped/Failed, and re-create the container without
    /// starting it (or on the next start).
    RecreateStopped {
        /// The chute.
        chute: ChuteName,
    },
}

impl ReconcileAction {
    /// The chute this action is about, if it names one.
    pub fn chute(&self) -> Option<&ChuteName> {
        match self {
            ReconcileAction::Adopt { chute, .. }
            | ReconcileAction::Restart { chute, .. }
            | ReconcileAction::Release { chute, .. }
            | ReconcileAction::KeepStopped { chute, .. }
            | ReconcileAction::Recreate { chute }
            | ReconcileAction::Forget { chute }
            | ReconcileAction::FinishRemoval { chute, .. }
            | ReconcileAction::RecreateStopped { chute } => Some(chute),
            ReconcileAction::ReportUnknown { chute, .. } => chute.as_ref(),
        }
    }

    fn container_id(&self) -> &str {
        match self {
            ReconcileAction::Adopt { container_id, .. }
            | ReconcileAction::Restart { container_id, .. }
            | ReconcileAction::Release { container_id, .. }
            | ReconcileAction::KeepStopped { container_id, .. }
            | ReconcileAction::FinishRemoval { container_id, .. }
            | ReconcileAction::ReportUnknown { container_id, .. } => container_id,
            ReconcileAction::Recreate { .. }
            | ReconcileAction::Forget { .. }
            | ReconcileAction::RecreateStopped { .. } => "",
        }
    }
}

/// Podman accepts any unique prefix of an id; snapshots may hold the short form (12 hex
/// digits) while listings give the full one.
fn same_id(a: &str, b: &str) -> bool {
    const MIN_PREFIX: usize = 12;
    a == b || (a.len().min(b.len()) >= MIN_PREFIX && (a.starts_with(b) || b.starts_with(a)))
}

/// Decides what to do about every known chute and every observed container.
///
/// Each known chute is matched to a container by id first, then (for chutes whose id
/// matched nothing) by the chute-name label, preferring a running container. Each
/// container is matched at most once; the rest are reported. The output is sorted by
/// chute name (unnamed reports last, by container id), so the same input always gives
/// the same plan.
pub fn plan(known: &[KnownChute], observed: &[ObservedContainer]) -> Vec<ReconcileAction> {
    let mut known: Vec<&KnownChute> = known.iter().collect();
    known.sort_by(|a, b| a.name.cmp(&b.name));
    let mut taken = vec![false; observed.len()];
    let mut matched: Vec<Option<usize>> = vec![None; known.len()];

    for (k, slot) in known.iter().zip(matched.iter_mut()) {
        if let Some(id) = &k.container_id {
            if let Some(i) =
                (0..observed.len()).find(|&i| !taken[i] && same_id(&observed[i].id, id))
            {
                taken[i] = true;
                *slot = Some(i);
            }
        }
    }
    for (k, slot) in known.iter().zip(matched.iter_mut()) {
        if slot.is_some() {
            continue;
        }
        let best = (0..observed.len())
            .filter(|&i| !taken[i] && observed[i].chute.as_ref() == Some(&k.name))
            .min_by(|&a, &b| {
                let (a, b) = (&observed[a], &observed[b]);
                b.running.cmp(&a.running).then_with(|| a.id.cmp(&b.id))
            });
        if let Some(i) = best {
            taken[i] = true;
            *slot = Some(i);
        }
    }

    let mut out = Vec::with_capacity(known.len() + observed.len());
    for (k, slot) in known.iter().zip(&matched) {
        let chute = k.name.clone();
        let action = match (slot.map(|i| &observed[i]), k.state) {
            (None, ChuteState::Dead | ChuteState::Installing) => ReconcileAction::Forget { chute },
            // A deploy interrupted before it was acknowledged: undone.
            (Some(c), ChuteState::Installing) => ReconcileAction::FinishRemoval {
                chute,
                container_id: c.id.clone(),
            },
            (None, ChuteState::Stopped | ChuteState::Failed) => {
                ReconcileAction::RecreateStopped { chute }
            }
            (None, _) => ReconcileAction::Recreate { chute },
            (Some(c), ChuteState::Dead) => ReconcileAction::FinishRemoval {
                chute,
                container_id: c.id.clone(),
            },
            // Running is what is; a chute the snapshot had as stopped but which runs was
            // started by hand or our stop never finished: adopt it rather than kill it.
            (Some(c), _) if c.running => ReconcileAction::Adopt {
                chute,
                container_id: c.id.clone(),
            },
            (Some(c), ChuteState::Stopped | ChuteState::Failed) => ReconcileAction::KeepStopped {
                chute,
                container_id: c.id.clone(),
            },
            (Some(c), state) => {
                // Running or Restarting in the snapshot, and dead now. A restart was
                // already decided for Restarting (a requested restart or an update under
                // way): it is made whatever the policy.
                let restart = state == ChuteState::Restarting
                    || match k.policy {
                        RestartPolicy::Always => true,
                        // An unknown exit code is treated as a failure.
                        RestartPolicy::OnFailure => c.exit_code != Some(0),
                        RestartPolicy::Never => false,
                    };
                if restart {
                    ReconcileAction::Restart {
                        chute,
                        container_id: c.id.clone(),
                        exit_code: c.exit_code,
                    }
                } else {
                    ReconcileAction::Release {
                        chute,
                        container_id: c.id.clone(),
                        exit_code: c.exit_code,
                    }
                }
            }
        };
        out.push(action);
    }
    for (c, _) in observed.iter().zip(&taken).filter(|(_, &t)| !t) {
        out.push(ReconcileAction::ReportUnknown {
            container_id: c.id.clone(),
            chute: c.chute.clone(),
        });
    }
    // Named first by name, then unnamed; within a name the known chute's own action
    // before reports of extra containers; then by container id.
    out.sort_by(|a, b| {
        let key = |x: &ReconcileAction| {
            (
                x.chute().is_none(),
                x.chute().cloned(),
                matches!(x, ReconcileAction::ReportUnknown { .. }),
            )
        };
        key(a)
            .cmp(&key(b))
            .then_with(|| a.container_id().cmp(b.container_id()))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> ChuteName {
        ChuteName::parse(s).unwrap()
    }

    fn known(name: &str, id: Option<&str>, state: ChuteState, policy: RestartPolicy) -> KnownChute {
        KnownChute {
            name: n(name),
            container_id: id.map(str::to_owned),
            state,
            policy,
        }
    }

    fn obs(
        id: &str,
        chute: Option<&str>,
        running: bool,
        exit_code: Option<i32>,
    ) -> ObservedContainer {
        ObservedContainer {
            id: id.to_owned(),
            chute: chute.map(n),
            running,
            exit_code,
        }
    }

    use ChuteState::*;
    use RestartPolicy::*;

    #[test]
    fn running_and_known_is_adopted_with_same_id() {
        let p = plan(
            &[known("web", Some("aaa"), Running, OnFailure)],
            &[obs("aaa", Some("web"), true, None)],
        );
        assert_eq!(
            p,
            vec![ReconcileAction::Adopt {
                chute: n("web"),
                container_id: "aaa".into()
            }]
        );
    }

    #[test]
    fn died_while_away_follows_policy() {
        let cases = [
            (Always, Some(0), true),
            (Always, Some(1), true),
            (OnFailure, Some(1), true),
            (OnFailure, None, true),
            (OnFailure, Some(0), false),
            (Never, Some(1), false),
            (Never, Some(0), false),
        ];
        for (policy, code, restart) in cases {
            let p = plan(
                &[known("web", Some("aaa"), Running, policy)],
                &[obs("aaa", Some("web"), false, code)],
            );
            let want = if restart {
                ReconcileAction::Restart {
                    chute: n("web"),
                    container_id: "aaa".into(),
                    exit_code: code,
                }
            } else {
                ReconcileAction::Release {
                    chute: n("web"),
                    container_id: "aaa".into(),
                    exit_code: code,
                }
            };
            assert_eq!(p, vec![want], "{policy} {code:?}");
        }
    }

    #[test]
    fn restarting_in_snapshot_is_restarted_even_under_never() {
        let p = plan(
            &[known("web", Some("aaa"), Restarting, Never)],
            &[obs("aaa", Some("web"), false, None)],
        );
        assert!(matches!(p[0], ReconcileAction::Restart { .. }), "{p:?}");
    }

    #[test]
    fn a_deploy_never_acknowledged_is_undone_whatever_its_container_does() {
        for running in [true, false] {
            let p = plan(
                &[known("web", None, Installing, Always)],
                &[obs("aaa", Some("web"), running, None)],
            );
            assert_eq!(
                p,
                vec![ReconcileAction::FinishRemoval {
                    chute: n("web"),
                    container_id: "aaa".into()
                }]
            );
        }
    }

    #[test]
    fn user_stopped_and_not_running_is_kept() {
        for state in [Stopped, Failed] {
            let p = plan(
                &[known("web", Some("aaa"), state, Always)],
                &[obs("aaa", Some("web"), false, Some(137))],
            );
            assert_eq!(
                p,
                vec![ReconcileAction::KeepStopped {
                    chute: n("web"),
                    container_id: "aaa".into()
                }]
            );
        }
    }

    #[test]
    fn container_gone_recreates_or_forgets() {
        let p = plan(
            &[
                known("a", Some("gone"), Running, OnFailure),
                known("b", None, Installing, OnFailure),
                known("c", Some("gone2"), Dead, OnFailure),
                known("d", Some("gone3"), Stopped, OnFailure),
            ],
            &[],
        );
        assert_eq!(
            p,
            vec![
                ReconcileAction::Recreate { chute: n("a") },
                ReconcileAction::Forget { chute: n("b") },
                ReconcileAction::Forget { chute: n("c") },
                ReconcileAction::RecreateStopped { chute: n("d") },
            ]
        );
    }

    #[test]
    fn dead_with_container_left_finishes_removal() {
        let p = plan(
            &[known("web", Some("aaa"), Dead, OnFailure)],
            &[obs("aaa", Some("web"), false, Some(0))],
        );
        assert_eq!(
            p,
            vec![ReconcileAction::FinishRemoval {
                chute: n("web"),
                container_id: "aaa".into()
            }]
        );
    }

    #[test]
    fn unknown_labelled_containers_are_reported_never_deleted() {
        let p = plan(
            &[],
            &[
                obs("zzz", Some("stray"), true, None),
                obs("yyy", None, false, Some(1)),
            ],
        );
        assert_eq!(
            p,
            vec![
                ReconcileAction::ReportUnknown {
                    container_id: "zzz".into(),
                    chute: Some(n("stray"))
                },
                ReconcileAction::ReportUnknown {
                    container_id: "yyy".into(),
                    chute: None
                },
            ]
        );
    }

    #[test]
    fn recreated_container_is_matched_by_label_preferring_running() {
        let p = plan(
            &[known("web", Some("old"), Running, OnFailure)],
            &[
                obs("b-exited", Some("web"), false, Some(1)),
                obs("c-running", Some("web"), true, None),
            ],
        );
        assert_eq!(
            p,
            vec![
                ReconcileAction::Adopt {
                    chute: n("web"),
                    container_id: "c-running".into()
                },
                ReconcileAction::ReportUnknown {
                    container_id: "b-exited".into(),
                    chute: Some(n("web"))
                },
            ]
        );
    }

    #[test]
    fn id_match_wins_over_label_and_short_ids_match() {
        let full = "0123456789abcdef0123456789abcdef";
        // Label says `b`, but the id is `a`'s: the id is the stronger evidence.
        let p = plan(
            &[
                known("a", Some("0123456789ab"), Running, Always),
                known("b", Some("other"), Running, Always),
            ],
            &[obs(full, Some("b"), true, None)],
        );
        assert_eq!(
            p,
            vec![
                ReconcileAction::Adopt {
                    chute: n("a"),
                    container_id: full.into()
                },
                ReconcileAction::Recreate { chute: n("b") },
            ]
        );
        // Short prefixes below 12 characters do not match.
        assert!(!same_id("0123", full));
    }

    #[test]
    fn mixed_case_is_sorted_by_name_and_deterministic() {
        let known_list = vec![
            known("zeta", Some("z1"), Running, Always),
            known("alpha", Some("a1"), Running, Never),
            known("mid", Some("m1"), Stopped, OnFailure),
            known("gone", None, Running, OnFailure),
            known("dead", Some("d1"), Dead, OnFailure),
            known("beta", Some("b1"), Running, OnFailure),
        ];
        let observed = vec![
            obs("z1", Some("zeta"), true, None),
            obs("a1", Some("alpha"), false, Some(3)),
            obs("m1", Some("mid"), false, Some(0)),
            obs("x1", Some("extra"), true, None),
            obs("b2", Some("beta"), false, Some(2)),
            obs("n1", None, true, None),
        ];
        let p = plan(&known_list, &observed);
        let want = vec![
            ReconcileAction::Release {
                chute: n("alpha"),
                container_id: "a1".into(),
                exit_code: Some(3),
            },
            ReconcileAction::Restart {
                chute: n("beta"),
                container_id: "b2".into(),
                exit_code: Some(2),
            },
            ReconcileAction::Forget { chute: n("dead") },
            ReconcileAction::ReportUnknown {
                container_id: "x1".into(),
                chute: Some(n("extra")),
            },
            ReconcileAction::Recreate { chute: n("gone") },
            ReconcileAction::KeepStopped {
                chute: n("mid"),
                container_id: "m1".into(),
            },
            ReconcileAction::Adopt {
                chute: n("zeta"),
                container_id: "z1".into(),
            },
            ReconcileAction::ReportUnknown {
                container_id: "n1".into(),
                chute: None,
            },
        ];
        assert_eq!(p, want);
        let mut rev_k = known_list.clone();
        rev_k.reverse();
        let mut rev_o = observed.clone();
        rev_o.reverse();
        assert_eq!(plan(&rev_k, &rev_o), want, "input order must not matter");
    }
}
