//! From request bytes to each event's JSON text: decompression (gzip, zstd) bounded by the
//! body limit, framing (one object, an array, or NDJSON), and the shape limits (nesting depth,
//! string length) checked by one scan before anything is parsed — a 10,000-deep document
//! costs a pass over its bytes, not a recursion.

use std::io::Read;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap};
use instream_event::Rejection;

#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    TooLarge {
        limit: usize,
    },
    UnsupportedEncoding(String),
    Corrupt {
        encoding: &'static str,
        message: String,
    },
    Malformed(String),
    TooManyEvents {
        limit: usize,
    },
    /// The body could not be read whole (the client went away, or sent a broken chunk).
    Unreadable(String),
    /// The body came slower than `ingest.min_body_bytes_per_second`.
    TooSlow {
        min_bytes_per_second: u64,
    },
}

impl BodyError {
    pub fn code(&self) -> &'static str {
        match self {
            BodyError::TooLarge { .. } => "body_too_large",
            BodyError::UnsupportedEncoding(_) => "unsupported_encoding",
            BodyError::Corrupt { .. } => "corrupt_body",
            BodyError::Malformed(_) => "malformed_body",
            BodyError::TooManyEvents { .. } => "too_many_events",
            BodyError::Unreadable(_) => "unreadable_body",
            BodyError::TooSlow { .. } => "body_too_slow",
        }
    }

    pub fn message(&self) -> String {
        match self {
            BodyError::TooLarge { limit } => {
                format!("the body is larger than {limit} bytes (after decompression)")
            }
            BodyError::UnsupportedEncoding(e) => {
                format!("Content-Encoding `{e}` is not supported: use gzip, zstd or none")
            }
            BodyError::Corrupt { encoding, message } => {
                format!("the body is not valid {encoding}: {message}")
            }
            BodyError::Malformed(m) => m.clone(),
            BodyError::TooManyEvents { limit } => {
                format!("more than {limit} events in one request")
            }
            BodyError::Unreadable(m) => format!("the body could not be read: {m}"),
            BodyError::TooSlow {
                min_bytes_per_second,
            } => format!(
                "the body came slower than {min_bytes_per_second} bytes a second; send it again"
            ),
        }
    }
}

/// Reads the body as sent, refusing it as soon as it passes `limit` bytes.
pub async fn read(
    body: axum::body::Body,
    limit: usize,
    min_bytes_per_second: u64,
) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt;
    let mut body = http_body_util::Limited::new(body, limit);
    let started = tokio::time::Instant::now();
    let mut out = bytes::BytesMut::new();
    loop {
        // The next bytes must come before the body falls below its minimum rate (after a
        // grace of two seconds): a client trickling one byte now and then is cut off early.
        let frame = if min_bytes_per_second == 0 {
            body.frame().await
        } else {
            // The grace, then the time what arrived so far would take at the minimum rate: a
            // client that sent nothing is cut off after the grace, not after the time a TLS
            // record or any other allowance would take at that rate.
            let due = BODY_RATE_GRACE
                + Duration::from_secs_f64(out.len() as f64 / min_bytes_per_second as f64);
            match tokio::time::timeout_at(started + due, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => {
                    return Err(BodyError::TooSlow {
                        min_bytes_per_second,
                    })
                }
            }
        };
        match frame {
            None => return Ok(out.freeze()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            Some(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(BodyError::TooLarge { limit })
            }
            Some(Err(e)) => return Err(BodyError::Unreadable(e.to_string())),
        }
    }
}

/// How long a body may take before its rate is judged.
const BODY_RATE_GRACE: Duration = Duration::from_secs(2);

/// The body as the client meant it: decompressed per `Content-Encoding`, at most `limit`
/// bytes after decompression (a compression bomb stops at the limit).
pub fn decode(headers: &HeaderMap, body: Bytes, limit: usize) -> Result<Bytes, BodyError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
    let (name, reader): (&'static str, Box<dyn Read + '_>) = match encoding.as_deref() {
        None | Some("") | Some("identity") => return Ok(body),
        Some("gzip") | Some("x-gzip") => (
            "gzip",
            Box::new(flate2::read::MultiGzDecoder::new(&body[..])),
        ),
        Some("zstd") => {
            let decoder =
                zstd::stream::read::Decoder::new(&body[..]).map_err(|e| BodyError::Corrupt {
                    encoding: "zstd",
                    message: e.to_string(),
                })?;
            ("zstd", Box::new(decoder))
        }
        Some(other) => return Err(BodyError::UnsupportedEncoding(other.to_owned())),
    };
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| BodyError::Corrupt {
            encoding: name,
            message: e.to_string(),
        })?;
    if out.len() > limit {
        return Err(BodyError::TooLarge { limit });
    }
    Ok(Bytes::from(out))
}

/// How the body holds its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One JSON object, or an array of them.
    Json,
    /// One JSON object per line (`application/x-ndjson`).
    NdJson,
}

impl Framing {
    pub fn of(headers: &HeaderMap) -> Framing {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case("application/x-ndjson")
            || essence.eq_ignore_ascii_case("application/jsonl")
        {
            Framing::NdJson
        } else {
            Framing::Json
        }
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &bytes[start..end.max(start)]
}

/// Splits a body into each event's bytes, at most `max_events` of them (more is an error as
/// soon as it is seen, so a body of many tiny events costs no more memory than the limit).
/// Only the framing is checked here; each event's own JSON is checked later and refused
/// alone. NDJSON isolates best: in an array, an element whose brackets or quotes do not
/// balance breaks the framing of the whole body.
pub fn split(body: &[u8], framing: Framing, max_events: usize) -> Result<Vec<&[u8]>, BodyError> {
    let body = trim(body);
    if framing == Framing::NdJson {
        let mut lines = Vec::new();
        for line in body
            .split(|&b| b == b'\n')
            .map(trim)
            .filter(|l| !l.is_empty())
        {
            if lines.len() == max_events {
                return Err(BodyError::TooManyEvents { limit: max_events });
            }
            lines.push(line);
        }
        if lines.is_empty() {
            return Err(BodyError::Malformed("the body is empty".into()));
        }
        return Ok(lines);
    }
    match body.first() {
        None => Err(BodyError::Malformed("the body is empty".into())),
        Some(b'{') => Ok(vec![body]),
        Some(b'[') => split_array(body, max_events),
        Some(_) => Err(BodyError::Malformed(
            "the body must be a JSON object, an array of objects, or NDJSON \
             (Content-Type: application/x-ndjson)"
                .into(),
        )),
    }
}

/// What a byte of JSON text is, seen by [`Lexer`].
enum Token {
    /// Inside a string (an escape included).
    Text,
    /// The quote that opens a string.
    Opens,
    /// The quote that closes a string.
    Closes,
    /// Any byte outside strings: brackets, commas, scalars, whitespace.
    Outside(u8),
}

/// Tells string contents from structure in one pass, so that brackets, commas and escaped
/// quotes inside strings are text: the one piece both the array splitter and the shape check
/// scan with.
#[derive(Default)]
struct Lexer {
    in_string: bool,
    escaped: bool,
}

impl Lexer {
    fn next(&mut self, b: u8) -> Token {
        if !self.in_string {
            if b == b'"' {
                self.in_string = true;
                return Token::Opens;
            }
            return Token::Outside(b);
        }
        match (self.escaped, b) {
            (true, _) => self.escaped = false,
            (false, b'\\') => self.escaped = true,
            (false, b'"') => {
                self.in_string = false;
                return Token::Closes;
            }
            _ => {}
        }
        Token::Text
    }
}

/// The elements of a top-level JSON array, found by tracking strings and brackets only.
fn split_array(body: &[u8], max_events: usize) -> Result<Vec<&[u8]>, BodyError> {
    let malformed = |m: &str| BodyError::Malformed(format!("the body is not a JSON array: {m}"));
    let mut elements = Vec::new();
    let mut depth = 0usize;
    let mut lexer = Lexer::default();
    let mut start = 1;
    for (i, &b) in body.iter().enumerate() {
        let Token::Outside(b) = lexer.next(b) else {
            continue;
        };
        match b {
            b'[' | b'{' => depth += 1,
            b']' | b'}' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| malformed("unbalanced brackets"))?;
                if depth == 0 {
                    if i != body.len() - 1 {
                        return Err(malformed("text after the closing `]`"));
                    }
                    let last = trim(&body[start..i]);
                    if !last.is_empty() {
                        if elements.len() == max_events {
                            return Err(BodyError::TooManyEvents { limit: max_events });
                        }
                        elements.push(last);
                    } else if !elements.is_empty() {
                        return Err(malformed("a trailing comma"));
                    }
                    return Ok(elements);
                }
            }
            b',' if depth == 1 => {
                let element = trim(&body[start..i]);
                if element.is_empty() {
                    return Err(malformed(&format!("an empty element before byte {i}")));
                }
                if elements.len() == max_events {
                    return Err(BodyError::TooManyEvents { limit: max_events });
                }
                elements.push(element);
                start = i + 1;
            }
            _ => {}
        }
    }
    Err(malformed("it ends before its closing `]`"))
}

/// Limits on one event's shape.
#[derive(Debug, Clone, Copy)]
pub struct ShapeLimits {
    pub max_depth: usize,
    pub max_string_bytes: usize,
}

/// Checks nesting depth and string lengths of one event's JSON text, and that it is UTF-8,
/// in one pass without parsing.
pub fn check_shape(raw: &[u8], limits: ShapeLimits) -> Result<(), Rejection> {
    if let Err(e) = std::str::from_utf8(raw) {
        return Err(Rejection::new(
            "invalid_utf8",
            format!("the event is not UTF-8: {e}"),
        ));
    }
    let mut depth = 0usize;
    let mut lexer = Lexer::default();
    let mut string_start = 0;
    for (i, &b) in raw.iter().enumerate() {
        match lexer.next(b) {
            Token::Text => {}
            Token::Opens => string_start = i + 1,
            Token::Closes => {
                if i - string_start > limits.max_string_bytes {
                    return Err(Rejection::new(
                        "string_too_long",
                        format!(
                            "a string of {} bytes at byte {string_start}; the limit is {}",
                            i - string_start,
                            limits.max_string_bytes
                        ),
                    ));
                }
            }
            Token::Outside(b'[' | b'{') => {
                depth += 1;
                if depth > limits.max_depth {
                    return Err(Rejection::new(
                        "too_deep",
                        format!(
                            "nested deeper than {} levels (at byte {i})",
                            limits.max_depth
                        ),
                    ));
                }
            }
            Token::Outside(b']' | b'}') => depth = depth.saturating_sub(1),
            Token::Outside(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ShapeLimits = ShapeLimits {
        max_depth: 4,
        max_string_bytes: 8,
    };

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn arrays_split_into_elements_whatever_they_hold() {
        let body = br#" [ {"a":"x,]}"}, {"b":[1,{"c":2}]} ,{bad} ] "#;
        let parts = split(body, Framing::Json, 100).unwrap();
        assert_eq!(
            parts,
            [&br#"{"a":"x,]}"}"#[..], br#"{"b":[1,{"c":2}]}"#, b"{bad}"]
        );
        assert_eq!(split(b"[]", Framing::Json, 100).unwrap().len(), 0);
        assert_eq!(split(br#"{"a":1}"#, Framing::Json, 100).unwrap().len(), 1);
        for bad in [
            &b"[{},]"[..],
            b"[{},,{}]",
            b"[{}",
            b"[{}] x",
            b"42",
            b"",
            b"}",
        ] {
            assert!(split(bad, Framing::Json, 100).is_err(), "{:?}", bad);
        }
    }

    #[test]
    fn ndjson_is_one_event_per_line() {
        let body = b"{\"a\":1}\n\n  {\"b\":2}\r\n{broken\n";
        let parts = split(body, Framing::NdJson, 100).unwrap();
        assert_eq!(parts, [&b"{\"a\":1}"[..], b"{\"b\":2}", b"{broken"]);
        assert!(split(b"\n \n", Framing::NdJson, 100).is_err());
        assert_eq!(
            split(body, Framing::NdJson, 2).unwrap_err(),
            BodyError::TooManyEvents { limit: 2 }
        );
        assert_eq!(
            split(b"[{},{},{}]", Framing::Json, 2).unwrap_err(),
            BodyError::TooManyEvents { limit: 2 }
        );
        assert_eq!(split(b"[{},{}]", Framing::Json, 2).unwrap().len(), 2);
        let h = headers(&[(header::CONTENT_TYPE, "application/x-ndjson; charset=utf-8")]);
        assert_eq!(Framing::of(&h), Framing::NdJson);
        assert_eq!(Framing::of(&HeaderMap::new()), Framing::Json);
    }

    #[test]
    fn shapes_are_limited_without_parsing() {
        assert!(check_shape(br#"{"a":[{"b":"12345678"}]}"#, LIMITS).is_ok());
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(
            check_shape(deep.as_bytes(), LIMITS).unwrap_err().code,
            "too_deep"
        );
        assert_eq!(
            check_shape(br#"{"a":"123456789"}"#, LIMITS)
                .unwrap_err()
                .code,
            "string_too_long"
        );
        // Brackets and escaped quotes inside strings are text.
        assert!(check_shape(br#"{"a":"[[[\"[["}"#, LIMITS).is_ok());
        assert_eq!(
            check_shape(b"{\"a\":\"\xff\"}", LIMITS).unwrap_err().code,
            "invalid_utf8"
        );
    }

    #[test]
    fn bodies_decompress_within_the_limit() {
        use std::io::Write;
        let text = b"{\"a\":1}".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&text).unwrap();
        let gz = Bytes::from(gz.finish().unwrap());
        let h = headers(&[(header::CONTENT_ENCODING, "gzip")]);
        assert_eq!(decode(&h, gz.clone(), 10_000).unwrap(), &text[..]);
        assert_eq!(
            decode(&h, gz, 100).unwrap_err(),
            BodyError::TooLarge { limit: 100 }
        );
        let zs = Bytes::from(zstd::encode_all(&text[..], 1).unwrap());
        let h = headers(&[(header::CONTENT_ENCODING, "zstd")]);
        assert_eq!(decode(&h, zs, 10_000).unwrap(), &text[..]);
        // A bomb: 256 MiB of zeros in a few KiB stops at the limit.
        let bomb = Bytes::from(zstd::encode_all(std::io::repeat(0).take(1 << 28), 3).unwrap());
        assert!(bomb.len() < 1 << 20);
        assert_eq!(
            decode(&h, bomb, 1 << 20).unwrap_err().code(),
            "body_too_large"
        );
        assert_eq!(
            decode(&h, Bytes::from_static(b"not zstd"), 100)
                .unwrap_err()
                .code(),
            "corrupt_body"
        );
        let h = headers(&[(header::CONTENT_ENCODING, "br")]);
        assert_eq!(
            decode(&h, Bytes::new(), 1).unwrap_err().code(),
            "unsupported_encoding"
        );
    }
}
