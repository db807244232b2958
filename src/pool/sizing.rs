//! A pool sized by its load: `-workers min-max` with spare targets, as
//! Apache's MinSpareServers/MaxSpareServers.
//!
//! The model moves the pool's target, one worker at a time, and the rest
//! of the pool follows it as it follows `pool resize`:
//! a missing worker is started, a surplus one retired (idle ones first).
//! One more worker is wanted when fewer than `-minspare` are idle or
//! starting, or when more connections wait in the queue than workers are
//! starting (the queue's depth, `pool info`'s `queued`);
//! one fewer when more than `-maxspare` have been idle for `-idletimeout`.
//! Never more than one change per `INTERVAL`, never while the last change
//! is still under way (a start not yet forked, a back-off after failures,
//! a reload whose generation is starting), never outside the range.
//!
//! A fixed `-workers N` is the range `N-N`: nothing here ever moves it.
//! The decision is `model::sizing`'s (`model::turn` counts the load);
//! this file parses `-workers` and the spare targets.

use crate::tcl::{Interp, Obj, TclError, TclResult};

pub use super::model::sizing::Sizing;
use super::model::sizing::MAX_WORKERS;

impl Sizing {
    /// Sets the spare targets: an option not given follows the other
    /// (a `-minspare` above the default `-maxspare` raises it, a
    /// `-maxspare` below the default `-minspare` lowers it).
    pub fn set_spares(&mut self, min_spare: Option<usize>, max_spare: Option<usize>) -> TclResult<()> {
        let (min_spare, max_spare) = Sizing::spares(min_spare, max_spare)
            .map_err(|message| TclError::new(message, &["TCL", "VALUE", "SPARE"]))?;
        self.min_spare = min_spare;
        self.max_spare = max_spare;
        Ok(())
    }
}

/// `-workers` (and `pool resize`): `N`, or a range `min-max`, each from 1
/// to `MAX_WORKERS`.
pub fn parse_workers(interp: Interp, value: &Obj) -> TclResult<(usize, usize)> {
    let text = value.to_string_lossy();
    let range = text.trim().split_once('-').filter(|(low, _)| !low.is_empty());
    let Some((low, high)) = range else {
        let n = crate::command::positive(interp, value)? as usize;
        return within_limit(n).map(|n| (n, n));
    };
    let bad = |why: String| TclError::new(format!("bad range \"{text}\": {why}"), &["TCL", "VALUE", "RANGE"]);
    let (Ok(low), Ok(high)) = (low.trim().parse::<i64>(), high.trim().parse::<i64>()) else {
        return Err(TclError::new(
            format!("expected positive integer or range min-max but got \"{text}\""),
            &["TCL", "VALUE", "NUMBER"],
        ));
    };
    if low < 1 {
        return Err(bad("the minimum must be at least 1".into()));
    }
    if high < low {
        return Err(bad(format!("the minimum {low} is above the maximum {high}")));
    }
    let low = within_limit(usize::try_from(low).unwrap_or(usize::MAX))?;
    let high = within_limit(usize::try_from(high).unwrap_or(usize::MAX))?;
    Ok((low, high))
}

fn within_limit(n: usize) -> TclResult<usize> {
    if n > MAX_WORKERS {
        return Err(TclError::new(
            format!("too many workers \"{n}\": must be at most {MAX_WORKERS}"),
            &["TCL", "VALUE", "NUMBER"],
        ));
    }
    Ok(n)
}
