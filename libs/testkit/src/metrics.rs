/// The sum of the samples of `metric` whose line contains `filter` (e.g.
/// `service="aggregator"`) in a Prometheus text exposition, and how many lines matched. For
/// tests and load drivers that watch a service's /metrics.
pub fn metric_sum(exposition: &str, metric: &str, filter: &str) -> (f64, usize) {
    let lines: Vec<&str> = exposition
        .lines()
        .filter(|l| l.starts_with(metric) && l.contains(filter))
        .collect();
    let sum = lines
        .iter()
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    (sum, lines.len())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_the_matching_lines() {
        let text = "# TYPE x counter\nx{a=\"1\"} 2\nx{a=\"2\"} 3\nxy{a=\"1\"} 7\n";
        assert_eq!(super::metric_sum(text, "x{", "a="), (5.0, 2));
        assert_eq!(super::metric_sum(text, "x{", "a=\"2\""), (3.0, 1));
    }
}
