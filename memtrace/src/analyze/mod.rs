//! Leak analysis, pure (no I/O, tested without root): the per-site history
//! sampled every `--interval`, robust trends, and the verdicts that tell leaks
//! from caches. One file per part, in the order data flows: [`blocks`] (a
//! sample's outstanding blocks by site), [`history`], [`stats`] (median,
//! Theil–Sen, growth share), [`verdict`] (the rules), [`process`] (the
//! process's own memory over the run).
//!
//! # History
//!
//! Every interval the session records, for every site that has held a block,
//! its outstanding bytes and blocks, and (when every outstanding block was
//! scanned) the age of its oldest and of its median block; plus the total and
//! a sample of the process
//! ([`ProcStat`](crate::process::stat::ProcStat)). The history holds at most
//! [`HISTORY_CAPACITY`] samples: when it is full, every other sample is dropped
//! and from then on only one interval in two is recorded (then one in four,
//! ...). Unlike a ring that forgets the oldest samples, this keeps the whole run
//! in view at a coarser resolution, which the verdicts need: a leak is growth
//! *over the run*. A site's history starts at the first sample where it holds a
//! block. The final, partial interval is always sampled (replacing the previous
//! sample if that was less than a quarter interval before), so short runs get
//! data too.
//!
//! # Verdicts
//!
//! See [`assess`] for the rules and [`VerdictConfig`] for the thresholds.
mod blocks;
pub mod fds;
mod history;
pub mod mappings;
mod process;
mod stats;
pub mod threads;
mod verdict;

pub use blocks::{BlockGrouper, SiteBlocks};
pub use history::{HISTORY_CAPACITY, History, SampleAges, SiteHistory};
pub use process::{ProcessSummary, summarize_process};
pub use stats::over_rate;
pub use verdict::{Trend, Verdict, VerdictConfig, assess};
