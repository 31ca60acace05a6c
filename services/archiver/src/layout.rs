//! File names: `<pipeline>/dt=YYYY-MM-DD/hour=HH/part-<partition>-<first>-<last>.<ext>`, the
//! extension naming the format (`jsonl.zst` or `parquet`).

use instream_pipeline::ArchiveFormat;
use time::OffsetDateTime;

use crate::format::{extension, format_of};

const HOUR_MS: i64 = 3_600_000;

/// The folder of a record whose layout time is `millis`, and the start of its hour.
pub fn folder(pipeline: &str, millis: i64) -> (String, i64) {
    let hour_start = millis.div_euclid(HOUR_MS) * HOUR_MS;
    let t = OffsetDateTime::from_unix_timestamp(hour_start / 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    (
        format!(
            "{pipeline}/dt={:04}-{:02}-{:02}/hour={:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour()
        ),
        hour_start,
    )
}

pub fn file_name(format: ArchiveFormat, partition: i32, first: i64, last: i64) -> String {
    format!("part-{partition}-{first}-{last}.{}", extension(format))
}

/// The prefix of every file name of one partition (also of its in-progress files).
pub fn partition_prefix(partition: i32) -> String {
    format!("part-{partition}-")
}

/// `(partition, first, last)` of a file name made by [`file_name`] (with one of our formats'
/// extensions).
pub fn parse_file_name(path: &str) -> Option<(i32, i64, i64)> {
    let name = path.rsplit('/').next()?;
    let format = format_of(name)?;
    let offsets = instream_archive::file_offsets(name)?;
    (name == file_name(format, offsets.0, offsets.1, offsets.2)).then_some(offsets)
}

/// `dt=YYYY-MM-DD/hour=HH` of a file's path, for counts per hour.
pub fn hour_of(path: &str) -> Option<String> {
    let mut segments = path.rsplit('/').skip(1);
    let hour = segments.next()?.strip_prefix("hour=")?;
    let day = segments.next()?.strip_prefix("dt=")?;
    Some(format!("{day}T{hour}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_and_names_round_trip() {
        let (dir, start) = folder("orders", 1_714_565_000_123);
        assert_eq!(dir, "orders/dt=2024-05-01/hour=12");
        assert_eq!(start, 1_714_564_800_000);
        let name = file_name(ArchiveFormat::JsonLines, 3, 100, 199);
        assert_eq!(name, "part-3-100-199.jsonl.zst");
        assert_eq!(
            parse_file_name(&format!("{dir}/{name}")),
            Some((3, 100, 199))
        );
        let name = file_name(ArchiveFormat::Parquet, 12, 0, 5);
        assert_eq!(name, "part-12-0-5.parquet");
        assert_eq!(parse_file_name(&name), Some((12, 0, 5)));
        assert!(name.starts_with(&partition_prefix(12)));
        assert!(!name.starts_with(&partition_prefix(1)));
        assert_eq!(parse_file_name("orders/x.txt"), None);
        assert_eq!(parse_file_name("orders/part-1-2.parquet"), None);
        assert_eq!(
            hour_of(&format!("{dir}/{name}")).as_deref(),
            Some("2024-05-01T12")
        );
        assert_eq!(hour_of("part-1-2-3.parquet"), None);
    }
}
