//! Pre-warming and keep-alive expiry for one model at one node: given a
//! [`KeepAlive`](crate::demand::KeepAlive), the last arrival and `now_us`, load ahead of the
//! predicted next arrival, unload while no call is expected, unload at keep-alive expiry.
//!
//! With `prewarm_after_us = Some(p)` the replica should be *ready* at `last + p`, so the load
//! starts at `load_at = last + p - load_us`; between the end of the last request and
//! `load_at` it is unloaded (nothing expected), from `load_at` to `last + keep_alive_us` it is
//! kept loaded. When `load_at` is not later than the last arrival plus `min_gap_us`, unloading
//! is not worth it and the replica simply stays loaded. A replica with requests running or
//! queued is never unloaded, and a load is never cancelled by this plan.

use crate::demand::KeepAlive;

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WarmAction {
    /// Start loading now (pre-warm).
    Load,
    /// Unload now.
    Unload,
    /// Keep loaded.
    Keep,
    /// Stay unloaded.
    StayCold,
}

/// A pre-warm decision.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmPlan {
    /// What to do now.
    pub action: WarmAction,
    /// When to ask again (the next load or unload time), µs; `None`: at the next arrival.
    pub next_check_us: Option<u64>,
    /// Human-readable explanation.
    pub reason: String,
}

/// The plan for a model at `now_us` (see the module docs).
///
/// `loaded` covers loading too; `busy` means requests run or wait there; `load_us` is the
/// expected load time; `min_gap_us` the shortest unloaded gap worth an unload and reload.
pub fn plan(
    keep: &KeepAlive,
    last_arrival_us: Option<u64>,
    now_us: u64,
    loaded: bool,
    busy: bool,
    load_us: u64,
    min_gap_us: u64,
) -> WarmPlan {
    let out = |action, next: Option<u64>, reason: String| WarmPlan {
        action,
        next_check_us: next,
        reason,
    };
    if busy {
        return out(WarmAction::Keep, None, "requests in progress".into());
    }
    let Some(last) = last_arrival_us else {
        return if loaded {
            out(WarmAction::Unload, None, "never called".into())
        } else {
            out(WarmAction::StayCold, None, "never called".into())
        };
    };
    let expiry = last.saturating_add(keep.keep_alive_us);
    if now_us >= expiry {
        let r = format!(
            "keep-alive {:.1} s expired",
            keep.keep_alive_us as f64 / 1e6
        );
        return if loaded {
            out(WarmAction::Unload, None, r)
        } else {
            out(WarmAction::StayCold, None, r)
        };
    }
    let load_at = keep
        .prewarm_after_us
        .map(|p| last.saturating_add(p).saturating_sub(load_us))
        .filter(|&t| t > last.saturating_add(min_gap_us));
    match load_at {
        Some(t) if now_us < t => {
            let r = format!(
                "next call expected in {:.1} s: unloaded until {:.1} s before it",
                t.saturating_add(load_us).saturating_sub(now_us) as f64 / 1e6,
                load_us as f64 / 1e6
            );
            if loaded {
                out(WarmAction::Unload, Some(t), r)
            } else {
                out(WarmAction::StayCold, Some(t), r)
            }
        }
        Some(_) => {
            let r = format!(
                "pre-warm window: next call expected, keep until {:.1} s from now",
                (expiry - now_us) as f64 / 1e6
            );
            if loaded {
                out(WarmAction::Keep, Some(expiry), r)
            } else {
                out(WarmAction::Load, Some(expiry), r)
            }
        }
        None => {
            let r = format!(
                "within keep-alive ({:.1} s left)",
                (expiry - now_us) as f64 / 1e6
            );
            if loaded {
                out(WarmAction::Keep, Some(expiry), r)
            } else {
                out(WarmAction::StayCold, Some(expiry), r)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demand::KeepAliveSource;

    const S: u64 = 1_000_000;

    fn ka(pre: Option<u64>, keep: u64) -> KeepAlive {
        KeepAlive {
            prewarm_after_us: pre,
            keep_alive_us: keep,
            source: KeepAliveSource::Histogram,
            reason: String::new(),
        }
    }

    #[test]
    fn unload_then_prewarm_then_expire() {
        let k = ka(Some(100 * S), 130 * S);
        let p = plan(&k, Some(0), S, true, false, 5 * S, S);
        assert_eq!(p.action, WarmAction::Unload);
        assert_eq!(p.next_check_us, Some(95 * S));
        let p = plan(&k, Some(0), 95 * S, false, false, 5 * S, S);
        assert_eq!(p.action, WarmAction::Load);
        assert_eq!(p.next_check_us, Some(130 * S));
        assert_eq!(
            plan(&k, Some(0), 120 * S, true, false, 5 * S, S).action,
            WarmAction::Keep
        );
        assert_eq!(
            plan(&k, Some(0), 130 * S, true, false, 5 * S, S).action,
            WarmAction::Unload
        );
        assert_eq!(
            plan(&k, Some(0), 50 * S, true, true, 5 * S, S).action,
            WarmAction::Keep
        );
    }

    #[test]
    fn short_gaps_stay_loaded() {
        // The load takes longer than the gap: keep it.
        let k = ka(Some(3 * S), 10 * S);
        let p = plan(&k, Some(0), S, true, false, 5 * S, S);
        assert_eq!(p.action, WarmAction::Keep);
        let k = ka(None, 10 * S);
        assert_eq!(
            plan(&k, Some(0), S, true, false, 0, 0).action,
            WarmAction::Keep
        );
        assert_eq!(
            plan(&k, None, S, true, false, 0, 0).action,
            WarmAction::Unload
        );
    }

    #[test]
    fn extreme_times() {
        let k = ka(Some(u64::MAX), u64::MAX);
        for now in [0, u64::MAX] {
            for last in [None, Some(0), Some(u64::MAX)] {
                let p = plan(&k, last, now, true, false, u64::MAX, u64::MAX);
                assert!(!p.reason.is_empty() || p.action == WarmAction::Keep);
            }
        }
    }
}
