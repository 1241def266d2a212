//! Robust statistics of a series: median, Theil–Sen slope, growth share; and
//! the rate test of the live alerts.

/// The median of `v` (the mean of the two middle values for an even count).
pub fn median(v: &mut [f64]) -> Option<f64> {
    let n = v.len();
    if n == 0 {
        return None;
    }
    let (_, &mut hi, _) = v.select_nth_unstable_by(n / 2, f64::total_cmp);
    if n % 2 == 1 {
        return Some(hi);
    }
    let lo = v[..n / 2].iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((lo + hi) / 2.0)
}

/// The Theil–Sen estimator of the slope of `y` over `t`: the median of the
/// slopes between every pair of points. Unlike a least-squares fit it ignores
/// up to ~29% of wild points, and a plateau of noise gives a slope near 0.
/// `None` for fewer than two distinct times.
pub fn theil_sen(t: &[f64], y: &[f64]) -> Option<f64> {
    let n = t.len().min(y.len());
    let mut slopes = Vec::with_capacity(n * n.saturating_sub(1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            let dt = t[j] - t[i];
            if dt > 0.0 {
                slopes.push((y[j] - y[i]) / dt);
            }
        }
    }
    median(&mut slopes)
}

/// Of every pair of samples whose values differ, the share in which the later
/// one is larger (the Mann–Kendall statistic, as a share): 1 for a series that
/// only grows, about 0.5 for noise around a plateau. Unlike the share of single
/// intervals that grew, it sees a trend under noise larger than the growth per
/// interval, and bursts between flat stretches. `None` if all values are equal.
pub fn growth_share(y: &[f64]) -> Option<f64> {
    let (mut up, mut down) = (0u64, 0u64);
    for i in 0..y.len() {
        for j in i + 1..y.len() {
            if y[j] > y[i] {
                up += 1;
            } else if y[j] < y[i] {
                down += 1;
            }
        }
    }
    (up + down > 0).then(|| up as f64 / (up + down) as f64)
}

/// The rate of a growth of `delta` bytes in `dt_s` seconds, if it exceeds
/// `limit` bytes per second.
pub fn over_rate(delta: i64, dt_s: f64, limit: f64) -> Option<f64> {
    if dt_s <= 0.0 {
        return None;
    }
    let rate = delta as f64 / dt_s;
    (rate > limit).then_some(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn theil_sen_ignores_outliers() {
        let t: Vec<f64> = (0..10).map(f64::from).collect();
        let mut y: Vec<f64> = t.iter().map(|x| 3.0 * x + 1.0).collect();
        assert_eq!(theil_sen(&t, &y), Some(3.0));
        y[7] = 1000.0;
        y[2] = -500.0;
        assert_eq!(theil_sen(&t, &y), Some(3.0));
        assert_eq!(theil_sen(&t, &[5.0; 10]), Some(0.0));
        assert_eq!(theil_sen(&[1.0], &[1.0]), None);
        assert_eq!(theil_sen(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn rates() {
        assert_eq!(over_rate(2048, 2.0, 1000.0), Some(1024.0));
        assert_eq!(over_rate(1000, 2.0, 1000.0), None);
        assert_eq!(over_rate(-5000, 1.0, 1000.0), None);
        assert_eq!(over_rate(5000, 0.0, 1000.0), None);
    }
}
