//! What a heartbeat's assignments mean for this node's slots, decided without IO.
//!
//! [`plan_assignments`] turns the coordinator's list of model versions this node should hold
//! into [`SlotAction`]s, given what each existing slot is doing; the agent applies them under
//! its slots lock and starts the warm-ups after releasing it. The rules:
//!
//! - A model version without a slot gets one ([`SlotAction::Create`]); one with a slot gets the
//!   assignment's settings and keep-warm role ([`SlotAction::Update`]).
//! - A replica the coordinator wants warm (`keep_warm`: one of the `min_replicas`; `prewarm`:
//!   demand here, or a call predicted) is loaded ([`SlotAction::Warm`]) when this node's labels
//!   allow the deployment and the replica is neither loaded nor loading.
//! - `unload_idle` on a loaded replica that is neither kept warm nor pre-warmed unloads it now
//!   ([`SlotAction::Unload`]): the autoscaler expects no call before it could pre-warm again.
//!   (The slot refuses while requests run.)

use skein_proto::Assignment;
use std::collections::{BTreeMap, HashMap};

/// What the plan needs to know about an existing slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotView {
    /// The replica is in memory.
    pub loaded: bool,
    /// A load is in progress.
    pub loading: bool,
}

/// One thing to do to the slot of an assignment's model version, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotAction<'a> {
    /// Make a slot for it (not loaded).
    Create(&'a Assignment),
    /// Apply its settings and keep-warm role to the existing slot.
    Update(&'a Assignment),
    /// Load its replica in the background.
    Warm(&'a Assignment),
    /// Unload its replica now, unless requests are queued, running or loading.
    Unload(&'a Assignment),
}

/// The actions for `assignments` on a node with `labels`; `slot(name, version)` tells what the
/// existing slot of a model version is doing (`None`: no slot). A model version listed twice is
/// planned the second time against the slot the first one leaves.
pub fn plan_assignments<'a>(
    assignments: &'a [Assignment],
    labels: &BTreeMap<String, String>,
    slot: impl Fn(&str, &str) -> Option<SlotView>,
) -> Vec<SlotAction<'a>> {
    let mut actions = Vec::with_capacity(assignments.len() * 2);
    // Slots this plan creates: they exist (not loaded) for a later repeat of the same version.
    let mut created: HashMap<(&str, &str), SlotView> = HashMap::new();
    for a in assignments {
        let key = (a.name.as_str(), a.version.as_str());
        let wanted = (a.keep_warm || a.prewarm)
            && skein_policy::placement::labels_allow(&a.settings, labels);
        match created.get(&key).copied().or_else(|| slot(key.0, key.1)) {
            None => {
                actions.push(SlotAction::Create(a));
                created.insert(key, SlotView::default());
                if wanted {
                    actions.push(SlotAction::Warm(a));
                }
            }
            Some(view) => {
                actions.push(SlotAction::Update(a));
                if wanted && !view.loaded && !view.loading {
                    actions.push(SlotAction::Warm(a));
                }
                if a.unload_idle && !a.keep_warm && !a.prewarm && view.loaded {
                    actions.push(SlotAction::Unload(a));
                }
            }
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::SlotAction::{Create, Unload, Update, Warm};
    use super::*;
    use skein_proto::{Accelerator, DeploymentSettings};

    fn assignment(name: &str) -> Assignment {
        Assignment {
            name: name.into(),
            version: "1".into(),
            sha256: "0".repeat(64),
            size: 1,
            settings: DeploymentSettings::default(),
            keep_warm: false,
            unload_idle: false,
            prewarm: false,
        }
    }

    fn no_labels() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn none(_: &str, _: &str) -> Option<SlotView> {
        None
    }

    const IDLE: SlotView = SlotView {
        loaded: false,
        loading: false,
    };
    const LOADED: SlotView = SlotView {
        loaded: true,
        loading: false,
    };
    const LOADING: SlotView = SlotView {
        loaded: false,
        loading: true,
    };

    #[test]
    fn nothing_assigned_plans_nothing() {
        assert!(plan_assignments(&[], &no_labels(), none).is_empty());
    }

    #[test]
    fn a_new_version_gets_a_slot_and_is_loaded_only_when_wanted_warm() {
        let plain = assignment("plain");
        let kept = Assignment {
            keep_warm: true,
            ..assignment("kept")
        };
        let pre = Assignment {
            prewarm: true,
            ..assignment("pre")
        };
        let all = [plain, kept, pre];
        let plan = plan_assignments(&all, &no_labels(), none);
        assert_eq!(
            plan,
            [
                Create(&all[0]),
                Create(&all[1]),
                Warm(&all[1]),
                Create(&all[2]),
                Warm(&all[2])
            ]
        );
    }

    #[test]
    fn an_existing_slot_is_updated_and_warmed_only_when_neither_loaded_nor_loading() {
        let a = [Assignment {
            prewarm: true,
            ..assignment("m")
        }];
        for (view, warm) in [(IDLE, true), (LOADED, false), (LOADING, false)] {
            let plan = plan_assignments(&a, &no_labels(), |_, _| Some(view));
            let want: Vec<_> = if warm {
                vec![Update(&a[0]), Warm(&a[0])]
            } else {
                vec![Update(&a[0])]
            };
            assert_eq!(plan, want, "{view:?}");
        }
    }

    #[test]
    fn labels_that_do_not_allow_the_deployment_keep_it_cold() {
        let a = [Assignment {
            keep_warm: true,
            settings: DeploymentSettings {
                regions: vec!["eu".into()],
                ..DeploymentSettings::default()
            },
            ..assignment("eu-only")
        }];
        let us = BTreeMap::from([("region".to_string(), "us".to_string())]);
        assert_eq!(plan_assignments(&a, &us, none), [Create(&a[0])]);
        assert_eq!(
            plan_assignments(&a, &us, |_, _| Some(IDLE)),
            [Update(&a[0])]
        );
        let eu = BTreeMap::from([("region".to_string(), "eu".to_string())]);
        assert_eq!(
            plan_assignments(&a, &eu, none),
            [Create(&a[0]), Warm(&a[0])]
        );
        // A GPU-only deployment on a node without a GPU label stays cold too.
        let gpu = [Assignment {
            prewarm: true,
            settings: DeploymentSettings {
                accelerator: Accelerator::Gpu,
                ..DeploymentSettings::default()
            },
            ..assignment("gpu")
        }];
        assert_eq!(
            plan_assignments(&gpu, &no_labels(), none),
            [Create(&gpu[0])]
        );
    }

    #[test]
    fn unload_idle_unloads_a_loaded_replica_unless_it_is_wanted_warm() {
        let unload = |keep_warm, prewarm| Assignment {
            unload_idle: true,
            keep_warm,
            prewarm,
            ..assignment("m")
        };
        let a = [unload(false, false)];
        assert_eq!(
            plan_assignments(&a, &no_labels(), |_, _| Some(LOADED)),
            [Update(&a[0]), Unload(&a[0])]
        );
        // Nothing loaded (or only loading): nothing to unload.
        for view in [IDLE, LOADING] {
            assert_eq!(
                plan_assignments(&a, &no_labels(), |_, _| Some(view)),
                [Update(&a[0])]
            );
        }
        // A new slot has nothing loaded either.
        assert_eq!(plan_assignments(&a, &no_labels(), none), [Create(&a[0])]);
        // Kept warm or pre-warmed: never unloaded.
        for (k, p) in [(true, false), (false, true), (true, true)] {
            let a = [unload(k, p)];
            assert_eq!(
                plan_assignments(&a, &no_labels(), |_, _| Some(LOADED)),
                [Update(&a[0])],
                "keep_warm {k}, prewarm {p}"
            );
        }
    }

    #[test]
    fn each_version_is_looked_up_by_name_and_version() {
        let a = [
            assignment("a"),
            Assignment {
                version: "2".into(),
                prewarm: true,
                ..assignment("a")
            },
            Assignment {
                prewarm: true,
                ..assignment("b")
            },
        ];
        // Only `a` version 1 and `b` version 1 have slots; `b`'s is loading.
        let plan = plan_assignments(&a, &no_labels(), |name, version| match (name, version) {
            ("a", "1") => Some(IDLE),
            ("b", "1") => Some(LOADING),
            _ => None,
        });
        assert_eq!(
            plan,
            [Update(&a[0]), Create(&a[1]), Warm(&a[1]), Update(&a[2])]
        );
    }

    #[test]
    fn a_version_listed_twice_is_created_once_then_updated() {
        let a = [
            assignment("m"),
            Assignment {
                keep_warm: true,
                ..assignment("m")
            },
        ];
        assert_eq!(
            plan_assignments(&a, &no_labels(), none),
            [Create(&a[0]), Update(&a[1]), Warm(&a[1])]
        );
    }
}
