//! Versioned reference data. `instream refdata load` writes a whole new version of one rule's
//! data under its own key prefix, then switches the rule's version pointer and announces it;
//! enrichers look keys up under the version the pointer names. A half-loaded version is never
//! read, and the switch is one `SET`.
//!
//! Keys (`P` pipeline, `R` rule, `N` version):
//! - `instream:refdata:P:R:version` — the current version;
//! - `instream:refdata:P:R:next` — the last version handed out (`INCR`), so two loads never
//!   write into one version;
//! - `instream:refdata:P:R:vN:<key>` — a record of version N (`<key>` is the rule's rendered
//!   key template, e.g. `customer:c1`);
//! - channel `instream:refdata:changes` — `P:R:N` published after a switch.
//!
//! A rule whose pointer is absent is looked up under its plain rendered key, for data
//! maintained by other tools.

/// The pub/sub channel version switches are announced on.
pub const CHANGES_CHANNEL: &str = "instream:refdata:changes";

pub fn pointer_key(pipeline: &str, rule: &str) -> String {
    format!("instream:refdata:{pipeline}:{rule}:version")
}

pub fn counter_key(pipeline: &str, rule: &str) -> String {
    format!("instream:refdata:{pipeline}:{rule}:next")
}

/// The prefix of every key of one version.
pub fn version_prefix(pipeline: &str, rule: &str, version: u64) -> String {
    format!("instream:refdata:{pipeline}:{rule}:v{version}:")
}

/// Parses a change announcement `P:R:N`.
pub fn parse_change(message: &str) -> Option<(String, String, u64)> {
    let (rest, version) = message.rsplit_once(':')?;
    let (pipeline, rule) = rest.split_once(':')?;
    Some((pipeline.to_owned(), rule.to_owned(), version.parse().ok()?))
}

/// The version segment of a data key of (`pipeline`, `rule`), if it is one.
pub fn version_of_key(pipeline: &str, rule: &str, key: &str) -> Option<u64> {
    let rest = key.strip_prefix(&format!("instream:refdata:{pipeline}:{rule}:v"))?;
    rest.split_once(':')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_announcements_round_trip() {
        let key = format!("{}customer:c1", version_prefix("orders", "customer", 7));
        assert_eq!(key, "instream:refdata:orders:customer:v7:customer:c1");
        assert_eq!(version_of_key("orders", "customer", &key), Some(7));
        assert_eq!(version_of_key("orders", "other", &key), None);
        assert_eq!(
            parse_change("orders:customer:7"),
            Some(("orders".into(), "customer".into(), 7))
        );
        assert_eq!(parse_change("nonsense"), None);
    }
}
