//! Statistics over a set of runs: medians per cell, ratios, and cells whose
//! runs disagree too much to trust their median.
use std::time::Duration;

use super::env::Env;
use super::options::{Config, Options, Scenario, Workload};
use super::run::Run;

/// Median, min and max of a set of values.
pub(super) struct Stats {
    pub(super) median: f64,
    pub(super) min: f64,
    pub(super) max: f64,
}

pub(super) fn stats(values: &[f64]) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stats {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

/// A set of runs with what they ran under: what the results' tables and
/// the targets are computed from.
pub(super) struct Report<'a> {
    pub(super) opts: &'a Options,
    pub(super) env: &'a Env,
    /// The runs this report covers (all of them, or one scenario's).
    pub(super) runs: Vec<&'a Run>,
    pub(super) failures: &'a [String],
    pub(super) load_before: String,
    pub(super) load_after: String,
    pub(super) elapsed: Duration,
}

/// A cell is unstable when its slowest run takes more than this many times
/// its fastest.
pub(super) const UNSTABLE_SPREAD: f64 = 4.0;

/// max/min of a cell's ns/pair values when over `UNSTABLE_SPREAD` (two runs
/// at least; the untraced loop's ~15 ns excluded: a timer tick alone can
/// spread it).
pub(super) fn unstable_spread(values: &[f64]) -> Option<f64> {
    let st = stats(values)?;
    (values.len() >= 2 && st.min >= 100.0 && st.max > UNSTABLE_SPREAD * st.min)
        .then(|| st.max / st.min)
}

impl<'a> Report<'a> {
    pub(super) fn runs_of(&self, w: Workload, c: Config) -> impl Iterator<Item = &'a Run> + '_ {
        self.runs
            .iter()
            .copied()
            .filter(move |r| r.workload == w && r.config == c)
    }

    pub(super) fn values(&self, w: Workload, c: Config) -> Vec<f64> {
        self.runs_of(w, c).map(|r| r.ns_per_pair).collect()
    }

    pub(super) fn median(&self, w: Workload, c: Config) -> Option<f64> {
        stats(&self.values(w, c)).map(|st| st.median)
    }

    /// The same report restricted to one scenario's runs.
    pub(super) fn of_scenario(&self, sc: Scenario) -> Report<'a> {
        Report {
            opts: self.opts,
            env: self.env,
            runs: self
                .runs
                .iter()
                .copied()
                .filter(|r| r.scenario == sc)
                .collect(),
            failures: self.failures,
            load_before: self.load_before.clone(),
            load_after: self.load_after.clone(),
            elapsed: self.elapsed,
        }
    }

    /// The scenario the targets are stated for (1 thread, 64 B), else the
    /// first one run.
    pub(super) fn headline(&self) -> Option<Scenario> {
        let scs = self.opts.scenarios();
        scs.iter()
            .copied()
            .find(|s| s.is_headline())
            .or(scs.first().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unstable_cells_are_flagged() {
        // The headline cell of a noisy run: 3 of 5 runs at ~20x.
        let noisy = [44_061.0, 2_194.0, 2_332.0, 15_692.0, 40_746.0];
        assert_eq!(unstable_spread(&noisy).map(|x| x.round()), Some(20.0));
        assert_eq!(unstable_spread(&[2_060.0, 2_100.0, 2_400.0]), None);
        // One run, or the untraced loop (tens of ns): never.
        assert_eq!(unstable_spread(&[44_061.0]), None);
        assert_eq!(unstable_spread(&[13.6, 409.0]), None);
    }

    #[test]
    fn medians() {
        let s = stats(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
    }
}
