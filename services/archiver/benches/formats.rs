//! Raw events into archive files on local disk: decode each record (as the archiver does, for
//! its time), append it, finish the file and write it out with fsync — zstd JSON lines, and
//! Parquet with and without typed columns. Throughput is in bytes of raw JSON in. Realistic
//! ~300-byte Nexmark-shaped bid envelopes, 100,000 per file (two Parquet row groups).
//!
//! `cargo bench -p instream-archiver --bench formats`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use instream_archiver::FileWriter;
use instream_pipeline::{ArchiveColumn, ArchiveFormat, ColumnType};

const RECORDS: usize = 100_000;

fn records() -> Vec<Vec<u8>> {
    (0..RECORDS)
        .map(|i| {
            let channel = ["Google", "Facebook", "Baidu", "Apple"][i % 4];
            serde_json::json!({
                "event_id": format!("0192b3c4-5d6e-7f80-9a1b-{i:012x}"),
                "pipeline": "bids",
                "key": format!("{}", 1000 + i % 5_000),
                "event_time": 1_714_564_800_000i64 + i as i64 * 7,
                "ingest_time": 1_714_564_800_000i64 + i as i64 * 7 + 40,
                "payload": {
                    "auction": 1000 + i % 5_000,
                    "bidder": 2000 + (i * 7919) % 10_000,
                    "price": 100 + (i * 31) % 90_000,
                    "channel": channel,
                    "url": format!("https://www.nexmark.com/item.htm?query=1&channel_id={}", i % 997),
                    "date_time": format!("2024-05-01T12:{:02}:{:02}.{:03}Z", (i / 60_000) % 60, (i / 1000) % 60, i % 1000),
                    "extra": "x"
                }
            })
            .to_string()
            .into_bytes()
        })
        .collect()
}

fn columns() -> Vec<ArchiveColumn> {
    let c = |name: &str, kind| ArchiveColumn {
        name: name.into(),
        path: name.parse().unwrap(),
        kind,
    };
    vec![
        c("auction", ColumnType::Int64),
        c("bidder", ColumnType::Int64),
        c("price", ColumnType::Int64),
        c("channel", ColumnType::String),
    ]
}

fn write(
    format: ArchiveFormat,
    columns: &[ArchiveColumn],
    records: &[Vec<u8>],
    disk: &std::path::Path,
) -> usize {
    let mut file = FileWriter::new(format, columns, 3).unwrap();
    for (offset, raw) in records.iter().enumerate() {
        let event = instream_event::decode(raw).unwrap();
        file.append(offset as i64, raw, &event).unwrap();
    }
    let bytes = file.finish().unwrap();
    let mut out = std::fs::File::create(disk).unwrap();
    std::io::Write::write_all(&mut out, &bytes).unwrap();
    out.sync_all().unwrap();
    bytes.len()
}

fn formats(c: &mut Criterion) {
    let records = records();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("file");
    let bytes: usize = records.iter().map(Vec::len).sum();
    println!(
        "{} records, {:.0} bytes each on average",
        records.len(),
        bytes as f64 / records.len() as f64
    );
    let mut group = c.benchmark_group("archive_file");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.sample_size(10);
    let cases: [(&str, ArchiveFormat, Vec<ArchiveColumn>); 3] = [
        ("json_lines_zstd", ArchiveFormat::JsonLines, Vec::new()),
        ("parquet_raw", ArchiveFormat::Parquet, Vec::new()),
        ("parquet_typed_columns", ArchiveFormat::Parquet, columns()),
    ];
    for (name, format, columns) in &cases {
        let size = write(*format, columns, &records, &disk);
        println!("{name}: {bytes} bytes in, {size} bytes out");
        group.bench_function(*name, |b| {
            b.iter(|| write(*format, columns, &records, &disk))
        });
    }
    group.finish();
}

criterion_group!(benches, formats);
criterion_main!(benches);
