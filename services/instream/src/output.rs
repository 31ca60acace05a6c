//! How operator commands print: `--output table` for people, `--output json` for scripts.

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// `--output table|json`, declared once for every command that prints.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct OutputArg {
    #[arg(long, value_enum, default_value = "table")]
    pub output: Output,
}

/// Writes command output; a reader that went away (`instream dlq tail | head`) is not an
/// error.
pub fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Fails (after everything read was printed) when a read of `topic` skipped records: each
/// skipped range on stderr, and a non-zero exit.
pub fn fail_on_skipped(topic: &str, skipped: &[instream_kafka::Lost]) -> anyhow::Result<()> {
    if skipped.is_empty() {
        return Ok(());
    }
    for lost in skipped {
        eprintln!("skipped: {lost}");
    }
    let records: u64 = skipped.iter().map(instream_kafka::Lost::count).sum();
    anyhow::bail!(
        "reading `{topic}` skipped {records} records in {} ranges (deleted while being read, or \
         skipped by the broker); what was read is above",
        skipped.len()
    )
}

/// Prints `value` as one line of JSON.
pub fn emit_json(value: &serde_json::Value) -> anyhow::Result<()> {
    emit(&format!("{value}\n"))
}

/// Columns padded to their widest cell, two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(cell);
            out.extend(std::iter::repeat_n(' ', width - cell.chars().count()));
        }
        text.push_str(out.trim_end());
        text.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_line_up() {
        let text = super::table(
            &["name", "n"],
            &[
                vec!["orders".into(), "1".into()],
                vec!["x".into(), "12".into()],
            ],
        );
        assert_eq!(text, "name    n\norders  1\nx       12\n");
    }
}
