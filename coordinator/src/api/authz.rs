//! Who may see and do what on the coordinator.
//!
//! An analyst sees and acts on its own jobs and schedules (a scheduled run belongs to the
//! schedule's owner). The coordinator's config may grant more through roles:
//!
//! ```toml
//! [[role]]
//! name = "auditors"
//! grants = ["read-all"]          # read-all | schedule-admin | admin
//! analysts = ["carol"]
//! ```
//!
//! | grant | sees | acts on |
//! |---|---|---|
//! | (none) | own jobs and schedules | own jobs and schedules |
//! | `read-all` | every job and schedule | own |
//! | `schedule-admin` | every schedule and its runs | every schedule |
//! | `admin` | everything | everything |
//!
//! [`authorize`] is the one decision, a plain function of the analyst, the roles and the
//! object's owner; the QUIC API and the web console both call it, so they cannot disagree.

use std::collections::BTreeMap;

pub use crate::config::{Grant, RoleConfig};

/// The roles of the config, by analyst.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Roles {
    /// analyst → (grant → the role that grants it).
    by_analyst: BTreeMap<String, BTreeMap<Grant, String>>,
}

impl Roles {
    /// Indexes the config's roles ([`crate::config::validate_roles`] has checked them).
    pub fn new(roles: &[RoleConfig]) -> Roles {
        let mut by_analyst: BTreeMap<String, BTreeMap<Grant, String>> = BTreeMap::new();
        for role in roles {
            for analyst in &role.analysts {
                let grants = by_analyst.entry(analyst.clone()).or_default();
                for g in &role.grants {
                    grants.entry(*g).or_insert_with(|| role.name.clone());
                }
            }
        }
        Roles { by_analyst }
    }

    /// The role through which `analyst` holds `grant`, if any (`admin` implies every grant).
    fn through(&self, analyst: &str, grant: Grant) -> Option<(&str, Grant)> {
        let grants = self.by_analyst.get(analyst)?;
        grants.get(&grant).map(|r| (r.as_str(), grant)).or_else(|| {
            grants
                .get(&Grant::Admin)
                .map(|r| (r.as_str(), Grant::Admin))
        })
    }

    /// Every grant `analyst` holds, with the role it comes from.
    pub fn grants_of(&self, analyst: &str) -> Vec<(Grant, String)> {
        self.by_analyst
            .get(analyst)
            .map(|g| g.iter().map(|(g, r)| (*g, r.clone())).collect())
            .unwrap_or_default()
    }
}

/// What an analyst asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// See a job: its state, history and results.
    ReadJob,
    /// Act on a job: retry (or cancel) it.
    ActOnJob,
    /// See a schedule, its runs and its report.
    ReadSchedule,
    /// Act on a schedule: pause, resume, remove, run now.
    ActOnSchedule,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::ReadJob | Action::ReadSchedule => "see",
            Action::ActOnJob | Action::ActOnSchedule => "act on",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Action::ReadJob | Action::ActOnJob => "job",
            Action::ReadSchedule | Action::ActOnSchedule => "schedule",
        }
    }
}

/// The object of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    /// The job id or schedule name (for messages).
    pub id: &'a str,
    /// Its owner: the analyst who submitted the job or added the schedule (a scheduled run
    /// belongs to the schedule's owner). Empty for rows stored before owners were kept: only a
    /// grant reaches those.
    pub owner: &'a str,
    /// For a job: whether it is a run of a schedule (a `schedule-admin` sees those).
    pub scheduled: bool,
}

/// Why a request is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allowed {
    /// The analyst owns the object.
    Owner,
    /// A role grants it.
    Grant {
        /// The role's name.
        role: String,
        /// The grant used.
        grant: Grant,
    },
}

/// A refused request, with a message the analyst can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    /// Who asked.
    pub analyst: String,
    /// The job id or schedule name.
    pub id: String,
    /// The whole message: who may not do what, whose it is, and which grant would allow it.
    pub message: String,
}

/// Decides whether `analyst` may do `action` on `target` under `roles`.
pub fn authorize(
    analyst: &str,
    roles: &Roles,
    action: Action,
    target: &Target<'_>,
) -> Result<Allowed, Refused> {
    if !target.owner.is_empty() && target.owner == analyst {
        return Ok(Allowed::Owner);
    }
    let wanted: &[Grant] = match action {
        Action::ReadJob if target.scheduled => &[Grant::ReadAll, Grant::ScheduleAdmin],
        Action::ReadJob => &[Grant::ReadAll],
        Action::ActOnJob => &[Grant::Admin],
        Action::ReadSchedule => &[Grant::ReadAll, Grant::ScheduleAdmin],
        Action::ActOnSchedule => &[Grant::ScheduleAdmin],
    };
    if let Some((role, grant)) = wanted.iter().find_map(|g| roles.through(analyst, *g)) {
        return Ok(Allowed::Grant {
            role: role.to_owned(),
            grant,
        });
    }
    let mut needed: Vec<&str> = wanted.iter().map(|g| g.as_str()).collect();
    if !needed.contains(&"admin") {
        needed.push("admin");
    }
    let owner = if target.owner.is_empty() {
        "no recorded analyst".to_owned()
    } else {
        format!("analyst {}", target.owner)
    };
    Err(Refused {
        analyst: analyst.to_owned(),
        id: target.id.to_owned(),
        message: format!(
            "analyst {analyst} may not {} {} {}: it belongs to {owner}; an analyst sees and acts \
             on its own jobs and schedules unless a [[role]] in the coordinator's config grants \
             it {}",
            action.verb(),
            action.noun(),
            target.id,
            needed.join(" or ")
        ),
    })
}

/// Whether `analyst` may see every object of a listing without looking at owners (a listing
/// otherwise shows only what [`authorize`] allows, row by row).
pub fn sees_all(analyst: &str, roles: &Roles, action: Action) -> bool {
    let grant = match action {
        Action::ReadJob => Grant::ReadAll,
        Action::ReadSchedule => {
            return roles.through(analyst, Grant::ReadAll).is_some()
                || roles.through(analyst, Grant::ScheduleAdmin).is_some();
        }
        Action::ActOnJob => Grant::Admin,
        Action::ActOnSchedule => Grant::ScheduleAdmin,
    };
    roles.through(analyst, grant).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles() -> Roles {
        Roles::new(&[
            RoleConfig {
                name: "auditors".into(),
                grants: vec![Grant::ReadAll],
                analysts: vec!["carol".into()],
            },
            RoleConfig {
                name: "ops".into(),
                grants: vec![Grant::ScheduleAdmin],
                analysts: vec!["sched".into()],
            },
            RoleConfig {
                name: "root".into(),
                grants: vec![Grant::Admin],
                analysts: vec!["root".into()],
            },
        ])
    }

    const ALICE_JOB: Target<'static> = Target {
        id: "job-1",
        owner: "alice",
        scheduled: false,
    };
    const ALICE_RUN: Target<'static> = Target {
        id: "job-2",
        owner: "alice",
        scheduled: true,
    };
    const ALICE_SCHEDULE: Target<'static> = Target {
        id: "nightly",
        owner: "alice",
        scheduled: false,
    };

    #[test]
    fn the_table_of_the_module_docs() {
        let r = roles();
        use Action::*;
        // (analyst, action, target, allowed)
        let cases = [
            ("alice", ReadJob, ALICE_JOB, true),
            ("alice", ActOnJob, ALICE_JOB, true),
            ("alice", ActOnSchedule, ALICE_SCHEDULE, true),
            ("bob", ReadJob, ALICE_JOB, false),
            ("bob", ActOnJob, ALICE_JOB, false),
            ("bob", ReadSchedule, ALICE_SCHEDULE, false),
            ("bob", ActOnSchedule, ALICE_SCHEDULE, false),
            ("bob", ReadJob, ALICE_RUN, false),
            ("carol", ReadJob, ALICE_JOB, true),
            ("carol", ReadSchedule, ALICE_SCHEDULE, true),
            ("carol", ActOnJob, ALICE_JOB, false),
            ("carol", ActOnSchedule, ALICE_SCHEDULE, false),
            ("sched", ReadSchedule, ALICE_SCHEDULE, true),
            ("sched", ActOnSchedule, ALICE_SCHEDULE, true),
            ("sched", ReadJob, ALICE_RUN, true),
            ("sched", ReadJob, ALICE_JOB, false),
            ("sched", ActOnJob, ALICE_RUN, false),
            ("root", ReadJob, ALICE_JOB, true),
            ("root", ActOnJob, ALICE_JOB, true),
            ("root", ActOnSchedule, ALICE_SCHEDULE, true),
        ];
        for (analyst, action, target, allowed) in cases {
            assert_eq!(
                authorize(analyst, &r, action, &target).is_ok(),
                allowed,
                "{analyst} {action:?} {target:?}"
            );
        }
        assert_eq!(
            authorize("carol", &r, ReadJob, &ALICE_JOB),
            Ok(Allowed::Grant {
                role: "auditors".into(),
                grant: Grant::ReadAll
            })
        );
        // No owner recorded: only a grant reaches it, never an empty analyst name.
        let orphan = Target {
            id: "job-0",
            owner: "",
            scheduled: false,
        };
        assert!(authorize("", &r, ReadJob, &orphan).is_err());
        assert!(authorize("carol", &r, ReadJob, &orphan).is_ok());
    }

    #[test]
    fn a_refusal_names_the_analyst_the_owner_and_the_way_out() {
        let e = authorize("bob", &roles(), Action::ActOnSchedule, &ALICE_SCHEDULE)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "analyst bob may not act on schedule nightly: it belongs to analyst alice; an \
             analyst sees and acts on its own jobs and schedules unless a [[role]] in the \
             coordinator's config grants it schedule-admin or admin"
        );
    }
}
