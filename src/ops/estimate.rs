//! Drain-rate and ETA arithmetic over depth or lag samples; pure, so it is tested without a broker.

use serde::Serialize;

/// Below this many messages per second a backlog is treated as not moving.
const STALL_RATE: f64 = 1e-3;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the first sample.
    pub at_secs: f64,
    pub depth: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainState {
    Empty,
    Draining,
    Growing,
    Stalled,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrainEstimate {
    /// Seconds between the first and the last sample; `null` without samples.
    pub window_secs: Option<f64>,
    /// Messages arriving per second, when the broker reports it.
    pub inflow_rate: Option<f64>,
    /// Messages consumed for good per second, when the broker reports it.
    pub outflow_rate: Option<f64>,
    /// Backlog shrink rate in messages per second (negative: growing).
    pub net_drain_rate: Option<f64>,
    pub eta_secs: Option<f64>,
    pub state: DrainState,
    /// How `net_drain_rate` was obtained: "depth-samples", or "broker-rates" when the depth did not
    /// move and the broker reported both rates.
    pub method: &'static str,
}

/// Least-squares shrink rate of the samples (positive when the depth falls); `None` with fewer
/// than two samples or no time between them.
pub fn shrink_rate(samples: &[Sample]) -> Option<f64> {
    if samples.len() < 2 {
        return None;
    }
    let count = samples.len() as f64;
    let mean_t = samples.iter().map(|s| s.at_secs).sum::<f64>() / count;
    let mean_d = samples.iter().map(|s| s.depth as f64).sum::<f64>() / count;
    let variance: f64 = samples.iter().map(|s| (s.at_secs - mean_t).powi(2)).sum();
    if variance <= f64::EPSILON {
        return None;
    }
    let covariance: f64 = samples
        .iter()
        .map(|s| (s.at_secs - mean_t) * (s.depth as f64 - mean_d))
        .sum();
    Some(-(covariance / variance))
}

/// Where the backlog is heading at `net_drain_rate`, and when it will be empty.
pub fn project(depth: Option<u64>, net_drain_rate: Option<f64>) -> (DrainState, Option<f64>) {
    match (depth, net_drain_rate) {
        (Some(0), _) => (DrainState::Empty, Some(0.0)),
        (Some(depth), Some(rate)) if rate > STALL_RATE => {
            (DrainState::Draining, Some(depth as f64 / rate))
        }
        (Some(_), Some(rate)) if rate < -STALL_RATE => (DrainState::Growing, None),
        (Some(_), Some(_)) => (DrainState::Stalled, None),
        _ => (DrainState::Unknown, None),
    }
}

/// Combines sampled depths with the broker's own rates. Depth samples win when the depth moved
/// during the window, because they also see expiry and dead-lettering, which no rate counts.
pub fn estimate(
    samples: &[Sample],
    inflow_rate: Option<f64>,
    outflow_rate: Option<f64>,
) -> DrainEstimate {
    let depth = samples.last().map(|sample| sample.depth);
    let moved = samples
        .windows(2)
        .any(|pair| pair[0].depth != pair[1].depth);
    // An unknown rate is not zero: without both the net rate is left to the samples.
    let from_rates = match (inflow_rate, outflow_rate) {
        (Some(inflow), Some(outflow)) => Some(outflow - inflow),
        _ => None,
    };
    let (net, method) = match (moved, from_rates) {
        (false, Some(rate)) => (Some(rate), "broker-rates"),
        _ => (shrink_rate(samples), "depth-samples"),
    };
    let (state, eta_secs) = project(depth, net);
    DrainEstimate {
        window_secs: samples.last().map(|sample| sample.at_secs),
        inflow_rate,
        outflow_rate,
        net_drain_rate: net,
        eta_secs,
        state,
        method,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(points: &[(f64, u64)]) -> Vec<Sample> {
        points
            .iter()
            .map(|&(at_secs, depth)| Sample { at_secs, depth })
            .collect()
    }

    #[test]
    fn shrinking_depth_gives_rate_and_eta() {
        let estimate = estimate(&samples(&[(0.0, 1000), (1.0, 900), (2.0, 800)]), None, None);
        assert_eq!(estimate.net_drain_rate, Some(100.0));
        assert_eq!(estimate.state, DrainState::Draining);
        assert_eq!(estimate.eta_secs, Some(8.0));
        assert_eq!(estimate.method, "depth-samples");
    }

    #[test]
    fn growing_depth_has_no_eta() {
        let estimate = estimate(&samples(&[(0.0, 10), (2.0, 30)]), None, None);
        assert_eq!(estimate.state, DrainState::Growing);
        assert_eq!(estimate.eta_secs, None);
        assert_eq!(estimate.net_drain_rate, Some(-10.0));
    }

    #[test]
    fn flat_depth_falls_back_to_broker_rates() {
        let flat = samples(&[(0.0, 500), (5.0, 500)]);
        let draining = estimate(&flat, Some(10.0), Some(60.0));
        assert_eq!(draining.method, "broker-rates");
        assert_eq!(draining.net_drain_rate, Some(50.0));
        assert_eq!(draining.eta_secs, Some(10.0));
        assert_eq!(estimate(&flat, None, None).state, DrainState::Stalled);
        assert_eq!(
            estimate(&flat, Some(5.0), Some(5.0)).state,
            DrainState::Stalled
        );
        // One rate unknown: not taken as zero, the flat samples decide.
        let half_known = estimate(&flat, Some(5.0), None);
        assert_eq!(half_known.method, "depth-samples");
        assert_eq!(half_known.state, DrainState::Stalled);
        assert_eq!(estimate(&flat, None, Some(5.0)).state, DrainState::Stalled);
    }

    #[test]
    fn empty_and_unknown() {
        assert_eq!(project(Some(0), None), (DrainState::Empty, Some(0.0)));
        assert_eq!(project(None, Some(3.0)), (DrainState::Unknown, None));
        let nothing = estimate(&[], None, None);
        assert_eq!(nothing.state, DrainState::Unknown);
        assert_eq!(nothing.window_secs, None);
        assert_eq!(nothing.net_drain_rate, None);
        assert_eq!(shrink_rate(&samples(&[(1.0, 5), (1.0, 9)])), None);
    }
}
