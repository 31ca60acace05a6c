//! The job a run drives: the options, the built-in Nexmark job or the user's definitions,
//! events and reference data.

use std::path::{Path, PathBuf};

use crate::{Error, AGGREGATION, BIDDERS, BY_CITY, PIPELINE};

pub(crate) struct Options {
    pub(crate) events: usize,
    pub(crate) rate: Option<f64>,
    pub(crate) connections: usize,
    pub(crate) batch: usize,
    pub(crate) partitions: i32,
    pub(crate) repartitioned: bool,
    pub(crate) definitions: Option<PathBuf>,
    pub(crate) events_file: Option<PathBuf>,
    pub(crate) refdata: Option<PathBuf>,
    pub(crate) prefill: bool,
}

pub(crate) fn options() -> Result<Options, Error> {
    let mut o = Options {
        events: 1_000_000,
        rate: None,
        connections: 4,
        batch: 2_000,
        partitions: 4,
        repartitioned: false,
        definitions: None,
        events_file: None,
        refdata: None,
        prefill: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let (name, value) = (pair[0].as_str(), pair.get(1));
        let value = value.ok_or(format!("{name} needs a value"))?;
        let number =
            || -> Result<u64, Error> { Ok(value.parse().map_err(|e| format!("{name}: {e}"))?) };
        match name {
            "--events" => o.events = number()?.max(1) as usize,
            "--rate" => o.rate = Some(number()?).filter(|&n| n > 0).map(|n| n as f64),
            "--connections" => o.connections = number()?.max(1) as usize,
            "--batch" => o.batch = number()?.max(1) as usize,
            "--partitions" => o.partitions = number()?.clamp(1, 64) as i32,
            "--repartitioned" => o.repartitioned = number()? > 0,
            "--prefill" => o.prefill = number()? > 0,
            "--definitions" => o.definitions = Some(value.into()),
            "--events-file" => o.events_file = Some(value.into()),
            "--refdata" => o.refdata = Some(value.into()),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    if o.definitions.is_some() && o.repartitioned {
        return Err("--repartitioned 1 adds to the built-in job; add the aggregation to your definitions instead".into());
    }
    Ok(o)
}

pub(crate) fn definitions(partitions: i32, repartitioned: bool) -> String {
    let by_city = if repartitioned {
        format!(
            r#"[[pipelines.aggregations]]
name = "{BY_CITY}"
group_by = ["enrichment.bidder_city"]
window = {{ kind = "tumbling", size = "1h" }}
"#
        )
    } else {
        String::new()
    };
    format!(
        r#"[[pipelines]]
name = "{PIPELINE}"
key_field = "auction"
time_field = "date_time"
partitions = {partitions}
[[pipelines.enrichments]]
name = "bidder"
key_template = "person:{{bidder}}"
fields = {{ name = "bidder_name", city = "bidder_city", state = "bidder_state" }}
[[pipelines.aggregations]]
name = "{AGGREGATION}"
window = {{ kind = "tumbling", size = "1h" }}
functions = [{{ fn = "sum", field = "payload.price" }}]
{by_city}"#
    )
}

/// What the run drives: the definitions the services read, and the pipeline events go to.
pub(crate) struct Job {
    pub(crate) definitions: String,
    pub(crate) pipeline: instream_pipeline::PipelineDefinition,
    pub(crate) builtin: bool,
}

pub(crate) fn job(o: &Options) -> Result<Job, Error> {
    let (definitions, builtin) = match &o.definitions {
        Some(path) => (
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
            false,
        ),
        None => (definitions(o.partitions, o.repartitioned), true),
    };
    let pipeline = instream_pipeline::parse_document(&definitions)?
        .pipelines
        .into_iter()
        .next()
        .ok_or("the definitions hold no pipeline")?;
    Ok(Job {
        definitions,
        pipeline,
        builtin,
    })
}

/// The NDJSON bodies of a file: its non-blank lines, in requests of `batch`; and their count.
pub(crate) fn file_bodies(path: &Path, batch: usize) -> Result<(Vec<bytes::Bytes>, usize), Error> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let lines: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .collect();
    let bodies = lines
        .chunks(batch)
        .map(|chunk| {
            let mut body = Vec::with_capacity(chunk.iter().map(|l| l.len() + 1).sum());
            for line in chunk {
                body.extend_from_slice(line);
                body.push(b'\n');
            }
            bytes::Bytes::from(body)
        })
        .collect();
    Ok((bodies, lines.len()))
}

/// Writes the reference data of `path` (lines `{"key": …, "value": …}`) into Redis at `url`:
/// an object as a hash of its fields (a string as it is, anything else as JSON), anything
/// else as a string. Returns how many keys.
pub(crate) async fn seed_refdata(url: &str, path: &Path) -> Result<usize, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut pipe = redis::pipe();
    let mut keys = 0;
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = format!("{}:{}", path.display(), i + 1);
        let entry: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{at}: {e}"))?;
        let key = entry["key"]
            .as_str()
            .ok_or(format!("{at}: no string `key`"))?;
        let text_of = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        match &entry["value"] {
            serde_json::Value::Object(fields) if !fields.is_empty() => {
                let hset = pipe.cmd("HSET").arg(key);
                for (field, value) in fields {
                    hset.arg(field).arg(text_of(value));
                }
                hset.ignore();
            }
            serde_json::Value::Null => return Err(format!("{at}: no `value`").into()),
            value => {
                pipe.cmd("SET").arg(key).arg(text_of(value)).ignore();
            }
        }
        keys += 1;
    }
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    pipe.query_async::<()>(&mut conn).await?;
    Ok(keys)
}

/// The NDJSON bodies: `events` bids in requests of `batch`, from `start` on over at most an
/// hour of event time (a millisecond apart while that fits), over 977 auctions and
/// [`BIDDERS`] bidders.
pub(crate) fn bodies(events: usize, batch: usize, start: i64) -> Vec<bytes::Bytes> {
    let span = events.min(3_600_000) as i64;
    let mut out = Vec::with_capacity(events / batch + 1);
    let mut body = Vec::with_capacity(batch * 230);
    for i in 0..events {
        let auction = 1000 + i % 977;
        let time = instream_event::format_rfc3339_millis(start + i as i64 * span / events as i64);
        body.extend_from_slice(
            format!(
                r#"{{"auction":{auction},"bidder":{b},"price":{p},"channel":"channel-{c}","url":"https://www.nexmark.com/{auction}/item.htm?query=1&channel_id={c}","date_time":"{time}","extra":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#,
                b = (i * 7919) % BIDDERS,
                p = 100 + i % 9000,
                c = i % 50,
            )
            .as_bytes(),
        );
        body.push(b'\n');
        if (i + 1) % batch == 0 || i + 1 == events {
            out.push(bytes::Bytes::from(std::mem::take(&mut body)));
        }
    }
    out
}
